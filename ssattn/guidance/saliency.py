"""Spectral-residual saliency, a guidance method that needs no model weights (the embedded default before
water-contrast; see ssattn.guidance.embedded).

X. Hou and L. Zhang, "Saliency Detection: A Spectral Residual Approach",
CVPR 2007. The log-amplitude spectrum of a small grey image minus its local
average (the "spectral residual") is transformed back with the original
phase; the squared magnitude, blurred, marks what stands out. Its grid takes
the place of BLIP's similarity grid in SPEC 1, so the rest of the pipeline
(min-max, sharpening, pyramid) is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from ..functional import guidance_pyramid
from ..images import gaussian_blur

# Hou & Zhang work on a 64-pixel image with a 3x3 average of the log spectrum.
GRID = 64
BLUR_SIGMA = 3.0


def saliency_grid(images: Tensor, grid: int = GRID) -> Tensor:
    """Spectral-residual saliency of images (B, 1 or 3, H, W) in [0, 1] -> (B, grid, grid), float32."""
    _checks.tensor("images", images, ndim=4)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3:
        x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    small = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
    spectrum = torch.fft.fft2(small)
    log_amp = torch.log(spectrum.abs().clamp_min(1e-8))
    residual = log_amp - F.avg_pool2d(F.pad(log_amp, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    sal = torch.fft.ifft2(torch.exp(torch.complex(residual, torch.angle(spectrum)))).abs().square()
    return gaussian_blur(sal, BLUR_SIGMA).squeeze(1)


def saliency_guidance(images: Tensor, sizes=None, *, gamma: float = 2.0, delta: float = 0.2,
                      backend: str = "auto") -> list[Tensor]:
    """Guidance maps from saliency alone: one (B, 1, H_l, W_l) map per size (default: the image size)."""
    if sizes is None:
        sizes = [tuple(images.shape[-2:])]
    return guidance_pyramid(saliency_grid(images), sizes, gamma=gamma, delta=delta, backend=backend)
