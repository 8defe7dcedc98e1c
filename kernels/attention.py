"""Triton kernels for SPEC 2's mask-weighted K/V cross-attention (host side: launchers only).

Contract (called by ssattn.ops.attention, which chooses the path):

    forward(q, k, v, weight, key_padding_mask, scale, *, precision, deterministic) -> (out, lse)
    backward(grad_out, q, k, v, weight, key_padding_mask, out, lse, scale,
             weight_grad, *, precision, deterministic) -> (dq, dk, dv, dweight)

q (B, h, Nq, d), k (B, h, Nk, d), v (B, h, Nk, dv) with any strides (read in
place, never copied); weight (B, Nk) or None; key_padding_mask (B, Nk) bool or
None (True = padded). out (B, h, Nq, dv) in q.dtype and in q's layout when
dv == d (empty_like, as the op's fake kernel promises), written through its
strides, so a module's NCHW / channels-last view needs no copy; lse (B, h, Nq)
float32, natural log, +inf for a row whose keys are all padded (its out is 0).

precision: float32 dots "ieee", "tf32" or "tf32x3" (half inputs ignore it).
deterministic: accepted and free: the backward uses no atomics (dweight
per-head partials are summed in a fixed order). Environment:
SSATTN_AUTOTUNE=0 launches one heuristic config per shape instead of
autotuning (used by the GPU test sweep to save compile time).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from . import _attention_configs as configs
from ._attention_bwd import attn_bwd_delta_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from ._attention_fwd import attn_fwd_kernel

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
# Block sizes under the interpreter: big enough to be quick, small enough that
# the CPU tests cover full blocks and a peeled partial one.
_INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64}


# --------------------------------------------------------------------------- configs
def _bucket(n: int) -> int:
    """Autotune key for a length: its power-of-two class (capped), so results are cached per class."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 16)


def _configs(choices):
    """triton.Config list from (BLOCK_M, BLOCK_N, warps, stages); one fixed config under the interpreter."""
    if INTERPRET:  # autotune with 2+ configs fails in the interpreter
        return [triton.Config(dict(_INTERPRET_BLOCKS), num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in choices]


def _class_of(args) -> tuple[str, int]:
    """The shape class (configs.TABLE key) of a launch's arguments."""
    fp32 = args["Q"].dtype == torch.float32
    return configs.shape_class(fp32, args["PREC"], max(args["BLOCK_D"], args["BLOCK_DV"]))


def _prune(kind, configs_in, named_args, **kwargs):
    """The class's own configs (configs.TABLE), without those far larger than the problem."""
    if INTERPRET:
        return configs_in
    args = {**named_args, **kwargs}
    allowed = configs.TABLE[kind][_class_of(args)]
    nq, nk = args["Nq"], args["Nk"]
    by_key = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs_in}
    ours = [by_key[key] for key in allowed if key in by_key]  # in the class's order: the heuristic first
    fits = [c for c in ours
            if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(nq))
            and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(nk))]
    return fits or ours[:1]


# Compile time grows with every config (each is built on first use, ~2-10 s on a busy host),
# so each class keeps a short list (kernels/_attention_configs.py).
_KEYS = ["NQ_BUCKET", "NK_BUCKET", "HEAD_DIM", "HEAD_DV", "HAS_W", "HAS_KPM", "PREC"]


def _tuned(kind, kernel, keys):
    prune = {"early_config_prune": functools.partial(_prune, kind)}
    return triton.autotune(_configs(configs.choices(kind)), key=keys, prune_configs_by=prune)(kernel)


_fwd_tuned = _tuned("fwd", attn_fwd_kernel, _KEYS)
_dkdv_tuned = _tuned("dkdv", attn_bwd_dkdv_kernel, _KEYS + ["WEIGHT_GRAD"])
_dq_tuned = _tuned("dq", attn_bwd_dq_kernel, _KEYS)


def _heuristic(kind: str, cls: tuple[str, int]) -> dict:
    """The one config per shape class used with SSATTN_AUTOTUNE=0: the first of the class's list."""
    if INTERPRET:
        return dict(_INTERPRET_BLOCKS)
    bm, bn, w, s = configs.TABLE[kind][cls][0]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}


def _autotune_enabled() -> bool:
    return os.environ.get("SSATTN_AUTOTUNE", "1") not in ("0", "false", "False")


def _launch(tuned, raw, kind, grid_fn, args, meta):
    if _autotune_enabled():
        tuned[lambda m: grid_fn(m["BLOCK_M"], m["BLOCK_N"])](*args, **meta)
    else:
        cfg = _heuristic(kind, _class_of({"Q": args[0], **meta}))
        raw[grid_fn(cfg["BLOCK_M"], cfg["BLOCK_N"])](*args, **meta, **cfg)


# --------------------------------------------------------------------------- checks
def _check(q, k, v, weight, kpm):
    if q.dtype not in _DTYPES:
        raise TypeError(
            f"the Triton attention kernels take float16, bfloat16 or float32 q, k, v; got {q.dtype} "
            "(use backend='reference')"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if q.device.type != "cuda" and not (INTERPRET and q.device.type == "cpu"):
        raise RuntimeError(f"the Triton attention kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), got q on {q.device}")
    d, dv = q.shape[-1], v.shape[-1]
    if d > _MAX_HEAD_DIM or dv > _MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {_MAX_HEAD_DIM} are supported, got q/k {d} and v {dv}")
    B, h = q.shape[:2]
    if B * h > 65535:
        raise ValueError(f"batch * heads must be at most 65535 (CUDA grid), got {B} * {h}")
    if weight is not None and not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    if kpm is not None and kpm.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor, got {kpm.dtype}")


def _common(q, k, v, weight, kpm, scale, precision):
    fp32 = q.dtype == torch.float32
    w = weight if weight is not None else q  # dummy pointer when absent (never read)
    pad = kpm.view(torch.uint8) if kpm is not None else q
    d, dv = q.shape[-1], v.shape[-1]
    meta = dict(
        HEAD_DIM=d, HEAD_DV=dv,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        HAS_W=weight is not None, HAS_KPM=kpm is not None, NEG=scale < 0,
        PREC=precision if fp32 else "tf32",  # ignored by half-precision dots
        DOT_F32=INTERPRET and q.dtype == torch.bfloat16,  # the interpreter's bf16 dot is wrong
    )
    wstr = (w.stride(0), w.stride(1)) if weight is not None else (0, 0)
    pstr = (pad.stride(0), pad.stride(1)) if kpm is not None else (0, 0)
    return w, pad, wstr, pstr, meta, fp32


# --------------------------------------------------------------------------- forward / backward
def forward(q, k, v, weight, key_padding_mask, scale, *, precision="ieee", deterministic=False):
    _check(q, k, v, weight, key_padding_mask)
    B, H, Nq, _ = q.shape
    Nk, dv = k.shape[2], v.shape[-1]
    scale = float(scale)
    out = torch.empty_like(q) if q.shape[-1] == dv else torch.empty((B, H, Nq, dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("inf"))
        return out, lse
    w, pad, wstr, pstr, meta, fp32 = _common(q, k, v, weight, key_padding_mask, scale, precision)
    args = (
        q, k, v, w, pad, out, lse, *q.stride(), *k.stride(), *v.stride(), *wstr, *pstr, *out.stride(), *lse.stride(),
        H, Nq, Nk, abs(scale) * LOG2E, _bucket(Nq), _bucket(Nk),
    )
    _launch(_fwd_tuned, attn_fwd_kernel, "fwd", lambda bm, bn: (triton.cdiv(Nq, bm), B * H), args, meta)
    return out, lse


def backward(grad_out, q, k, v, weight, key_padding_mask, out, lse, scale, weight_grad, *, precision="ieee",
             deterministic=False):
    _check(q, k, v, weight, key_padding_mask)
    B, H, Nq, _ = q.shape
    Nk, dv = k.shape[2], v.shape[-1]
    scale = float(scale)
    # Same layouts as the op's fake kernel (empty_like keeps a dense input's strides).
    dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    weight_grad = bool(weight_grad) and weight is not None
    if dq.numel() == 0 or dk.numel() == 0:
        dq.zero_(), dk.zero_(), dvv.zero_()
        dw = weight.new_zeros(weight.shape) if weight_grad else q.new_empty(0)
        return dq, dk, dvv, dw
    w, pad, wstr, pstr, meta, fp32 = _common(q, k, v, weight, key_padding_mask, scale, precision)
    bdv = meta["BLOCK_DV"]

    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    bm_delta = 64 if bdv <= 64 else 32
    attn_bwd_delta_kernel[(triton.cdiv(Nq, bm_delta), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Nq,
        HEAD_DV=dv, BLOCK_DV=bdv, BLOCK_M=bm_delta,
    )

    dw_part = torch.empty((B, H, Nk), device=q.device, dtype=torch.float32) if weight_grad else delta
    common = (
        *q.stride(), *k.stride(), *v.stride(), *wstr, *pstr, *grad_out.stride(), *lse.stride(),
    )
    args = (
        q, k, v, w, pad, grad_out, lse, delta, dk, dvv, dw_part, *common, *dk.stride(), *dvv.stride(),
        H, Nq, Nk, abs(scale) * LOG2E, scale, _bucket(Nq), _bucket(Nk),
    )
    _launch(_dkdv_tuned, attn_bwd_dkdv_kernel, "dkdv", lambda bm, bn: (triton.cdiv(Nk, bn), B * H), args,
            {**meta, "WEIGHT_GRAD": weight_grad})
    args = (
        q, k, v, w, pad, grad_out, lse, delta, dq, *common, *dq.stride(),
        H, Nq, Nk, abs(scale) * LOG2E, abs(scale), _bucket(Nq), _bucket(Nk),
    )
    _launch(_dq_tuned, attn_bwd_dq_kernel, "dq", lambda bm, bn: (triton.cdiv(Nq, bm), B * H), args, meta)

    # Fixed-order sum over heads: deterministic without atomics.
    dw = dw_part.sum(1).to(weight.dtype) if weight_grad else q.new_empty(0)
    return dq, dk, dvv, dw
