"""OpenCV's 8-bit sRGB -> CIELab conversion (`cv2.cvtColor(img, cv2.COLOR_RGB2LAB)` on uint8), bit for bit.

UCIQE's "authors" convention (ssattn.metrics.underwater) computes on this Lab, as the authors' released code
does. OpenCV converts 8-bit images with integer arithmetic on lookup tables (imgproc/src/color_lab.cpp,
RGB2Lab_b; the tables built with its softfloat library since 3.4, so every platform gets the same bytes):

- a 256-entry table of the sRGB decoding, 2040 x gamma(i / 255) rounded (3 fractional bits);
- X, Y, Z as integer dot products with the sRGB matrix over the D65 white (0.950456, 1, 1.088754), scaled by
  2^12 and rounded, then shifted back by 12 bits with rounding;
- a 3072-entry table of f(t) (the CIELab cube root, linear below 216/24389) scaled by 2^15; its cube root is
  Turkowski's rational approximation, whose mantissa softfloat truncates to float32's 24 bits;
- L = 255/100 L*, a = a* + 128, b = b* + 128, each rounded and saturated to 0..255.

The result equals OpenCV 4.14 and 5.1 on all 2^24 colours (tests/test_metrics_conventions.py checks it
against cv2 when it is installed, and against a NumPy transcription always).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

LAB_SHIFT = 12           # fixed-point bits of the XYZ coefficients
LAB_SHIFT2 = 15          # fixed-point bits of the cube-root table (LAB_SHIFT + 3 bits of the gamma table)
CBRT_TABLE_SIZE = 3072   # 256 * 3 / 2 * 8
_SRGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
                (0.212671, 0.715160, 0.072169),
                (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.950456, 1.0, 1.088754)   # OpenCV's D65 (skimage's is 0.95047, 1, 1.08883)


def _turkowski_cbrt(x: np.ndarray) -> np.ndarray:
    """softfloat's cbrt of float32 values >= 0 as float64: a quartic rational approximation on the mantissa
    scaled into [0.125, 1), its result truncated to 24 significant bits."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.int64)
    ex = ((bits >> 23) & 255) - 127
    shx = np.fmod(ex, 3)                      # C's %, truncating toward zero
    shx = np.where(shx >= 0, shx - 3, shx)
    ex = (ex - shx) // 3 - 1                  # exact: ex - shx is a multiple of 3
    v = (1.0 + (bits & 0x7FFFFF) / 2.0 ** 23) * np.exp2(shx.astype(np.float64))
    v = ((((45.2548339756803022511987494 * v + 192.2798368355061050458134625) * v
           + 119.1654824285581628956914143) * v + 13.43250139086239872172837314) * v
         + 0.1636161226585754240958355063) / \
        ((((14.80884093219134573786480845 * v + 151.9714051044435648658557668) * v
           + 168.5254414101568283957668343) * v + 33.9905941350215598754191872) * v + 1.0)
    out = np.floor(v * 2.0 ** 24) / 2.0 ** 24 * np.exp2((ex + 1).astype(np.float64))
    return np.where(bits == 0, 0.0, out)


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[Tensor, Tensor, tuple[tuple[int, ...], ...]]:
    """(gamma table (256,), cube-root table (3072,)) int64 and the XYZ coefficients (3 x 3 ints), built as OpenCV
    builds them."""
    f32 = np.float32
    x = (np.arange(256, dtype=f32) / f32(255)).astype(np.float64)               # softfloat(i) / 255, float32
    decoded = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    gamma = np.rint(2040.0 * decoded)                                             # cvRound: half to even

    t = f32(1) / f32(2040) * np.arange(CBRT_TABLE_SIZE, dtype=f32)               # float32 products
    lthresh, lscale, lbias = f32(216) / f32(24389), f32(841) / f32(108), f32(16) / f32(116)
    linear = (t.astype(np.float64) * float(lscale) + float(lbias)).astype(f32)   # fused multiply-add, float32
    f = np.where(t < lthresh, linear.astype(np.float64), _turkowski_cbrt(t))
    cbrt = np.rint(2.0 ** LAB_SHIFT2 * f)

    coeffs = np.rint(2.0 ** LAB_SHIFT * np.array(_SRGB_TO_XYZ) / np.array(_D65_WHITE)[:, None])
    return (torch.from_numpy(gamma.astype(np.int64)), torch.from_numpy(cbrt.astype(np.int64)),
            tuple(tuple(int(c) for c in row) for row in coeffs))


def rgb_to_lab_opencv8(values: Tensor) -> Tensor:
    """8-bit RGB values (B, 3, H, W), integers 0..255 of any dtype -> OpenCV's 8-bit Lab (B, 3, H, W) int64:
    L = round(2.55 L*), a = round(a*) + 128, b = round(b*) + 128 in 0..255, as cv2.COLOR_RGB2LAB gives for
    uint8 (and cv2.COLOR_BGR2LAB for the channels reversed)."""
    gamma, cbrt, coeffs = _tables()
    r, g, b = gamma.to(values.device)[values.long()].unbind(1)                  # linear, 0..2040
    cbrt = cbrt.to(values.device)
    half = 1 << (LAB_SHIFT - 1)
    # Integer dot products written out: CUDA has no int64 matmul.
    fx, fy, fz = (cbrt[(c0 * r + c1 * g + c2 * b + half) >> LAB_SHIFT] for c0, c1, c2 in coeffs)
    half2, offset = 1 << (LAB_SHIFT2 - 1), 128 << LAB_SHIFT2
    l_scale = (116 * 255 + 50) // 100                                           # OpenCV's integer constants
    l_shift = -((16 * 255 * (1 << LAB_SHIFT2) + 50) // 100)
    L = (l_scale * fy + l_shift + half2) >> LAB_SHIFT2
    a = (500 * (fx - fy) + offset + half2) >> LAB_SHIFT2
    b_ = (200 * (fy - fz) + offset + half2) >> LAB_SHIFT2
    return torch.stack([L, a, b_], 1).clamp(0, 255)
