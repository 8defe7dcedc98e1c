"""Image quality metrics on (B, C, H, W) tensors in [0, data_range]: PSNR and SSIM, whole-image and inside a
mask (foreground), per image; and the per-class and mean IoU of label maps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(x: Tensor, y: Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating (B, C, H, W) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image (B,) in dB; identical images give +inf."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse)).float()


def _gaussian_window(sigma: float, truncate: float, dtype, device) -> Tensor:
    radius = int(truncate * sigma + 0.5)  # as scipy.ndimage / skimage
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def _check_mask(mask: Tensor, x: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0] \
            or mask.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"mask must have shape {(x.shape[0], 1, *x.shape[-2:])} (one channel, the images' size), got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")


def masked_psnr(x: Tensor, y: Tensor, mask: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR per image (B,) over the pixels where mask > 0.5 (all channels): +inf when they are identical there,
    NaN for an image whose mask is empty."""
    _check_pair(x, y)
    _check_mask(mask, x)
    m = (mask > 0.5).double()
    se = ((x.double() - y.double()).square() * m).flatten(1).sum(1)
    count = m.flatten(1).sum(1) * x.shape[1]
    mse = torch.where(count > 0, se / count.clamp_min(1), torch.full_like(se, float("nan")))
    return (10 * torch.log10(data_range ** 2 / mse)).float()


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, sigma: float = 1.5, truncate: float = 3.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Structural similarity per image (B,), Gaussian window (Wang et al. 2004).

    Same convention as skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=...): an 11x11 window,
    statistics on the valid region only (no padding), mean over channels and
    pixels. Images must be at least 11 pixels on each side.
    """
    return ssim_map(x, y, data_range, sigma, truncate, k1, k2).flatten(1).mean(1).float()


def ssim_map(x: Tensor, y: Tensor, data_range: float = 1.0, sigma: float = 1.5, truncate: float = 3.5,
             k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """SSIM per window centre (B, C, H - 2r, W - 2r), float64, r the window radius (5 by default): ssim()'s terms."""
    _check_pair(x, y)
    g = _gaussian_window(sigma, truncate, torch.float64, x.device)
    win = g.numel()
    if x.shape[-1] < win or x.shape[-2] < win:
        raise ValueError(f"ssim needs images of at least {win}x{win} pixels, got {tuple(x.shape[-2:])}")
    B, C, H, W = x.shape
    xs, ys = x.double().reshape(B * C, 1, H, W), y.double().reshape(B * C, 1, H, W)
    gh, gv = g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)

    def filt(t):
        return F.conv2d(F.conv2d(t, gh), gv)

    mx, my = filt(xs), filt(ys)
    sxx = filt(xs * xs) - mx * mx
    syy = filt(ys * ys) - my * my
    sxy = filt(xs * ys) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.reshape(B, C, s.shape[-2], s.shape[-1])


def masked_ssim(x: Tensor, y: Tensor, mask: Tensor, data_range: float = 1.0) -> Tensor:
    """SSIM per image (B,) averaged over the windows centred on mask pixels (mask > 0.5); NaN when none is."""
    _check_mask(mask, x)
    s = ssim_map(x, y, data_range)
    r = (mask.shape[-1] - s.shape[-1]) // 2
    m = (mask[..., r:mask.shape[-2] - r, r:mask.shape[-1] - r] > 0.5).double()
    count = m.flatten(1).sum(1) * s.shape[1]
    total = (s * m).flatten(1).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan"))).float()


def per_class_iou(pred: Tensor, target: Tensor, num_classes: int) -> list[float]:
    """IoU of each class c in 0..num_classes-1: |pred = c and target = c| / |pred = c or target = c|, counted
    over all pixels of all images (dataset-level, as segmentation benchmarks count it); NaN for a class absent
    from both.

    pred, target: integer label maps of the same shape, values in [0, num_classes).
    """
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.shape != target.shape:
        raise ValueError("pred and target must be label tensors of the same shape")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("pred and target must be integer label maps (threshold or argmax scores first)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    for name, t in (("pred", pred), ("target", target)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} must hold class indices in [0, {num_classes}), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
    # One joint histogram: confusion[t, p] counts pixels of true class t predicted as p.
    confusion = torch.bincount(target.flatten().long() * num_classes + pred.flatten().long(),
                               minlength=num_classes * num_classes).view(num_classes, num_classes).double()
    inter = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - inter
    return [float(i / u) if u > 0 else float("nan") for i, u in zip(inter.tolist(), union.tolist())]


def miou(pred: Tensor, target: Tensor, num_classes: int = 2) -> float:
    """Mean of per_class_iou over the classes present in pred or target (absent ones are left out)."""
    return mean_finite(per_class_iou(pred, target, num_classes))


def mean_finite(values) -> float:
    vals = [float(v) for v in values if math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")
