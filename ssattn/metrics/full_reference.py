"""Full-reference metrics on (B, C, H, W) images in [0, data_range]: PSNR and SSIM per image, over the whole image
and inside a mask (foreground).

Computed in float64; the result is float64 for float64 images and float32 otherwise. Definitions and
conventions: docs/metrics.md.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_pair(x: Tensor, y: Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating (B, C, H, W) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def _out_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (so a test can compare to 1e-7 with another float64 implementation); else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_mask(mask: Tensor, x: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0] \
            or mask.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"mask must have shape {(x.shape[0], 1, *x.shape[-2:])} (one channel, the images' size), got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image (B,) in dB, over all channels; identical images give +inf."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse)).to(_out_dtype(x))


def masked_psnr(x: Tensor, y: Tensor, mask: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR per image (B,) over the pixels where mask > 0.5 (all channels): +inf when they are identical there,
    NaN for an image whose mask is empty."""
    _check_pair(x, y)
    _check_mask(mask, x)
    m = (mask > 0.5).double()
    se = ((x.double() - y.double()).square() * m).flatten(1).sum(1)
    count = m.flatten(1).sum(1) * x.shape[1]
    mse = torch.where(count > 0, se / count.clamp_min(1), torch.full_like(se, float("nan")))
    return (10 * torch.log10(data_range ** 2 / mse)).to(_out_dtype(x))


def _gaussian_window(sigma: float, truncate: float, dtype, device) -> Tensor:
    radius = int(truncate * sigma + 0.5)  # as scipy.ndimage / skimage
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, sigma: float = 1.5, truncate: float = 3.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Structural similarity per image (B,), Gaussian window (Wang et al. 2004).

    Same convention as skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=...): an 11x11 window,
    statistics on the valid region only (no padding), mean over channels and
    pixels. Images must be at least 11 pixels on each side.
    """
    return ssim_map(x, y, data_range, sigma, truncate, k1, k2).flatten(1).mean(1).to(_out_dtype(x))


def ssim_map(x: Tensor, y: Tensor, data_range: float = 1.0, sigma: float = 1.5, truncate: float = 3.5,
             k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """SSIM per window centre (B, C, H - 2r, W - 2r), float64, r the window radius (5 by default): ssim()'s terms."""
    _check_pair(x, y)
    g = _gaussian_window(sigma, truncate, torch.float64, x.device)
    win = g.numel()
    if x.shape[-1] < win or x.shape[-2] < win:
        raise ValueError(f"ssim needs images of at least {win}x{win} pixels, got {tuple(x.shape[-2:])}")
    xs, ys = x.double(), y.double()
    taps = g.tolist()

    def filt(t):
        # The separable Gaussian as shifted multiply-adds over the valid region: in float64 on a CPU this is
        # about five times faster than conv2d (which has no fast float64 kernel), the same sums to rounding.
        for dim in (-1, -2):
            n = t.shape[dim] - win + 1
            out = t.narrow(dim, 0, n) * taps[0]
            for k in range(1, win):
                out.add_(t.narrow(dim, k, n), alpha=taps[k])
            t = out
        return t

    mx, my = filt(xs), filt(ys)
    sxx = filt(xs * xs) - mx * mx
    syy = filt(ys * ys) - my * my
    sxy = filt(xs * ys) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def masked_ssim(x: Tensor, y: Tensor, mask: Tensor, data_range: float = 1.0) -> Tensor:
    """SSIM per image (B,) averaged over the windows centred on mask pixels (mask > 0.5); NaN when none is."""
    _check_pair(x, y)
    _check_mask(mask, x)
    s = ssim_map(x, y, data_range)
    r = (mask.shape[-1] - s.shape[-1]) // 2
    m = (mask[..., r:mask.shape[-2] - r, r:mask.shape[-1] - r] > 0.5).double()
    count = m.flatten(1).sum(1) * s.shape[1]
    total = (s * m).flatten(1).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan"))).to(_out_dtype(x))
