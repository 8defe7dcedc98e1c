"""Zero-shot CLIP classifier: class prompts against the image, one forward pass per batch.

Each class has one or more prompts (classes.CLIP_PROMPTS by default); their
normalised text embeddings are averaged per class (prompt ensembling) and
computed once. An image's probabilities are the softmax of CLIP's scaled
cosine similarities, logit_scale * <image, class>, as CLIP's own
logits_per_image. Any transformers model with get_image_features /
get_text_features and logit_scale works (CLIP, and SigLIP-style models
through their processors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..guidance.hub import from_pretrained, model_ref, require_transformers, revision_of
from .base import batches, check_batch_size, device_of, image_list, to_pil
from .classes import CLIP_PROMPTS, PAPER_CLASSES, check_classes

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


def _features(out) -> Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor.
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipClassifier:
    """Probabilities over `classes` from image-text similarity with `prompts` (dict class -> list of texts)."""

    def __init__(self, model: str = DEFAULT_CLIP, classes=PAPER_CLASSES, *, prompts: dict | None = None,
                 device=None, dtype=None, batch_size: int = 32):
        self.classes = check_classes(classes)
        prompts = dict(CLIP_PROMPTS if prompts is None else prompts)
        missing = [c for c in self.classes if c not in prompts]
        if missing:
            raise ValueError(f"prompts has no entry for classes {missing}; give a list of texts for each class")
        self.prompts = {c: [prompts[c]] if isinstance(prompts[c], str) else list(prompts[c]) for c in self.classes}
        if any(not p or not all(isinstance(t, str) and t.strip() for t in p) for p in self.prompts.values()):
            raise ValueError(f"prompts must give each class a non-empty list of non-empty texts, got {self.prompts!r}")
        self.batch_size = check_batch_size(batch_size)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model_id = model
        require_transformers("routing", "VLM degradation routing with CLIP")
        self.processor = from_pretrained("AutoProcessor", model, "CLIP processor")
        self.model = from_pretrained("AutoModel", model, "CLIP model", dtype=self.dtype).to(self.device).eval()
        self.settings = {"classifier": "clip", "model": model_ref(model), "revision": revision_of(model),
                         "classes": list(self.classes), "prompts": self.prompts, "dtype": str(self.dtype)}
        self._text = None

    @torch.inference_mode()
    def class_embeddings(self) -> Tensor:
        """(C, D) unit vectors: the mean of each class's normalised prompt embeddings, renormalised."""
        if self._text is None:
            texts = [t for c in self.classes for t in self.prompts[c]]
            tok = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
            tok = {k: v.to(self.device) for k, v in tok.items()}
            emb = F.normalize(_features(self.model.get_text_features(**tok)).float(), dim=-1)
            counts = [len(self.prompts[c]) for c in self.classes]
            self._text = F.normalize(torch.stack([e.mean(0) for e in emb.split(counts)]), dim=-1)
        return self._text

    @torch.inference_mode()
    def __call__(self, images) -> Tensor:
        imgs = image_list(images)
        text = self.class_embeddings()
        scale = self.model.logit_scale.exp().float()
        out = []
        for sl in batches(len(imgs), self.batch_size):
            px = self.processor(images=[to_pil(x) for x in imgs[sl]], return_tensors="pt")["pixel_values"]
            emb = _features(self.model.get_image_features(pixel_values=px.to(self.device, self.dtype)))
            out.append((scale * F.normalize(emb.float(), dim=-1) @ text.T).softmax(-1))
        return torch.cat(out).to(device_of(images))
