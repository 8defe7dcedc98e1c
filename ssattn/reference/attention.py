"""SPEC 2: softmax(scale * m_j <q_i, k_j>) over keys, applied to m_j v_j."""

from __future__ import annotations

import torch


def masked_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, h, Nq, d), k (B, h, Nk, d), v (B, h, Nk, dv) -> (B, h, Nq, dv).

    weight (B, Nk) multiplies keys and values; key_padding_mask (B, Nk) True
    removes a key. A batch whose keys are all padded gives an all-zero output
    (and zero gradients), never NaN.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if weight is not None:
        w = weight.to(k.dtype)[:, None, :, None]
        k = k * w
        v = v * w
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if key_padding_mask is not None:
        padded = key_padding_mask[:, None, None, :]
        empty = key_padding_mask.all(dim=-1)[:, None, None, None]
        scores = scores.masked_fill(padded, float("-inf"))
        # Fully padded batches: finite scores so softmax is defined, then zero probabilities.
        scores = scores.masked_fill(empty, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v)
