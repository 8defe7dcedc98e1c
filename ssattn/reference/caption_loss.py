"""docs/operations.md section 4: the multi-level caption-feature loss.

    L = sum_s w_s * d(X_s, Y_s)

over pairs (X_s, Y_s) of enhanced and reference features of one space each
(any shape (..., D), X_s and Y_s alike), with one distance for all pairs:

    "l1":     mean |X - Y|                      over all elements of the pair
    "l2":     mean (X - Y)^2                    over all elements of the pair
    "cosine": mean (1 - <x, y> / (max(|x|, eps) * max(|y|, eps)))
              over the vectors x, y along the last dimension

Inputs accumulate in at least float32; the loss is float32 (float64 when a
pair is float64). An empty pair contributes 0.
"""

from __future__ import annotations

import torch

DISTANCES = ("l1", "l2", "cosine")

# The norm below which a vector is not rescaled further in the cosine distance
# (an all-zero vector has similarity 0 and a finite gradient). Shared with csrc/caption_loss.h.
COSINE_EPS = 1e-8


def pair_distance(x: torch.Tensor, y: torch.Tensor, distance: str, eps: float = COSINE_EPS) -> torch.Tensor:
    """d(X, Y) of one pair, in the accumulation dtype (at least float32)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    if x.numel() == 0:
        return (x - y).sum()  # 0, with (empty) gradients for both
    if distance == "l1":
        return (x - y).abs().mean()
    if distance == "l2":
        return (x - y).square().mean()
    if distance == "cosine":
        nx = x.norm(dim=-1).clamp_min(eps)
        ny = y.norm(dim=-1).clamp_min(eps)
        return (1.0 - (x * y).sum(dim=-1) / (nx * ny)).mean()
    raise ValueError(f"distance must be one of {list(DISTANCES)}, got {distance!r}")


def caption_feature_loss(enhanced, reference, *, distance: str = "l1", weights=None,
                         eps: float = COSINE_EPS) -> torch.Tensor:
    """sum_s w_s * d(enhanced[s], reference[s]) (autograd through both)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {list(DISTANCES)}, got {distance!r}")
    if weights is None:
        weights = [1.0] * len(enhanced)
    total = None
    for x, y, w in zip(enhanced, reference, weights):
        term = w * pair_distance(x, y, distance, eps)
        total = term if total is None else total + term
    return total
