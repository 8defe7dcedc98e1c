"""SPEC 2 in the flash-attention formulation, in PyTorch: a numerical peer for tests only.

The kernels' backward forms dS = P (dP - delta) with delta = rowsum(do * o), which
leaves a rounding residue where the reference's autograd cancels exactly (one-hot
rows). Tests that probe that regime compare the kernels with this formulation in
the same dtype. It is not a second implementation of the library: ssattn's only
PyTorch formulation is ssattn.reference.
"""

from __future__ import annotations

import torch


def _scores(q, k, weight, kpm, scale):
    kw = k if weight is None else k * weight.to(k.dtype)[:, None, :, None]
    s = torch.matmul(q, kw.transpose(-2, -1)) * scale
    if kpm is not None:
        s = s.masked_fill(kpm[:, None, None, :], float("-inf"))
    return kw, s


def _forward(q, k, v, weight, kpm, scale):
    _, s = _scores(q, k, weight, kpm, scale)
    row_max = s.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    e = torch.exp(s - torch.where(empty, torch.zeros_like(row_max), row_max))
    row_sum = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(empty, torch.ones_like(row_sum), row_sum)
    lse = torch.where(empty, torch.full_like(row_max, float("inf")), row_max + torch.log(row_sum)).squeeze(-1)
    vw = v if weight is None else v * weight.to(v.dtype)[:, None, :, None]
    return torch.matmul(p, vw), lse


def _backward(do, q, k, v, w, kpm, o, lse, scale):
    kw, s = _scores(q, k, w, kpm, scale)
    p = torch.exp(s - lse.to(s.dtype).unsqueeze(-1))
    vw = v if w is None else v * w.to(v.dtype)[:, None, :, None]
    dvw = torch.matmul(p.transpose(-2, -1), do)
    ds = p * (torch.matmul(do, vw.transpose(-2, -1)) - (do * o).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kw) * scale
    dkw = torch.matmul(ds.transpose(-2, -1), q) * scale
    if w is None:
        return dq, dkw, dvw, None
    wk = w.to(k.dtype)[:, None, :, None]
    dw = ((dkw * k).sum(-1) + (dvw * v).sum(-1)).sum(1)
    return dq, dkw * wk, dvw * wk, dw


class FlashFormulation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, kpm, scale):
        out, lse = _forward(q, k, v, w, kpm, scale)
        ctx.save_for_backward(q, k, v, w, out, lse)
        ctx.kpm, ctx.scale = kpm, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, w, out, lse = ctx.saved_tensors
        dq, dk, dv, dw = _backward(do, q, k, v, w, ctx.kpm, out, lse, ctx.scale)
        return dq, dk, dv, dw, None, None


def flash_formulation(q, k, v, w, kpm, scale):
    return FlashFormulation.apply(q, k, v, w, kpm, scale)
