"""The embedded guidance methods (no model weights) by name, and their maps.

METHODS: "water-contrast" (the default: colour contrast against the water's
colour mixed with saliency, ssattn.guidance.water_contrast; mean ROC-AUC
about 0.92 against the object masks of the demo's scenes) and
"spectral-residual" (saliency alone, ssattn.guidance.saliency; about 0.78 on
the same scenes; benchmarks/RESULTS.md).
"""

from __future__ import annotations

from torch import Tensor

from .. import _checks
from ..functional import guidance_pyramid
from .saliency import GRID, saliency_grid
from .water_contrast import water_contrast_grid

METHODS = ("water-contrast", "spectral-residual")
DEFAULT_METHOD = "water-contrast"


def guidance_grid(images: Tensor, method: str = DEFAULT_METHOD, grid: int = GRID) -> Tensor:
    """The grid (B, grid, grid) of an embedded method (METHODS) for images (B, 3, H, W) in [0, 1]."""
    _checks.choice("method", method, METHODS)
    if method == "spectral-residual":
        return saliency_grid(images, grid)
    return water_contrast_grid(images, grid)


def embedded_guidance(images: Tensor, sizes=None, *, gamma: float = 2.0, delta: float = 0.2, backend: str = "auto",
                      method: str = DEFAULT_METHOD) -> list[Tensor]:
    """Guidance maps of an embedded method: one (B, 1, H_l, W_l) map per size (default: the image size)."""
    if sizes is None:
        sizes = [tuple(images.shape[-2:])]
    return guidance_pyramid(guidance_grid(images, method), sizes, gamma=gamma, delta=delta, backend=backend)
