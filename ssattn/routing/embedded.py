"""The embedded default classifier: no weights, a linear model on measured image statistics.

features.features() measures noise, blur and its anisotropy, JPEG
blockiness, reflection ghosts, contrast, brightness and colour cast; a
multinomial logistic regression fitted on generated degradations
(benchmarks/fit_embedded_classifier.py, which writes _embedded_fit.py)
turns them into class probabilities. Two fits ship: the four classes of
the routing paper and all six; a classifier for a subset uses the smallest fit that
covers it, restricted to the requested classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _embedded_fit
from .base import image_list
from .classes import PAPER_CLASSES, check_classes
from .features import FEATURES, features

# Images larger than this on a side are classified on their centre crop of this size: the
# statistics are per pixel (noise, blur, blocks), so cropping keeps them and bounds the cost.
MAX_SIDE = 512


MIN_SIDE = 16


def _centre(x: Tensor, side: int) -> Tensor:
    """The centre crop (at most side x side) of a batch (B, 3, H, W); sides under MIN_SIDE are edge-padded to it."""
    h, w = x.shape[-2:]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    x = x[..., top:top + min(h, side), left:left + min(w, side)]
    ph, pw = max(0, MIN_SIDE - x.shape[-2]), max(0, MIN_SIDE - x.shape[-1])
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


class EmbeddedClassifier(nn.Module):
    """Probabilities over `classes` (any subset of ALL_CLASSES) from image statistics; an nn.Module of buffers."""

    def __init__(self, classes=PAPER_CLASSES, *, temperature: float = 1.0):
        super().__init__()
        fits = _embedded_fit.FITS
        self.classes = check_classes(classes, known=sorted({c for f in fits for c in f["classes"]}))
        fit = min((f for f in fits if set(self.classes) <= set(f["classes"])), key=lambda f: len(f["classes"]))
        if tuple(fit["features"]) != FEATURES:
            raise RuntimeError("the shipped fit was made with other features; rerun benchmarks/fit_embedded_classifier.py")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        cols = [fit["classes"].index(c) for c in self.classes]
        self.register_buffer("mean", torch.tensor(fit["mean"]))
        self.register_buffer("std", torch.tensor(fit["std"]))
        self.register_buffer("weight", torch.tensor(fit["weight"])[:, cols].contiguous())
        self.register_buffer("bias", torch.tensor(fit["bias"])[cols].contiguous())
        self.temperature = float(temperature)
        self.settings = {"classifier": "embedded", "classes": list(self.classes), "fit": fit["name"],
                         "fit_classes": list(fit["classes"]), "temperature": self.temperature, "max_side": MAX_SIDE}

    def logits(self, feats: Tensor) -> Tensor:
        z = (feats.to(self.mean) - self.mean) / self.std
        return (z @ self.weight + self.bias) / self.temperature

    @torch.no_grad()
    def forward(self, images) -> Tensor:
        """(B, C) probabilities; a batch is measured at once, a list of sizes image by image."""
        if isinstance(images, Tensor) and images.dim() == 4:
            feats = features(_centre(images, MAX_SIDE).to(self.mean.device))
        else:
            feats = torch.cat([features(_centre(x[None], MAX_SIDE).to(self.mean.device)) for x in image_list(images)])
        return self.logits(feats).softmax(-1)
