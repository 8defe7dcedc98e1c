"""No-reference underwater image quality: UIQM (Panetta, Gao and Agaian 2016) and UCIQE (Yang and Sowmya 2015).

Both take RGB images (B, 3, H, W) in [0, 1] and return one value per image (B,) float64. Both measures were
defined and fitted on 8-bit images, so the images are first clipped to [0, 1] and put on the 8-bit grid
(round(255 x)), as saving them to an 8-bit file would; an image read from an 8-bit file is unchanged.

Every choice the papers leave open (block size, border handling, trimming, colour space, value range) is
written down, with its reason, in docs/metrics.md; the code below follows that page line by line.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

UIQM_WEIGHTS = (0.0282, 0.2953, 3.5753)    # c1 UICM, c2 UISM, c3 UIConM (Panetta et al. 2016)
UCIQE_WEIGHTS = (0.4680, 0.2745, 0.2576)   # c1 chroma std, c2 luminance contrast, c3 mean saturation (Yang, Sowmya)
UICM_WEIGHTS = (-0.0268, 0.1586)           # mean term, spread term
UISM_CHANNEL_WEIGHTS = (0.299, 0.587, 0.114)
PLIP_GAMMA = 1026.0                        # PLIP gamma(M) = k(M) = 1026 for 8-bit images
PLIP_K = 1026.0
BLOCK = 10                                 # EME / logAMEE block side, pixels
TRIM_DIVISOR = 10                          # alpha_L = alpha_R = 0.1: trim ceil(K/10) low and floor(K/10) high samples

# sRGB (D65) -> CIE XYZ and the D65 / 2 degree white point, as skimage.color.rgb2lab.
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.95047, 1.0, 1.08883)


class UIQMTerms(NamedTuple):
    uiqm: Tensor
    uicm: Tensor
    uism: Tensor
    uiconm: Tensor


class UCIQETerms(NamedTuple):
    uciqe: Tensor
    chroma_std: Tensor
    luminance_contrast: Tensor
    saturation_mean: Tensor


def _check_rgb(name: str, x, min_side: int = 1) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating RGB tensor (B, 3, H, W) in [0, 1], got {got}")
    if x.shape[-2] < min_side or x.shape[-1] < min_side:
        raise ValueError(f"{name} must be at least {min_side}x{min_side} pixels, got {tuple(x.shape[-2:])}")


def eight_bit(x: Tensor) -> Tensor:
    """Images in [0, 1] as float64 values 0..255 on the 8-bit grid: clip, then round(255 x)."""
    return (x.double().clamp(0.0, 1.0) * 255.0).round()


# ----------------------------------------------------------------------------------------------------- UIQM
def _uicm(v: Tensor) -> Tensor:
    """UICM of 8-bit values v (B, 3, H, W): asymmetric alpha-trimmed statistics of the RG and YB opponents."""
    r, g, b = v.unbind(1)
    rg = (r - g).flatten(1)
    yb = ((r + g) / 2 - b).flatten(1)
    K = rg.shape[1]
    low, high = -(-K // TRIM_DIVISOR), K // TRIM_DIVISOR      # T_aL = ceil(0.1 K), T_aR = floor(0.1 K), exactly
    means, variances = [], []
    for c in (rg, yb):
        # The sum of sorted samples T_aL + 1 .. K - T_aR (1-based): all of them less the T_aL smallest and the
        # T_aR largest (a partial selection is several times faster than a sort; the values are multiples of
        # 1/2, so every sum is exact and equals the sorted one).
        kept = c.sum(1) - c.topk(low, dim=1, largest=False, sorted=False).values.sum(1) \
            - c.topk(high, dim=1, largest=True, sorted=False).values.sum(1)
        mu = kept / (K - low - high)
        means.append(mu)
        variances.append((c - mu[:, None]).square().mean(1))  # over all K samples, about the trimmed mean
    w_mean, w_spread = UICM_WEIGHTS
    return w_mean * torch.sqrt(means[0] ** 2 + means[1] ** 2) + w_spread * torch.sqrt(variances[0] + variances[1])


def _block_extremes(t: Tensor) -> tuple[Tensor, Tensor]:
    """Max and min over non-overlapping BLOCK x BLOCK blocks; a partial block at the right or bottom is dropped."""
    return F.max_pool2d(t, BLOCK), -F.max_pool2d(-t, BLOCK)


def _sobel_magnitude(v: Tensor) -> Tensor:
    """|Sobel gradient| per channel, the border pixel repeated (scipy.ndimage.sobel's "reflect" at width 1)."""
    B, C, H, W = v.shape
    p = F.pad(v.reshape(B * C, 1, H, W), (1, 1, 1, 1), mode="replicate")[:, 0]
    # The separable kernels [1 2 1]^T [-1 0 1] and [-1 0 1]^T [1 2 1] as shifted adds (float64 conv2d is slow).
    smooth_y = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]          # (BC, H, W + 2)
    smooth_x = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]  # (BC, H + 2, W)
    gx = smooth_y[:, :, 2:] - smooth_y[:, :, :-2]
    gy = smooth_x[:, 2:] - smooth_x[:, :-2]
    return torch.hypot(gx, gy).reshape(B, C, H, W)


def _uism(v: Tensor) -> Tensor:
    """UISM: the luma-weighted EME of each channel's grayscale edge map (Sobel magnitude x the channel)."""
    edges = _sobel_magnitude(v) * v
    hi, lo = _block_extremes(edges)
    # log(max / min) per block; a block whose min (or max) is 0 adds 0: the log is undefined there.
    terms = torch.where(lo > 0, torch.log(hi / lo.clamp_min(torch.finfo(lo.dtype).tiny)), torch.zeros_like(hi))
    k = hi.shape[-2] * hi.shape[-1]
    eme = 2.0 / k * terms.sum((-2, -1))                       # (B, 3)
    weights = torch.tensor(UISM_CHANNEL_WEIGHTS, dtype=v.dtype, device=v.device)
    return (eme * weights).sum(1)


def _uiconm(v: Tensor) -> Tensor:
    """UIConM: logAMEE of the intensity (R + G + B) / 3 with PLIP subtraction and addition in each block."""
    intensity = v.mean(1, keepdim=True)
    hi, lo = _block_extremes(intensity)
    num = PLIP_K * (hi - lo) / (PLIP_K - lo)                 # hi (-) lo
    den = hi + lo - hi * lo / PLIP_GAMMA                     # hi (+) lo
    m = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    entropy = torch.where(m > 0, m * torch.log(m.clamp_min(torch.finfo(m.dtype).tiny)), torch.zeros_like(m))
    # AMEE is the negated block mean of m log m (an entropy, rising with contrast); docs/metrics.md says why.
    return -entropy.mean((-3, -2, -1))


def uiqm_terms(images: Tensor) -> UIQMTerms:
    """UIQM and its three terms per image (B,) float64, from one pass over the images (B, 3, H, W) in [0, 1]."""
    _check_rgb("images", images, BLOCK)
    v = eight_bit(images)
    uicm, uism, uiconm = _uicm(v), _uism(v), _uiconm(v)
    c1, c2, c3 = UIQM_WEIGHTS
    return UIQMTerms(c1 * uicm + c2 * uism + c3 * uiconm, uicm, uism, uiconm)


def uiqm(images: Tensor) -> Tensor:
    """Underwater image quality measure per image (B,) float64: 0.0282 UICM + 0.2953 UISM + 3.5753 UIConM."""
    return uiqm_terms(images).uiqm


def uicm(images: Tensor) -> Tensor:
    """Underwater image colourfulness measure per image (B,) float64."""
    _check_rgb("images", images, 1)
    if images.shape[-2] * images.shape[-1] < 2:
        raise ValueError("images must have at least 2 pixels (the trimmed mean of one pixel is empty)")
    return _uicm(eight_bit(images))


def uism(images: Tensor) -> Tensor:
    """Underwater image sharpness measure per image (B,) float64 (images at least 10x10)."""
    _check_rgb("images", images, BLOCK)
    return _uism(eight_bit(images))


def uiconm(images: Tensor) -> Tensor:
    """Underwater image contrast measure per image (B,) float64 (images at least 10x10)."""
    _check_rgb("images", images, BLOCK)
    return _uiconm(eight_bit(images))


# ---------------------------------------------------------------------------------------------------- UCIQE
def rgb_to_lab(images: Tensor) -> Tensor:
    """sRGB (B, 3, H, W) in [0, 1] -> CIELab (L in [0, 100]), D65 white, 2 degree observer; float64.

    The constants and the piecewise functions are skimage.color.rgb2lab's, so the two agree to rounding.
    """
    _check_rgb("images", images)
    x = images.double()
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = torch.tensor(_XYZ_FROM_RGB, dtype=x.dtype, device=x.device)
    white = torch.tensor(_D65_WHITE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear) / white
    f = torch.where(xyz > 0.008856, torch.pow(xyz.clamp_min(0.0), 1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def _percentile(values: Tensor, q: float) -> Tensor:
    """The q-quantile of each row, linear between order statistics (numpy.percentile's default), from a partial
    selection of the two order statistics around it (a sort of the row is several times slower)."""
    K = values.shape[1]
    pos = (K - 1) * q
    lo = int(pos)
    hi = min(lo + 1, K - 1)
    if lo < K // 2:
        below = values.topk(hi + 1, dim=1, largest=False, sorted=True).values   # ranks 0 .. hi, ascending
        a, b = below[:, lo], below[:, hi]
    else:
        above = values.topk(K - lo, dim=1, largest=True, sorted=True).values   # ranks K-1 .. lo, descending
        a, b = above[:, K - 1 - lo], above[:, K - 1 - hi]
    return a + (pos - lo) * (b - a)


def uciqe_terms(images: Tensor) -> UCIQETerms:
    """UCIQE and its three terms per image (B,) float64 for RGB images (B, 3, H, W) in [0, 1].

    In CIELab scaled as the authors' code scales it (L / 100, a / 255, b / 255): chroma C = sqrt(a^2 + b^2),
    saturation S = C / sqrt(C^2 + L^2) (0 where both are 0); terms: the standard deviation of C, the
    difference between the 99th and the 1st percentile of L, the mean of S.
    """
    _check_rgb("images", images)
    lab = rgb_to_lab(eight_bit(images) / 255.0)
    lum = (lab[:, 0] / 100.0).flatten(1)
    chroma = (torch.hypot(lab[:, 1], lab[:, 2]) / 255.0).flatten(1)
    radius = torch.hypot(chroma, lum)
    saturation = torch.where(radius > 0, chroma / radius.clamp_min(torch.finfo(radius.dtype).tiny),
                             torch.zeros_like(radius))
    chroma_std = chroma.std(1, correction=0)
    contrast = _percentile(lum, 0.99) - _percentile(lum, 0.01)
    sat_mean = saturation.mean(1)
    c1, c2, c3 = UCIQE_WEIGHTS
    return UCIQETerms(c1 * chroma_std + c2 * contrast + c3 * sat_mean, chroma_std, contrast, sat_mean)


def uciqe(images: Tensor) -> Tensor:
    """Underwater colour image quality evaluation per image (B,) float64: 0.4680 sigma_c + 0.2745 con_l
    + 0.2576 mu_s."""
    return uciqe_terms(images).uciqe
