"""SPEC 3: sum_l w_l (||F (1 - M)||^2 - eta <F, M>), optionally per-level means."""

from __future__ import annotations

import torch


def alignment_loss(features, maps, *, eta: float = 1.0, weights=None, reduction: str = "mean") -> torch.Tensor:
    """Scalar loss; half-precision inputs accumulate in float32 and give a float32 loss."""
    if weights is None:
        weights = [1.0] * len(features)
    total = None
    for f, m, w in zip(features, maps, weights):
        dtype = torch.promote_types(torch.promote_types(f.dtype, m.dtype), torch.float32)
        f32, m32 = f.to(dtype), m.to(dtype)
        term = (f32 * (1.0 - m32)).square().sum() - eta * (f32 * m32).sum()
        if reduction == "mean":
            term = term / f.numel()
        term = w * term
        total = term if total is None else total + term
    return total
