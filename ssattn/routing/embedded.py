"""The embedded default classifier: a small network on measured image statistics, weights shipped in the package.

features.features() measures how the image's spectrum falls with frequency
and direction, noise, JPEG blocks, band-pass energy and sparsity,
structure, intensity (black level, spread, colour), reflection ghosts and
how sharpness varies over the image. An ensemble of small MLPs (two hidden
layers) turns the standardised numbers into logits; their mean, divided by
a temperature fitted on photographs the MLPs never saw, gives calibrated
probabilities. benchmarks/fit_embedded_classifier.py fits them on
randomised degradations of varied content (ssattn/apps/data/routing_data.py)
and writes _embedded_weights.py. Two fits ship: the four classes of the
paper and all six; a classifier for a subset uses the smallest fit that
covers it, restricted to the requested classes (a softmax over their
logits).

Any size works: each image is cropped (from an 8-aligned offset, so JPEG's
block grid stays in place) to at most MAX_SIDE per side and to a multiple of
SIDE_STEP, so images of similar sizes share a batch; images under 32 pixels
on a side are edge-padded to 32.
"""

from __future__ import annotations

import base64

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _embedded_weights
from .base import image_list
from .classes import PAPER_CLASSES, check_classes
from .features import FEATURES, MIN_SIDE, features

# Statistics are per pixel (noise, blur, blocks), so a crop keeps them and bounds the cost.
MAX_SIDE = 512
SIDE_STEP = 32  # crops are a multiple of this per side: images of similar sizes are classified as one batch
Z_CLIP = 8.0  # standardised features are clipped to +-Z_CLIP (a few statistics have long tails)


def decode(blob: dict) -> Tensor:
    """A float32 array stored as {"shape": [...], "data": base64 of its little-endian bytes}."""
    raw = np.frombuffer(base64.b64decode(blob["data"]), dtype="<f4").astype(np.float32)
    return torch.from_numpy(raw.copy()).view(*blob["shape"])


def prepare(x: Tensor) -> Tensor:
    """(3, H, W) or (B, 3, H, W) -> the crop (or padding) the classifier measures."""
    h, w = x.shape[-2:]
    if min(h, w) < MIN_SIDE:
        x = F.pad(x.reshape(-1, *x.shape[-3:]), (0, max(0, MIN_SIDE - w), 0, max(0, MIN_SIDE - h)),
                  mode="replicate").view(*x.shape[:-2], max(h, MIN_SIDE), max(w, MIN_SIDE))
        h, w = x.shape[-2:]
    ch = min(MAX_SIDE, h) // SIDE_STEP * SIDE_STEP
    cw = min(MAX_SIDE, w) // SIDE_STEP * SIDE_STEP
    top, left = (h - ch) // 2 // 8 * 8, (w - cw) // 2 // 8 * 8
    return x[..., top:top + ch, left:left + cw]


class EmbeddedClassifier(nn.Module):
    """Probabilities over `classes` (any subset of ALL_CLASSES) from image statistics; an nn.Module of buffers.

    temperature: None uses the fitted one (calibrated on held-out photographs); a number replaces it.
    """

    def __init__(self, classes=PAPER_CLASSES, *, temperature: float | None = None):
        super().__init__()
        fits = _embedded_weights.FITS
        self.classes = check_classes(classes, known=sorted({c for f in fits for c in f["classes"]}))
        fit = min((f for f in fits if set(self.classes) <= set(f["classes"])), key=lambda f: len(f["classes"]))
        if tuple(fit["features"]) != FEATURES:
            raise RuntimeError("the shipped weights were fitted on other features; "
                               "rerun benchmarks/fit_embedded_classifier.py")
        if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0 or None (the fitted one), got {temperature!r}")
        arrays = {k: decode(v) for k, v in fit["arrays"].items()}
        cols = torch.tensor([fit["classes"].index(c) for c in self.classes])
        for k in ("mean", "std", "w1", "b1", "w2", "b2"):
            self.register_buffer(k, arrays[k])
        self.register_buffer("w3", arrays["w3"].index_select(-1, cols).contiguous())
        self.register_buffer("b3", arrays["b3"].index_select(-1, cols).contiguous())
        self.temperature = float(fit["temperature"] if temperature is None else temperature)
        # Measured when fitted: the accuracy of networks on photographs they never saw (leave-photos-out).
        self.held_out_accuracy = float(fit["leave_photos_out_accuracy"])
        self.settings = {"classifier": "embedded", "classes": list(self.classes), "fit": fit["name"],
                         "fit_classes": list(fit["classes"]), "weights": fit["sha256"][:16],
                         "temperature": self.temperature, "max_side": MAX_SIDE}

    def logits(self, feats: Tensor) -> Tensor:
        """(B, C) logits (already divided by the temperature) of (B, len(FEATURES)) statistics."""
        z = ((feats.to(self.mean) - self.mean) / self.std).clamp(-Z_CLIP, Z_CLIP)
        h = F.gelu(torch.einsum("bf,mfh->mbh", z, self.w1) + self.b1[:, None])
        h = F.gelu(torch.einsum("mbh,mhk->mbk", h, self.w2) + self.b2[:, None])
        out = torch.einsum("mbh,mhc->mbc", h, self.w3) + self.b3[:, None]
        return out.mean(0) / self.temperature  # the ensemble's mean logit

    def measure(self, images) -> Tensor:
        """(B, len(FEATURES)) statistics: a batch at once; a list grouped by the size of its crops."""
        dev = self.mean.device
        if isinstance(images, Tensor) and images.dim() == 4:
            return features(prepare(images.detach()).to(dev))
        crops = [prepare(x) for x in image_list(images)]
        out = torch.empty(len(crops), len(FEATURES), device=dev)
        groups: dict = {}
        for i, c in enumerate(crops):
            groups.setdefault(tuple(c.shape[-2:]), []).append(i)
        for idx in groups.values():
            out[idx] = features(torch.stack([crops[i] for i in idx]).to(dev))
        return out

    @torch.no_grad()
    def forward(self, images) -> Tensor:
        """(B, C) probabilities of a (B, 3, H, W) batch or a list of images of any sizes."""
        return self.logits(self.measure(images)).softmax(-1)
