"""Embedded guidance that needs no weights: colour contrast against the water, plus spectral-residual saliency.

Under water, light from an object reaches the camera attenuated and mixed
with the veiling light by the water between them: the seabed and the open
water behind the objects take one slowly varying blue-green cast, while an
object in front of them -- nearer, so less attenuated, and of its own
colour -- departs from it. So:

1. Estimate the water-and-seabed colour per region, robustly: the median of
   each of CELLS x CELLS blocks of the small image (an object covering less
   than half of a block does not move it), bilinearly upsampled.
2. Contrast: per pixel, the distance from that estimate in log colour
   (ratios, so dark and bright regions count alike), each channel divided by
   the image's median absolute residual in it (the seabed texture's own
   scale), blurred by BLUR_SIGMA pixels.
3. Combine the min-max normalised contrast with spectral-residual saliency
   (ssattn.guidance.saliency_grid) with weights 1 - SALIENCY_WEIGHT and
   SALIENCY_WEIGHT: saliency adds the shape cue where colour alone is weak.

The result is a grid that takes the place of BLIP's similarity grid (SPEC 1),
then min-max, gamma/delta sharpening and the pyramid as usual. Measured on
the demo's scenes (ssattn.apps.data.scenes) in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from ..images import gaussian_blur
from .saliency import saliency_grid

GRID = 64
CELLS = 4
BLUR_SIGMA = 1.0
SALIENCY_WEIGHT = 0.3
# Log colour is floored here: black pixels would otherwise dominate.
LOG_FLOOR = 1e-3


def _minmax(x: Tensor) -> Tensor:
    lo = x.flatten(1).amin(1).view(-1, 1, 1)
    hi = x.flatten(1).amax(1).view(-1, 1, 1)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def water_colour(x: Tensor, cells: int = CELLS) -> Tensor:
    """Robust per-region colour of x (B, C, H, W), H and W divisible by cells: block medians, upsampled."""
    B, C, H, W = x.shape
    if H % cells or W % cells:
        raise ValueError(f"the grid ({H}x{W}) must be divisible by cells ({cells})")
    blocks = x.unfold(2, H // cells, H // cells).unfold(3, W // cells, W // cells)  # B C cells cells h w
    med = blocks.reshape(B, C, cells, cells, -1).median(-1).values
    return F.interpolate(med, size=(H, W), mode="bilinear", align_corners=False)


def water_contrast(images: Tensor, grid: int = GRID, cells: int = CELLS) -> Tensor:
    """Colour distance from the estimated water colour (steps 1-2) of images (B, 3, H, W) -> (B, grid, grid)."""
    small = F.interpolate(images.float(), size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
    logc = torch.log(small.clamp_min(LOG_FLOOR))
    residual = logc - water_colour(logc, cells)
    scale = residual.abs().flatten(2).median(-1).values[..., None, None].clamp_min(1e-4)
    dist = (residual / scale).square().sum(1, keepdim=True).sqrt()
    return gaussian_blur(dist, BLUR_SIGMA)[:, 0]


def water_contrast_grid(images: Tensor, grid: int = GRID, cells: int = CELLS,
                        saliency_weight: float = SALIENCY_WEIGHT) -> Tensor:
    """The embedded default guidance grid of images (B, 3, H, W) in [0, 1] -> (B, grid, grid) float32, in [0, 1]."""
    _checks.tensor("images", images, ndim=4)
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 colour channels (B, 3, H, W), got shape {tuple(images.shape)}")
    if not 0 <= saliency_weight <= 1:
        raise ValueError(f"saliency_weight must lie in [0, 1], got {saliency_weight!r}")
    contrast = _minmax(water_contrast(images, grid, cells))
    if saliency_weight == 0:
        return contrast
    return (1 - saliency_weight) * contrast + saliency_weight * _minmax(saliency_grid(images, grid))
