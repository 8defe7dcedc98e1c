"""No-reference underwater image quality: UIQM (Panetta, Gao and Agaian 2016) and UCIQE (Yang and Sowmya 2015).

Both take RGB images (B, 3, H, W) in [0, 1] and return one value per image (B,) float64. Both measures were
defined and fitted on 8-bit images, so the images are first clipped to [0, 1] and put on the 8-bit grid
(round(255 x)), as saving them to an 8-bit file would; an image read from an 8-bit file is unchanged.

Every choice the papers leave open (block size, border handling, trimming, colour space, value range) is
written down, with its reason, in docs/metrics.md; the code below follows that page line by line.

`convention` picks whose choices: "paper" (the default) is the papers' definitions as that page reads them;
"funiegan" (UIQM) and "authors" (UCIQE) are the choices of the public code most published numbers come
from, FUnIE-GAN's Evaluation/uqim_utils.py and the UCIQE authors' UCIQE.py, so that those numbers can be
reproduced (docs/metrics.md, "Reproducing published numbers").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .opencv_lab import rgb_to_lab_opencv8

UIQM_WEIGHTS = (0.0282, 0.2953, 3.5753)    # c1 UICM, c2 UISM, c3 UIConM (Panetta et al. 2016)
UCIQE_WEIGHTS = (0.4680, 0.2745, 0.2576)   # c1 chroma std, c2 luminance contrast, c3 mean saturation (Yang, Sowmya)
UICM_WEIGHTS = (-0.0268, 0.1586)           # mean term, spread term
UISM_CHANNEL_WEIGHTS = (0.299, 0.587, 0.114)
PLIP_GAMMA = 1026.0                        # PLIP gamma(M) = k(M) = 1026 for 8-bit images
PLIP_K = 1026.0
BLOCK = 10                                 # EME / logAMEE block side, pixels
TRIM_DIVISOR = 10                          # alpha_L = alpha_R = 0.1: trim ceil(K/10) low and floor(K/10) high samples
UIQM_CONVENTIONS = ("paper", "funiegan")
UCIQE_CONVENTIONS = ("paper", "authors")
FUNIEGAN_UISM_CHANNEL_WEIGHTS = (0.299, 0.587, 0.144)   # uqim_utils.py's lambda_B is 0.144 (the luma weight: 0.114)
HISTOGRAM_BINS = 65536                     # UCIQE.py's bins for its luminance (float, so never its 256)

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


def _check_convention(convention, choices: tuple[str, ...]) -> None:
    if not isinstance(convention, str) or convention not in choices:
        raise ValueError(f"convention must be one of {', '.join(map(repr, choices))}, got {convention!r}")


def eight_bit(x: Tensor) -> Tensor:
    """Images in [0, 1] as float64 values 0..255 on the 8-bit grid: clip, then round(255 x)."""
    return (x.double().clamp(0.0, 1.0) * 255.0).round()


# ----------------------------------------------------------------------------------------------------- UIQM
def _uicm(v: Tensor, convention: str = "paper") -> Tensor:
    """UICM of 8-bit values v (B, 3, H, W): asymmetric alpha-trimmed statistics of the RG and YB opponents."""
    r, g, b = v.unbind(1)
    rg = (r - g).flatten(1)
    yb = ((r + g) / 2 - b).flatten(1)
    K = rg.shape[1]
    if convention == "paper":
        low, high = -(-K // TRIM_DIVISOR), K // TRIM_DIVISOR  # T_aL = ceil(0.1 K), T_aR = floor(0.1 K), exactly
        dropped_low = low
    else:
        # uqim_utils.py: T_aL = math.ceil(0.1 * K) in floating point, and the 0-based slice [T_aL + 1 : K - T_aR]
        # keeps one sample fewer than the K - T_aL - T_aR it divides by.
        low, high = math.ceil(0.1 * K), math.floor(0.1 * K)
        dropped_low = low + 1
    means, variances = [], []
    for c in (rg, yb):
        # The sum of the sorted samples kept: all of them less the dropped_low smallest and the T_aR largest (a
        # partial selection is several times faster than a sort; the values are multiples of 1/2, so every sum
        # is exact and equals the sorted one).
        kept = c.sum(1) - c.topk(dropped_low, dim=1, largest=False, sorted=False).values.sum(1) \
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


def _uism(v: Tensor, convention: str = "paper") -> Tensor:
    """UISM: the luma-weighted EME of each channel's grayscale edge map (Sobel magnitude x the channel).

    uqim_utils.py rescales each channel's magnitude to max 255 first: a positive factor per channel, which
    cancels in I_max / I_min and in the zero tests (a channel without any gradient, where that code divides
    0 by 0 and gives NaN, adds 0 here in both conventions)."""
    edges = _sobel_magnitude(v) * v
    hi, lo = _block_extremes(edges)
    # log(max / min) per block; a block whose min (or max) is 0 adds 0: the log is undefined there.
    terms = torch.where(lo > 0, torch.log(hi / lo.clamp_min(torch.finfo(lo.dtype).tiny)), torch.zeros_like(hi))
    k = hi.shape[-2] * hi.shape[-1]
    eme = 2.0 / k * terms.sum((-2, -1))                       # (B, 3)
    lambdas = UISM_CHANNEL_WEIGHTS if convention == "paper" else FUNIEGAN_UISM_CHANNEL_WEIGHTS
    weights = torch.tensor(lambdas, dtype=v.dtype, device=v.device)
    return (eme * weights).sum(1)


def _uiconm(v: Tensor, convention: str = "paper") -> Tensor:
    """UIConM: logAMEE of the intensity (R + G + B) / 3 with PLIP subtraction and addition in each block."""
    if convention == "funiegan":
        return _uiconm_funiegan(v)
    intensity = v.mean(1, keepdim=True)
    hi, lo = _block_extremes(intensity)
    num = PLIP_K * (hi - lo) / (PLIP_K - lo)                 # hi (-) lo
    den = hi + lo - hi * lo / PLIP_GAMMA                     # hi (+) lo
    m = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    entropy = torch.where(m > 0, m * torch.log(m.clamp_min(torch.finfo(m.dtype).tiny)), torch.zeros_like(m))
    # AMEE is the negated block mean of m log m (an entropy, rising with contrast); docs/metrics.md says why.
    return -entropy.mean((-3, -2, -1))


def _uiconm_funiegan(v: Tensor) -> Tensor:
    """uqim_utils.py's _uiconm: per 10x10 block, the max and min over its pixels and all three channels,
    m = (max - min) / (max + min) without PLIP, and -(1 / (k1 k2)) * sum of m log m (blocks with m = 0 or
    max + min = 0 add 0; k1 k2 whole blocks, Python 2's integer division, which that code was written for)."""
    hi, lo = _block_extremes(v)
    hi, lo = hi.amax(1), lo.amin(1)                          # over the channels too
    top, bot = hi - lo, hi + lo
    ok = (top > 0) & (bot > 0)
    m = torch.where(ok, top / bot.clamp_min(torch.finfo(bot.dtype).tiny), torch.ones_like(bot))
    return -(m * torch.log(m)).mean((-2, -1))                # m = 1 where skipped: 1 log 1 = 0


def uiqm_terms(images: Tensor, convention: str = "paper") -> UIQMTerms:
    """UIQM and its three terms per image (B,) float64, from one pass over the images (B, 3, H, W) in [0, 1].

    convention: "paper" (Panetta et al.'s definitions, docs/metrics.md) or "funiegan" (the choices of
    FUnIE-GAN's Evaluation/uqim_utils.py, which most published UIQM values come from)."""
    _check_convention(convention, UIQM_CONVENTIONS)
    _check_rgb("images", images, BLOCK)
    v = eight_bit(images)
    uicm, uism, uiconm = _uicm(v, convention), _uism(v, convention), _uiconm(v, convention)
    c1, c2, c3 = UIQM_WEIGHTS
    return UIQMTerms(c1 * uicm + c2 * uism + c3 * uiconm, uicm, uism, uiconm)


def uiqm(images: Tensor, convention: str = "paper") -> Tensor:
    """Underwater image quality measure per image (B,) float64: 0.0282 UICM + 0.2953 UISM + 3.5753 UIConM.
    convention: "paper" or "funiegan" (see uiqm_terms)."""
    return uiqm_terms(images, convention).uiqm


def uicm(images: Tensor, convention: str = "paper") -> Tensor:
    """Underwater image colourfulness measure per image (B,) float64; convention "paper" or "funiegan"."""
    _check_convention(convention, UIQM_CONVENTIONS)
    _check_rgb("images", images, 1)
    if images.shape[-2] * images.shape[-1] < 2:
        raise ValueError("images must have at least 2 pixels (the trimmed mean of one pixel is empty)")
    return _uicm(eight_bit(images), convention)


def uism(images: Tensor, convention: str = "paper") -> Tensor:
    """Underwater image sharpness measure per image (B,) float64 (images at least 10x10); convention "paper"
    or "funiegan"."""
    _check_convention(convention, UIQM_CONVENTIONS)
    _check_rgb("images", images, BLOCK)
    return _uism(eight_bit(images), convention)


def uiconm(images: Tensor, convention: str = "paper") -> Tensor:
    """Underwater image contrast measure per image (B,) float64 (images at least 10x10); convention "paper"
    or "funiegan"."""
    _check_convention(convention, UIQM_CONVENTIONS)
    _check_rgb("images", images, BLOCK)
    return _uiconm(eight_bit(images), convention)


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


def _histogram_bin(x: Tensor, first: Tensor, last: Tensor, bins: int) -> Tensor:
    """The bin of each x (B,) in numpy.histogram(values, bins) of a row whose min and max are first and last:
    numpy's own arithmetic (edges i * step + first as numpy.linspace makes them, its index estimate and its
    one-step corrections), so the index is numpy's to the last bit."""
    flat = first == last
    first = torch.where(flat, first - 0.5, first)            # numpy widens an empty range by 0.5 each side
    last = torch.where(flat, last + 0.5, last)
    step = (last - first) / bins

    def edge(i: Tensor) -> Tensor:
        return torch.where(i == bins, last, i.double() * step + first)

    i = ((x - first) / (last - first) * bins).long()
    i = torch.where(i == bins, i - 1, i)
    i = torch.where(x < edge(i), i - 1, i)
    return torch.where((x >= edge(i + 1)) & (i != bins - 1), i + 1, i)


def _uciqe_authors(images: Tensor) -> UCIQETerms:
    """UCIQE.py (the UCIQE authors' code): OpenCV's 8-bit Lab over 255, with a and b keeping their +128
    offset; C = sqrt(a^2 + b^2), S = C / sqrt(C^2 + L^2); sigma_c = sqrt(mean |1 - (mean C / C)^2|);
    con_l from a 65536-bin numpy.histogram of L over its own min..max: the first bin whose cumulative
    fraction is > 0.01 and the first >= 0.99, their difference over 65535."""
    lab = rgb_to_lab_opencv8(eight_bit(images)).flatten(2)   # (B, 3, N) integers 0..255
    lum, a, b = (lab[:, i].double() / 255 for i in range(3))
    chroma = torch.sqrt(a.square() + b.square())               # > 0: a* and b* of sRGB colours are above -128
    saturation = chroma / torch.sqrt(chroma.square() + lum.square())
    chroma_term = torch.sqrt((1 - (chroma.mean(1, keepdim=True) / chroma).square()).abs().mean(1))
    # The bins' cumulative counts reach those fractions at the order statistics of ranks N // 100 and
    # ceil(0.99 N) - 1 (0-based): cdf > 0.01 is 100 c > N and cdf >= 0.99 is 100 c >= 99 N, exactly. L takes
    # 256 levels, so the order statistics come from each image's level counts.
    B, N = lum.shape
    levels = lab[:, 0]
    counts = torch.bincount((levels + 256 * torch.arange(B, device=levels.device)[:, None]).flatten(),
                            minlength=256 * B).view(B, 256).cumsum(1)

    def order_statistic(rank: int) -> Tensor:
        return (counts <= rank).sum(1).double() / 255          # the first level whose count exceeds rank

    lo, hi = order_statistic(N // 100), order_statistic(-(-99 * N // 100) - 1)
    first, last = order_statistic(0), order_statistic(N - 1)
    i_low, i_high = (_histogram_bin(q, first, last, HISTOGRAM_BINS) for q in (lo, hi))
    contrast = (i_high - 1).double() / (HISTOGRAM_BINS - 1) - (i_low - 1).double() / (HISTOGRAM_BINS - 1)
    sat_mean = saturation.mean(1)
    c1, c2, c3 = UCIQE_WEIGHTS
    return UCIQETerms(c1 * chroma_term + c2 * contrast + c3 * sat_mean, chroma_term, contrast, sat_mean)


def uciqe_terms(images: Tensor, convention: str = "paper") -> UCIQETerms:
    """UCIQE and its three terms per image (B,) float64 for RGB images (B, 3, H, W) in [0, 1].

    convention "paper": in CIELab scaled as the authors' code scales it (L / 100, a / 255, b / 255): chroma
    C = sqrt(a^2 + b^2), saturation S = C / sqrt(C^2 + L^2) (0 where both are 0); terms: the standard
    deviation of C, the difference between the 99th and the 1st percentile of L, the mean of S.
    convention "authors": every choice of the authors' released UCIQE.py (docs/metrics.md), which most
    published UCIQE values come from; chroma_std then holds that code's sqrt(mean |1 - (mean C / C)^2|).
    """
    _check_convention(convention, UCIQE_CONVENTIONS)
    _check_rgb("images", images)
    if convention == "authors":
        return _uciqe_authors(images)
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


def uciqe(images: Tensor, convention: str = "paper") -> Tensor:
    """Underwater colour image quality evaluation per image (B,) float64: 0.4680 sigma_c + 0.2745 con_l
    + 0.2576 mu_s. convention: "paper" or "authors" (see uciqe_terms)."""
    return uciqe_terms(images, convention).uciqe
