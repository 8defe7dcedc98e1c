"""Triton kernels for SPEC 2's mask-weighted K/V cross-attention (host side: launchers only).

Contract (called by ssattn.ops.attention, which chooses the path):

    forward(q, k, v, weight, key_padding_mask, scale, *, precision, deterministic) -> (out, stats)
    backward(grad_out, q, k, v, weight, key_padding_mask, out, stats, scale,
             weight_grad, *, precision, deterministic) -> (dq, dk, dv, dweight)

q (B, h, Nq, d), k (B, h, Nk, d), v (B, h, Nk, dv) with any strides (read in
place, never copied); weight (B, Nk) or None; key_padding_mask (B, Nk) bool or
None (True = padded). out (B, h, Nq, dv) in q.dtype and in q's layout when
dv == d (empty_like, as the op's fake kernel promises), written through its
strides, so a module's NCHW / channels-last view needs no copy. stats
(B, h, Nq, 2) float32: the softmax statistics in base 2, [..., 0] the row max
of the base-2 logits scale*log2(e)*m_j<q_i, k_j>, [..., 1] log2 of the row
sum of exp2(logit - max); both +inf for a row whose keys are all padded (its
out is 0), so that the backward's exp2 gives P = 0 there.

precision: float32 dots "ieee", "tf32" or "tf32x3" (half inputs ignore it).
deterministic: True runs the two-pass backward (dk/dv per key block, then dq
per query block; dweight's per-head partials summed in a fixed order) with the
heuristic config, so two processes give the same bits. False runs the
single-pass backward: every exponential is computed once, and dq is added
into a float32 buffer by atomics (its bits vary run to run). Which is faster
is for the GPU run to show (benchmarks/gpu_check.sh times both).

Environment:
  SSATTN_AUTOTUNE=1   autotune the block sizes (cached per shape class, head
                      dims, options and layout); the default launches one
                      heuristic config per shape class
                      (ssattn/kernels/_attention_configs.py, first entry).
  SSATTN_FAST_EXP2=1  fp16/bf16 forward at head dims <= 64: packed
                      half-precision exponentials (ex2.approx.f16x2, two per
                      special-function slot). GPU only; not under the interpreter.
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
_FAST_EXP2_MAX_D = 64
# Block sizes under the interpreter: big enough to be quick, small enough that
# the CPU tests cover full blocks and a peeled partial one.
_INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64}


# --------------------------------------------------------------------------- configs
def zero_gradients(q, k, v, weight, weight_grad: bool):
    """(dq, dk, dv, dweight) of an empty problem (no query or no key): zeros in the gradients' layouts."""
    dw = weight.new_zeros(weight.shape) if weight_grad else q.new_empty(0)
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dw


def _bucket(n: int) -> int:
    """Autotune key for a length: its power-of-two class (capped), so results are cached per class."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 16)


def layout_code(*tensors) -> int:
    """Autotune key for the memory layout: per tensor, which of its last two dims has stride 1 (0: d, 1: N, 2: none)."""
    code = 0
    for t in tensors:
        code = code * 3 + (0 if t.stride(-1) == 1 else 1 if t.stride(-2) == 1 else 2)
    return code


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
# so each class keeps a short list (ssattn/kernels/_attention_configs.py).
_KEYS = ["NQ_BUCKET", "NK_BUCKET", "LAYOUT", "HEAD_DIM", "HEAD_DV", "HAS_W", "HAS_KPM", "PREC"]


def _tuned(kind, kernel, keys, reset_to_zero=None):
    prune = {"early_config_prune": functools.partial(_prune, kind)}
    return triton.autotune(_configs(configs.choices(kind)), key=keys, prune_configs_by=prune,
                           reset_to_zero=reset_to_zero)(kernel)


_fwd_tuned = _tuned("fwd", attn_fwd_kernel, _KEYS + ["FAST_EXP2"])
_dkdv_tuned = _tuned("dkdv", attn_bwd_dkdv_kernel, _KEYS + ["WEIGHT_GRAD", "FUSED_DQ"])
# The single-pass kernel adds into DQ: every timed trial starts from zeros again.
_fused_tuned = _tuned("fused", attn_bwd_dkdv_kernel, _KEYS + ["WEIGHT_GRAD", "FUSED_DQ"], reset_to_zero=["DQ"])
_dq_tuned = _tuned("dq", attn_bwd_dq_kernel, _KEYS)


def _heuristic(kind: str, cls: tuple[str, int]) -> dict:
    """The one config per shape class used by default: the first of the class's list."""
    if INTERPRET:
        return dict(_INTERPRET_BLOCKS)
    bm, bn, w, s = configs.TABLE[kind][cls][0]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}


def autotune_enabled(deterministic: bool = False) -> bool:
    """SSATTN_AUTOTUNE=1 opts in; deterministic mode pins the heuristic config (same bits in every process)."""
    return not deterministic and os.environ.get("SSATTN_AUTOTUNE", "0") == "1"


def fast_exp2_enabled(dtype: torch.dtype, block_d: int) -> bool:
    """SSATTN_FAST_EXP2=1, for fp16/bf16 at padded head dims <= 64, compiled (not interpreted)."""
    return (os.environ.get("SSATTN_FAST_EXP2", "0") == "1" and dtype in (torch.float16, torch.bfloat16)
            and block_d <= _FAST_EXP2_MAX_D and not INTERPRET)


def _launch(tuned, raw, kind, grid_fn, args, meta, deterministic=False):
    if autotune_enabled(deterministic):
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


def _common(q, k, v, weight, kpm, precision):
    fp32 = q.dtype == torch.float32
    w = weight if weight is not None else q  # dummy pointer when absent (never read)
    pad = kpm.view(torch.uint8) if kpm is not None else q
    d, dv = q.shape[-1], v.shape[-1]
    meta = dict(
        HEAD_DIM=d, HEAD_DV=dv,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        HAS_W=weight is not None, HAS_KPM=kpm is not None,
        PREC=precision if fp32 else "tf32",  # ignored by half-precision dots
        # Under the interpreter: bf16 dots upcast (its bf16 dot is wrong), float32 dots in float64 (_attention_fwd.mm).
        INTERP_DOT=(1 if q.dtype == torch.bfloat16 else 2 if fp32 else 0) if INTERPRET else 0,
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
    stats = torch.empty((B, H, Nq, 2), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        stats.fill_(float("inf"))
        return out, stats
    w, pad, wstr, pstr, meta, fp32 = _common(q, k, v, weight, key_padding_mask, precision)
    meta["FAST_EXP2"] = fast_exp2_enabled(q.dtype, max(meta["BLOCK_D"], meta["BLOCK_DV"]))
    args = (
        q, k, v, w, pad, out, stats, *q.stride(), *k.stride(), *v.stride(), *wstr, *pstr, *out.stride(),
        *stats.stride()[:3], H, Nq, Nk, scale * LOG2E, _bucket(Nq), _bucket(Nk), layout_code(q, k, v),
    )
    _launch(_fwd_tuned, attn_fwd_kernel, "fwd", lambda bm, bn: (triton.cdiv(Nq, bm), B * H), args, meta,
            deterministic)
    return out, stats


def backward(grad_out, q, k, v, weight, key_padding_mask, out, stats, scale, weight_grad, *, precision="ieee",
             deterministic=False):
    _check(q, k, v, weight, key_padding_mask)
    B, H, Nq, _ = q.shape
    Nk, dv = k.shape[2], v.shape[-1]
    scale = float(scale)
    # Same layouts as the op's fake kernel (empty_like keeps a dense input's strides).
    dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    weight_grad = bool(weight_grad) and weight is not None
    if dq.numel() == 0 or dk.numel() == 0:
        return zero_gradients(q, k, v, weight, weight_grad)
    w, pad, wstr, pstr, meta, fp32 = _common(q, k, v, weight, key_padding_mask, precision)
    bdv = meta["BLOCK_DV"]

    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    bm_delta = 64 if bdv <= 64 else 32
    attn_bwd_delta_kernel[(triton.cdiv(Nq, bm_delta), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Nq,
        HEAD_DV=dv, BLOCK_DV=bdv, BLOCK_M=bm_delta,
    )

    dw_part = torch.empty((B, H, Nk), device=q.device, dtype=torch.float32) if weight_grad else delta
    # The single pass adds dq into float32 zeros (contiguous); the two-pass path writes dq directly.
    dq_acc = q.new_zeros(q.shape, dtype=torch.float32) if not deterministic else dq
    common = (
        *q.stride(), *k.stride(), *v.stride(), *wstr, *pstr, *grad_out.stride(), *stats.stride()[:3],
    )
    keys = (_bucket(Nq), _bucket(Nk), layout_code(q, k, v))
    args = (
        q, k, v, w, pad, grad_out, stats, delta, dk, dvv, dw_part, dq_acc, *common, *dk.stride(), *dvv.stride(),
        *dq_acc.stride(), H, Nq, Nk, scale * LOG2E, scale, *keys,
    )
    kind, tuned = ("dkdv", _dkdv_tuned) if deterministic else ("fused", _fused_tuned)
    _launch(tuned, attn_bwd_dkdv_kernel, kind, lambda bm, bn: (triton.cdiv(Nk, bn), B * H), args,
            {**meta, "WEIGHT_GRAD": weight_grad, "FUSED_DQ": not deterministic}, deterministic)
    if deterministic:
        args = (
            q, k, v, w, pad, grad_out, stats, delta, dq, *common, *dq.stride(),
            H, Nq, Nk, scale * LOG2E, scale, *keys,
        )
        _launch(_dq_tuned, attn_bwd_dq_kernel, "dq", lambda bm, bn: (triton.cdiv(Nq, bm), B * H), args, meta,
                deterministic)
    else:
        dq.copy_(dq_acc)

    # Fixed-order sum over heads: deterministic without atomics.
    dw = dw_part.sum(1).to(weight.dtype) if weight_grad else q.new_empty(0)
    return dq, dk, dvv, dw
