"""Guidance-map pyramid of SPEC 1 in one Triton launch.

Every level is evaluated directly from the sharpened grid S' (gh, gw): an
area average of a bilinear upsample is separable, so level l of image b is

    M_l = Wy_l @ S'_b @ Wx_l^T,   Wy_l (H_l, gh), Wx_l (W_l, gw),

where row i of Wy_l is the mean, over the adaptive-pool window of output row
i, of the bilinear (align_corners=False) row weights (Wy_0 is the bilinear
matrix itself). These small matrices depend only on (grid, sizes); they are
built once on the host in float64, rounded to float32 and cached on the
device. Per call the work is then a single launch: a 1-D grid of B * G
programs, G per image. Each program computes its image's S' in registers
(cosine similarity, min-max, sharpen, renormalise; cheap and repeated per
program so that no intermediate is stored), then walks the work items of
every level assigned to it round-robin: an item is a BN-wide column strip
of up to RCH rows; T = S' @ Wx^T (gh x BN) is computed once per item and
reused for each BM-row tile. Only the requested maps are written; M_sem
is never materialised unless it is requested (it always is, as sizes[0]).

Launcher options (keyword arguments of guidance_pyramid): out_dtype (default
the scores' dtype), precision "ieee" | "tf32x3" (float32 dots), and tuning
knobs ppi (programs per image), tile (BM, BN) and rows (rows per work item).

The kernel takes float16, bfloat16 and float32 inputs and grids of up to
64 x 64 cells (after padding each side to a power of two): `fits` tells, and
the dispatch layer (ssattn.ops.pyramid) sends anything else to the reference.
A NaN or infinite score makes all of that
image's maps NaN; the reference agrees for NaN and -inf (min/max spread
them), while for +inf it gives NaN only around the infinite cell. The
weight cache is filled on the first call per configuration: make one call
before capturing a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

MAX_GRID_CELLS = 64 * 64  # S' lives in registers (padded to powers of two): larger grids take the PyTorch path


# --------------------------------------------------------------------------- kernel
@triton.jit
def _pow(t, gamma, LIBDEVICE: tl.constexpr):
    """t ** gamma for t >= 0 (0 at 0): libdevice's powf on the GPU; the interpreter has no libdevice."""
    if LIBDEVICE:
        p = libdevice.pow(t, tl.zeros_like(t) + gamma)
    else:
        p = tl.exp2(gamma * tl.log2(tl.where(t > 0.0, t, 1.0)))
    return tl.where(t > 0.0, p, 0.0)


@triton.jit
def _sharpened_grid(
    src_ptr, text_ptr, b, gh, gw, cf,
    s_sb, s_s1, s_s2, t_sb, t_sc,
    gamma, delta, eps,
    HAS_TEXT: tl.constexpr, RENORM: tl.constexpr,
    GH: tl.constexpr, GW: tl.constexpr, BK: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    """S' of image b as a (GH, GW) float32 block, zero outside (gh, gw); all NaN if a score is not finite."""
    ys = tl.arange(0, GH)
    xs = tl.arange(0, GW)
    inside = (ys[:, None] < gh) & (xs[None, :] < gw)
    b64 = b.to(tl.int64)
    if HAS_TEXT:
        # Cosine similarity: (sum f t) / (max(|f|, eps) max(|t|, eps)), channels in chunks of BK.
        patch = ys[:, None] * gw + xs[None, :]
        fptr = src_ptr + b64 * s_sb + patch.to(tl.int64) * s_s1
        dot = tl.zeros((GH, GW), dtype=tl.float32)
        ff = tl.zeros((GH, GW), dtype=tl.float32)
        tt = tl.zeros((BK,), dtype=tl.float32)
        for k0 in range(0, cf, BK):
            ks = k0 + tl.arange(0, BK)
            km = ks < cf
            f = tl.load(
                fptr[:, :, None] + ks[None, None, :].to(tl.int64) * s_s2,
                mask=inside[:, :, None] & km[None, None, :], other=0.0,
            ).to(tl.float32)
            t = tl.load(text_ptr + b64 * t_sb + ks.to(tl.int64) * t_sc, mask=km, other=0.0).to(tl.float32)
            dot += tl.sum(f * t[None, None, :], axis=2)
            ff += tl.sum(f * f, axis=2)
            tt += t * t
        tnorm = tl.maximum(tl.sqrt_rn(tl.sum(tt, axis=0)), eps)
        fnorm = tl.maximum(tl.sqrt_rn(ff), eps)
        s = tl.div_rn(dot, fnorm * tnorm)  # IEEE division: "/" is the approximate div.full on NVIDIA
    else:
        s = tl.load(
            src_ptr + b64 * s_sb + ys[:, None].to(tl.int64) * s_s1 + xs[None, :].to(tl.int64) * s_s2,
            mask=inside, other=0.0,
        ).to(tl.float32)
    # min/max reductions drop NaN on the GPU: count non-finite scores explicitly.
    bad = tl.sum(tl.where(inside & ((s != s) | (tl.abs(s) == float("inf"))), 1, 0), axis=1)
    bad = tl.sum(bad, axis=0)
    lo = tl.min(tl.min(tl.where(inside, s, float("inf")), axis=1), axis=0)
    hi = tl.max(tl.max(tl.where(inside, s, float("-inf")), axis=1), axis=0)
    rng = hi - lo
    flat = rng == 0.0
    n = tl.where(flat, 0.0, tl.div_rn(s - lo, tl.where(flat, 1.0, rng)))
    t = tl.maximum(n - delta, 0.0)
    sp = _pow(t, gamma, LIBDEVICE)
    if RENORM:
        # The peak of S' sits where n == (hi - lo) / (hi - lo) == 1 exactly: no reduction needed.
        # Same expression as t at n = 1 (scalar constants may take another precision in the interpreter).
        peak = _pow(tl.maximum(tl.full((1, 1), 1.0, tl.float32) - delta, 0.0), gamma, LIBDEVICE)
        sp = tl.where(flat, sp, tl.div_rn(sp, peak))
    sp = tl.where(inside, sp, 0.0)
    return tl.where(bad > 0, float("nan"), sp)


@triton.jit
def _pyramid_kernel(
    src_ptr, text_ptr, wy_ptr, wx_ptr, outs, HS, WS, WYOFF, WXOFF,
    gh, gw, cf, s_sb, s_s1, s_s2, t_sb, t_sc,
    gamma, delta, eps, G, RCH,
    NLEV: tl.constexpr, HAS_TEXT: tl.constexpr, RENORM: tl.constexpr,
    GH: tl.constexpr, GW: tl.constexpr, BK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    sp = _sharpened_grid(
        src_ptr, text_ptr, b, gh, gw, cf, s_sb, s_s1, s_s2, t_sb, t_sc,
        gamma, delta, eps, HAS_TEXT, RENORM, GH, GW, BK, LIBDEVICE,
    )
    ys = tl.arange(0, GH)
    xs = tl.arange(0, GW)
    b64 = b.to(tl.int64)
    item0 = 0  # index of the level's first work item in the image's item sequence
    for l in tl.static_range(NLEV):
        H = HS[l]
        W = WS[l]
        n_c = tl.cdiv(W, BN)
        n_items = n_c * tl.cdiv(H, RCH)
        out = outs[l] + b64 * H * W
        # Items of this image go round-robin over its G programs, continuing across levels.
        first = (g - item0 % G + G) % G
        for it in range(first, n_items, G):
            cols = (it % n_c) * BN + tl.arange(0, BN)
            cmask = cols < W
            wxt = tl.load(wx_ptr + (WXOFF[l] + cols)[None, :] * GW + xs[:, None], mask=cmask[None, :], other=0.0)
            tcol = tl.dot(sp, wxt, input_precision=PREC)  # (GH, BN)
            r_start = (it // n_c) * RCH
            r_end = tl.minimum(r_start + RCH, H)
            for r0 in range(r_start, r_end, BM):
                rows = r0 + tl.arange(0, BM)
                rmask = rows < H
                wy = tl.load(wy_ptr + (WYOFF[l] + rows)[:, None] * GH + ys[None, :], mask=rmask[:, None], other=0.0)
                m = tl.dot(wy, tcol, input_precision=PREC)  # (BM, BN)
                tl.store(
                    out + rows[:, None].to(tl.int64) * W + cols[None, :],
                    m.to(out.dtype.element_ty), mask=rmask[:, None] & cmask[None, :],
                )
        item0 += n_items


# --------------------------------------------------------------------------- weights (host, cached)
def interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of 1-D linear interpolation, align_corners=False (as F.interpolate)."""
    a = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        lam = min(max(src - i0, 0.0), 1.0)
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        a[i, i0] += 1.0 - lam
        a[i, i1] += lam
    return a


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of adaptive average pooling (overlapping windows when not integer)."""
    p = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = ((i + 1) * n_in + n_out - 1) // n_out
        p[i, start:end] = 1.0 / (end - start)
    return p


def level_matrices(n_grid: int, n_image: int, n_levels) -> list[np.ndarray]:
    """Per level, the (n_l, n_grid) float64 weights from the grid to that level along one axis."""
    a = interp_matrix(n_grid, n_image)
    return [a if n == n_image else area_matrix(n_image, n) @ a for n in n_levels]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_WEIGHTS: dict = {}


def _weights(gh, gw, sizes, GH, GW, device):
    """Concatenated, zero-padded float32 Wy (sum H_l, GH) and Wx (sum W_l, GW) with row offsets, cached."""
    key = (gh, gw, tuple(sizes), GH, GW, str(device))
    hit = _WEIGHTS.get(key)
    if hit is not None:
        return hit
    H, W = sizes[0]
    mats = []
    for n_grid, n_image, levels, width in ((gh, H, [s[0] for s in sizes], GH), (gw, W, [s[1] for s in sizes], GW)):
        blocks = level_matrices(n_grid, n_image, levels)
        cat = np.zeros((sum(levels), width), dtype=np.float32)
        offs, row = [], 0
        for blk in blocks:
            cat[row:row + blk.shape[0], :n_grid] = blk
            offs.append(row)
            row += blk.shape[0]
        mats.append((torch.from_numpy(cat).to(device), tuple(offs)))
    if len(_WEIGHTS) > 64:  # a bounded cache: configurations are few in practice
        _WEIGHTS.clear()
    _WEIGHTS[key] = (mats[0][0], mats[1][0], mats[0][1], mats[1][1])
    return _WEIGHTS[key]


# --------------------------------------------------------------------------- host entry
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PRECISIONS = ("ieee", "tf32x3")


def fits(gh: int, gw: int) -> bool:
    """Whether a (gh, gw) grid fits the kernel's registers (larger grids need the PyTorch formulas)."""
    return max(16, _pow2(gh)) * max(16, _pow2(gw)) <= MAX_GRID_CELLS


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_per_image(B: int, n_items: int, device, has_text: bool, ppi) -> int:
    if ppi is not None:
        return max(1, min(ppi, n_items))
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: recomputing S' only costs time
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    # Each program recomputes S'; from patch features that rereads the image's features (from L2),
    # so the features path uses about one program per SM and the grid path two.
    target = sms if has_text else 2 * sms
    return max(1, min(n_items, -(-target // B)))


def guidance_pyramid(scores, text, grid_size, sizes, gamma, delta, renormalize, *, eps, out_dtype=None,
                     precision="ieee", ppi=None, tile=None, rows=None):
    """SPEC 1 maps, one (B, 1, H_l, W_l) tensor per size (see the module docstring); eps guards the norms."""
    out_dtype = out_dtype or scores.dtype
    gh, gw = (int(v) for v in grid_size)
    sizes = [(int(h), int(w)) for h, w in sizes]
    has_text = text is not None
    B = scores.shape[0]
    if has_text:
        if scores.dim() != 3 or scores.shape[1] != gh * gw:
            raise ValueError(f"scores must be patch features (B, {gh * gw}, Cf) for grid_size {(gh, gw)}, got {tuple(scores.shape)}")
    elif scores.dim() != 3 or tuple(scores.shape[1:]) != (gh, gw):
        raise ValueError(f"scores must be a (B, {gh}, {gw}) grid for grid_size {(gh, gw)}, got {tuple(scores.shape)}")
    if scores.dtype not in DTYPES or (has_text and text.dtype not in DTYPES) or not fits(gh, gw):
        raise ValueError(f"the pyramid kernel takes {DTYPES} inputs and grids that fit (fits()), "
                         f"got {scores.dtype} scores and a {gh}x{gw} grid")
    if out_dtype not in DTYPES:
        raise ValueError(f"out_dtype must be one of {DTYPES}, got {out_dtype}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if tile is not None:
        bm, bn = (int(v) for v in tile)
        if bm < 16 or bn < 16 or _pow2(bm) != bm or _pow2(bn) != bn:
            raise ValueError(f"tile {tile}: both sides must be powers of two >= 16")
    GH, GW = max(16, _pow2(gh)), max(16, _pow2(gw))

    device = scores.device
    wy, wx, wyoff, wxoff = _weights(gh, gw, sizes, GH, GW, device)
    outs = [torch.empty((B, 1, h, w), dtype=out_dtype, device=device) for h, w in sizes]
    interp = device.type != "cuda"
    cells = GH * GW
    # Tiles sized so that nothing spills on sm_90 with Triton 3.6, 3.8 and 3.9 (ptxas -v; see
    # benchmarks/compile_reports/): 24x24 grids 168 registers at 64x32 tiles and 4 warps (64x64
    # spills 12 B under 3.9's ptxas), 64x64 grids 128 registers at 32x32 tiles and 8 warps.
    bm, bn = tile or ((128, 128) if interp else (64, 32) if cells <= 1024 else (32, 32))
    rch = rows or 4 * bm
    rch = -(-rch // bm) * bm  # a whole number of row tiles
    n_items = sum(-(-w // bn) * -(-h // rch) for h, w in sizes)
    G = _programs_per_image(B, n_items, device, has_text, ppi)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _launch(scores, text, wy, wx, outs, sizes, wyoff, wxoff, gh, gw, gamma, delta, renormalize, eps, G, rch,
                GH, GW, bm, bn, precision, not interp)
    return outs


def _launch(scores, text, wy, wx, outs, sizes, wyoff, wxoff, gh, gw, gamma, delta, renormalize, eps, G, rch,
            GH, GW, bm, bn, prec, libdevice_pow):
    B, cells, has_text = scores.shape[0], GH * GW, text is not None
    if has_text:
        cf = scores.shape[2]
        t_sb, t_sc = (0, text.stride(0)) if text.dim() == 1 else (text.stride(0), text.stride(1))
        bk = min(_pow2(cf), max(4, 8192 // cells))  # >= 4 channels per patch and load, registers permitting
    else:
        cf, t_sb, t_sc, bk = 1, 0, 0, 1
    src_strides = scores.stride()
    warps = 4 if cells <= 1024 and bm * bn <= 4096 else 8
    _pyramid_kernel[(B * G,)](
        scores, text if has_text else scores, wy, wx, tuple(outs),
        tuple(h for h, _ in sizes), tuple(w for _, w in sizes), wyoff, wxoff,
        gh, gw, cf, src_strides[0], src_strides[1], src_strides[2], t_sb, t_sc,
        float(gamma), float(delta), float(eps), G, rch,
        NLEV=len(sizes), HAS_TEXT=has_text, RENORM=bool(renormalize),
        GH=GH, GW=GW, BK=bk, BM=bm, BN=bn, PREC=prec, LIBDEVICE=libdevice_pow, num_warps=warps,
    )
