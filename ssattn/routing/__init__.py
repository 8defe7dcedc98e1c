"""VLM degradation routing: classify each image's degradation and send it to the right expert.

Classifiers (all: ``classifier(images) -> (B, C)`` probabilities over
``classifier.classes``):

- EmbeddedClassifier: no weights; a linear model on measured image statistics (the default)
- ClipClassifier: zero-shot CLIP, class prompts (transformers)
- VlmClassifier: a chat VLM answers a multiple-choice prompt; the answer is
  read from the letter tokens' logits at the first generated position (transformers)

DegradationRouter runs each class's expert once on its sub-batch and puts
the results back in input order. transformers is imported only when a
model classifier is built.
"""

from .classes import ALL_CLASSES, CLIP_PROMPTS, DESCRIPTIONS, PAPER_CLASSES
from .embedded import EmbeddedClassifier
from .features import FEATURES, features
from .router import DegradationRouter, Routed

__all__ = ["ALL_CLASSES", "CLIP_PROMPTS", "ClipClassifier", "DESCRIPTIONS", "DegradationRouter", "EmbeddedClassifier",
           "FEATURES", "PAPER_CLASSES", "Routed", "VlmClassifier", "features", "make_classifier"]


def __getattr__(name):
    if name == "ClipClassifier":
        from .clip import ClipClassifier

        return ClipClassifier
    if name == "VlmClassifier":
        from .vlm import VlmClassifier

        return VlmClassifier
    if name == "make_classifier":
        from .factory import make_classifier

        return make_classifier
    raise AttributeError(f"module 'ssattn.routing' has no attribute {name!r}")
