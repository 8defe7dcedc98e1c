"""ssattn::masked_attention_fwd / _bwd: the op behind masked_cross_attention.

The "torch" implementation evaluates SPEC 2's forward and backward formulas
explicitly (float32 math for half inputs); the Triton kernels implement the
same contract: forward returns (out, lse) with lse the natural-log
log-sum-exp of each query row in float32 (float64 for float64 inputs; +inf for a row with no key, so
exp(s - lse) = 0); backward returns (dq, dk, dv, dweight), dweight empty
when not asked for.

Layouts: out takes q's memory layout (`empty_like(q)` when v's head dim is
q's), so when q is a head view of an NCHW or channels-last projection, out
seen as (B, h*d, H, W) is a view in the same format: the module's path has
no copy. Gradients take their input's layout; grad_out is read as it comes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backends import kernel_module


def _opmath(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is kept in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_like(q: Tensor, dv: int) -> Tensor:
    """The uninitialised output (B, h, Nq, dv): q's layout when dv == d, else contiguous."""
    if q.shape[-1] == dv:
        return torch.empty_like(q)
    return q.new_empty((*q.shape[:-1], dv))


def _scores(q, k, weight, kpm, scale):
    """Weighted keys and masked scores (B, h, Nq, Nk) in compute precision."""
    kw = k if weight is None else k * weight.to(k.dtype)[:, None, :, None]
    s = torch.matmul(q, kw.transpose(-2, -1)) * scale
    if kpm is not None:
        s = s.masked_fill(kpm[:, None, None, :], float("-inf"))
    return kw, s


def torch_forward(q, k, v, weight, kpm, scale, options=""):
    q_in, out_dtype = q, q.dtype
    q, k, v = _opmath(q), _opmath(k), _opmath(v)
    weight = None if weight is None else _opmath(weight)
    _, s = _scores(q, k, weight, kpm, scale)
    # Normalise as a flash kernel does: exp(s - rowmax) / rowsum, exact for large logits
    # (exp(s - lse) would lose the low bits of a large lse).
    row_max = s.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)  # a row with no key
    e = torch.exp(s - torch.where(empty, torch.zeros_like(row_max), row_max))
    row_sum = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(empty, torch.ones_like(row_sum), row_sum)
    lse = torch.where(empty, torch.full_like(row_max, float("inf")), row_max + torch.log(row_sum)).squeeze(-1)
    vw = v if weight is None else v * weight.to(v.dtype)[:, None, :, None]
    out = _into(torch.matmul(p, vw), out_like(q_in, v.shape[-1]))
    return out, lse.to(lse_dtype(out_dtype))


def torch_backward(grad_out, q, k, v, weight, kpm, out, lse, scale, weight_grad, options=""):
    q_in, k_in, v_in = q, k, v
    q, k, v, do, o = (_opmath(t) for t in (q, k, v, grad_out, out))
    w = None if weight is None else _opmath(weight)
    kw, s = _scores(q, k, w, kpm, scale)
    p = torch.exp(s - lse.to(s.dtype).unsqueeze(-1))
    vw = v if w is None else v * w.to(v.dtype)[:, None, :, None]
    dvw = torch.matmul(p.transpose(-2, -1), do)
    dp = torch.matmul(do, vw.transpose(-2, -1))
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kw) * scale
    dkw = torch.matmul(ds.transpose(-2, -1), q) * scale
    if w is None:
        dk, dv = dkw, dvw
        dweight = q.new_empty(0)
    else:
        wk = w.to(k.dtype)[:, None, :, None]
        dk, dv = dkw * wk, dvw * wk
        if weight_grad:
            # dm_j = sum_h sum_i dS_ij scale <q_i,k_j> + P_ij <do_i,v_j>  (SPEC 2)
            dweight = ((dkw * k).sum(-1) + (dvw * v).sum(-1)).sum(1).to(weight.dtype)
        else:
            dweight = q.new_empty(0)
    return (_into(dq, torch.empty_like(q_in)), _into(dk, torch.empty_like(k_in)),
            _into(dv, torch.empty_like(v_in)), dweight)


def _into(result: Tensor, target: Tensor) -> Tensor:
    """result in target's dtype and strides (those the fake kernel promises); a copy only when they differ."""
    if result.stride() == target.stride() and result.dtype == target.dtype:
        return result
    return target.copy_(result)


def _implementation(impl: str):
    """(forward, backward, options) for an impl string such as "torch" or "triton:tf32"."""
    name, _, options = impl.partition(":")
    if name == "torch":
        return torch_forward, torch_backward, options
    if name == "triton":
        mod = kernel_module("attention")
        if mod is None:
            raise RuntimeError("ssattn: the Triton attention kernels are not available")
        return mod.forward, mod.backward, options
    raise ValueError(f"unknown attention implementation {impl!r}")


@torch.library.custom_op("ssattn::masked_attention_fwd", mutates_args=())
def masked_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, weight: Optional[Tensor], key_padding_mask: Optional[Tensor],
    scale: float, impl: str,
) -> tuple[Tensor, Tensor]:
    forward, _, options = _implementation(impl)
    return forward(q, k, v, weight, key_padding_mask, scale, options)


@masked_attention_fwd.register_fake
def _(q, k, v, weight, key_padding_mask, scale, impl):
    B, h, nq, _ = q.shape
    out = out_like(q, v.shape[-1])
    lse = q.new_empty((B, h, nq), dtype=lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("ssattn::masked_attention_bwd", mutates_args=())
def masked_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, weight: Optional[Tensor],
    key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor, scale: float, weight_grad: bool, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, backward, options = _implementation(impl)
    dq, dk, dv, dw = backward(grad_out, q, k, v, weight, key_padding_mask, out, lse, scale, weight_grad, options)
    return dq, dk, dv, dw


@masked_attention_bwd.register_fake
def _(grad_out, q, k, v, weight, key_padding_mask, out, lse, scale, weight_grad, impl):
    dw = weight.new_empty(weight.shape) if (weight is not None and weight_grad) else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dw


def _setup_context(ctx, inputs, output):
    q, k, v, weight, kpm, scale, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, weight, kpm, out, lse)
    ctx.scale, ctx.impl = scale, impl


def _backward(ctx, grad_out, grad_lse):
    q, k, v, weight, kpm, out, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    weight_grad = weight is not None and need[3]
    dq, dk, dv, dw = torch.ops.ssattn.masked_attention_bwd(
        grad_out, q, k, v, weight, kpm, out, lse, ctx.scale, weight_grad, ctx.impl,
    )
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        dw if weight_grad else None,
        None, None, None,
    )


masked_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
