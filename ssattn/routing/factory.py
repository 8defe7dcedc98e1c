"""make_classifier(name, ...): the classifier a CLI flag names."""

from __future__ import annotations

from .classes import PAPER_CLASSES

NAMES = ("embedded", "clip", "vlm")


def make_classifier(name: str = "embedded", classes=PAPER_CLASSES, *, model: str | None = None, device=None,
                    dtype=None, batch_size: int | None = None):
    """An EmbeddedClassifier, ClipClassifier or VlmClassifier over `classes` (model: hub id or folder)."""
    if name == "embedded":
        if model is not None:
            raise ValueError("the embedded classifier takes no model")
        from .embedded import EmbeddedClassifier

        return EmbeddedClassifier(classes).to(device or "cpu")
    opts = {k: v for k, v in (("device", device), ("dtype", dtype), ("batch_size", batch_size)) if v is not None}
    if model is not None:
        opts["model"] = model
    if name == "clip":
        from .clip import ClipClassifier

        return ClipClassifier(classes=classes, **opts)
    if name == "vlm":
        from .vlm import VlmClassifier

        return VlmClassifier(classes=classes, **opts)
    raise ValueError(f"classifier must be one of {NAMES}, got {name!r}")
