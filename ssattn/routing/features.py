"""Image statistics that tell degradations apart, vectorised over a batch (no loop over pixels).

Each feature is one number per image, computed on the luma (and the colour
means) of a (B, 3, H, W) batch in [0, 1]:

    noise        log of the noise sigma: median absolute response to
                 Immerkaer's Laplacian-difference mask (edges barely move a median)
    sharpness    log fine-to-coarse gradient energy (blur removes fine gradients)
    lap_ratio    log Laplacian energy over gradient energy
    coherence    anisotropy of the image's structure tensor at two scales
                 (motion blur removes the gradients along its direction)
    min_dir      log of the weakest over the mean directional gradient energy
    blockiness   log gradient at 8x8 block boundaries over inside blocks (JPEG),
                 rows and columns
    ghost        prominence of an isolated secondary peak in the band-pass
                 autocorrelation (the shifted double edges of a reflection)
    contrast     log luma standard deviation
    brightness   mean luma, and its 5th and 95th percentiles
    floor        5th percentile of the darkest channel (a veil lifts it)
    cast_rg, cast_bg   mean red - green and blue - green
    saturation   mean (max - min) over the channels

FEATURES lists the names in the order of features()'s columns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..images import gaussian_blur

FEATURES = ("noise", "sharpness", "lap_ratio", "coherence1", "coherence2", "min_dir", "block_x", "block_y",
            "ghost", "contrast", "brightness", "p05", "p95", "floor", "cast_rg", "cast_bg", "saturation")

# Luma weights (ITU-R BT.601), as the saliency guide uses.
LUMA = (0.299, 0.587, 0.114)
# Autocorrelation lags searched for a reflection's ghost (pixels).
GHOST_MIN, GHOST_MAX = 3, 12
EPS = 1e-6


def _quantile(x: Tensor, q: float) -> Tensor:
    """Per-row quantile of (B, N) through kthvalue (torch.quantile refuses rows of more than 16M elements)."""
    k = max(1, min(x.shape[1], int(round(q * (x.shape[1] - 1))) + 1))
    return x.kthvalue(k, dim=1).values


def _gauss(x: Tensor, sigma: float) -> Tensor:
    return gaussian_blur(x, sigma, pad_mode="replicate")  # replicate: any image size, however small


def _grad(y: Tensor, step: int = 1) -> tuple[Tensor, Tensor]:
    gx = y[..., step:-step or None, 2 * step:] - y[..., step:-step or None, : -2 * step]
    gy = y[..., 2 * step:, step:-step or None] - y[..., : -2 * step, step:-step or None]
    return gx, gy


def _coherence(gx: Tensor, gy: Tensor) -> tuple[Tensor, Tensor]:
    """(coherence (l1 - l2) / (l1 + l2), l2 / mean) of the image-wide structure tensor."""
    jxx, jyy, jxy = gx.square().mean((1, 2, 3)), gy.square().mean((1, 2, 3)), (gx * gy).mean((1, 2, 3))
    tr = jxx + jyy + EPS
    disc = ((jxx - jyy).square() + 4 * jxy.square()).sqrt()
    l2 = (tr - disc) / 2
    return disc / tr, l2 / (tr / 2)


def _blockiness(y: Tensor, dim: int) -> Tensor:
    d = (y.narrow(dim, 1, y.shape[dim] - 1) - y.narrow(dim, 0, y.shape[dim] - 1)).abs()
    n = (d.shape[dim] // 8) * 8
    if n < 16:
        return torch.zeros(y.shape[0], device=y.device, dtype=y.dtype)
    d = d.narrow(dim, 0, n)
    # Offset 7 is the step from pixel 8k+7 to 8k+8: across a JPEG block boundary.
    blocks = d.unflatten(dim, (n // 8, 8))
    per_offset = blocks.mean((1, 2, 3)) if dim == 3 else blocks.mean((1, 2, 4))
    return torch.log((per_offset[:, 7] + EPS) / (per_offset[:, :7].mean(1) + EPS))


def _ghost(y: Tensor) -> Tensor:
    """Largest isolated peak of the normalised band-pass autocorrelation at lags GHOST_MIN..GHOST_MAX."""
    band = _gauss(y, 0.7) - _gauss(y, 2.5)
    band = band - band.mean((2, 3), keepdim=True)
    h, w = band.shape[-2:]
    spec = torch.fft.rfft2(band, s=(2 * h, 2 * w))  # zero padding: no wrap-around correlation
    ac = torch.fft.irfft2(spec.abs().square(), s=(2 * h, 2 * w))[:, 0]
    ac = ac / (ac[:, :1, :1] + EPS)
    m = GHOST_MAX + 2
    ac = torch.roll(ac, (m, m), dims=(1, 2))[:, : 2 * m + 1, : 2 * m + 1]  # lags -m..m, zero lag at the centre
    # Neighbours two lags away: a ridge (a long straight edge) has some as high, an isolated ghost none.
    nb = torch.stack([torch.roll(ac, (dy, dx), dims=(1, 2)) for dy in (-2, 0, 2) for dx in (-2, 0, 2)
                      if (dy, dx) != (0, 0)]).amax(0)
    prominence = ac - nb
    r = torch.arange(-m, m + 1, device=y.device, dtype=y.dtype)
    rad = (r.view(-1, 1).square() + r.view(1, -1).square()).sqrt()
    ring = (rad >= GHOST_MIN) & (rad <= GHOST_MAX)
    return prominence[:, ring].amax(1)


def features(images: Tensor) -> Tensor:
    """(B, len(FEATURES)) float32 statistics of a batch (B, 3, H, W) in [0, 1] (H, W >= 16)."""
    if not (isinstance(images, Tensor) and images.dim() == 4 and images.shape[1] == 3):
        raise ValueError(f"images must be a batch (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
    if min(images.shape[-2:]) < 16:
        raise ValueError(f"images must be at least 16x16 pixels, got {tuple(images.shape[-2:])}")
    x = images.detach().float().clamp(0, 1)
    y = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    flat = y.flatten(1)

    lap = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], device=x.device).view(1, 1, 3, 3)
    resp = F.conv2d(y, lap).abs().flatten(1)
    noise = torch.log(resp.median(1).values * math.sqrt(math.pi / 2) / 6 + 1e-4)

    gx1, gy1 = _grad(y, 1)
    gx2, gy2 = _grad(y, 2)
    e1 = (gx1.square() + gy1.square()).mean((1, 2, 3))
    e2 = (gx2.square() + gy2.square()).mean((1, 2, 3))
    sharp = torch.log((e1 + EPS) / (e2 + EPS))
    lapl = F.conv2d(y, torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], device=x.device).view(1, 1, 3, 3))
    lap_ratio = torch.log((lapl.square().mean((1, 2, 3)) + EPS) / (e1 + EPS))
    # The structure tensor of a lightly smoothed image: noise and JPEG edges are isotropic clutter there.
    ys = _gauss(y, 1.0)
    c1, _ = _coherence(*_grad(ys, 1))
    c2, weakest = _coherence(*_grad(ys, 2))
    min_dir = torch.log(weakest + EPS)

    contrast = torch.log(flat.std(1) + EPS)
    mean = flat.mean(1)
    p05, p95 = _quantile(flat, 0.05), _quantile(flat, 0.95)
    floor = _quantile(x.amin(1).flatten(1), 0.05)
    ch = x.mean((2, 3))
    cast_rg, cast_bg = ch[:, 0] - ch[:, 1], ch[:, 2] - ch[:, 1]
    sat = (x.amax(1) - x.amin(1)).mean((1, 2))
    cols = [noise, sharp, lap_ratio, c1, c2, min_dir, _blockiness(y, 3), _blockiness(y, 2), _ghost(y), contrast,
            mean, p05, p95, floor, cast_rg, cast_bg, sat]
    return torch.stack(cols, 1)
