"""Head views of image features, shared by the attention modules of every room.

An image feature (B, h*d, H, W) is seen as h heads of H*W tokens (B, h, H*W, d)
without a copy, whether it is NCHW or channels-last; the attention output,
which keeps q's layout, goes back through a 1x1 output projection.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def image_heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    """(B, h*d, H, W) -> (B, h, H*W, d) as a view (NCHW and channels-last alike)."""
    B, _, H, W = x.shape
    return x.view(B, heads, head_dim, H * W).transpose(-1, -2)


def token_heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    """(B, L, h*d) -> (B, h, L, d) as a view (e.g. a Linear projection of word features)."""
    B, L, _ = x.shape
    return x.view(B, L, heads, head_dim).transpose(1, 2)


def project_image_out(proj: nn.Conv2d, out: Tensor, B: int, H: int, W: int) -> Tensor:
    """A 1x1 output projection applied to an attention output (B, h, H*W, d): (B, C_out, H, W)."""
    inner = out.shape[1] * out.shape[-1]
    flat = out.transpose(-1, -2).reshape(B, inner, H * W)
    if not torch.compiler.is_compiling():
        # out has q's layout, so this is a view in the feature's memory format (no copy).
        return proj(flat.view(B, inner, H, W))
    # Inductor with dynamic shapes fails on a 4-D conv input saved for backward (it cannot
    # order its symbolic channels-last strides, e.g. 8*H*W against 8): the same 1x1 conv as a matmul.
    w = proj.weight.view(proj.out_channels, inner)
    y = torch.matmul(w, flat)
    if proj.bias is not None:
        y = y + proj.bias[:, None]
    return y.view(B, proj.out_channels, H, W)


def residual_add(x: Tensor, update: Tensor) -> Tensor:
    """x + update in x's dtype (a bf16 update under autocast is converted by the add in passing)."""
    if torch.promote_types(x.dtype, update.dtype) == x.dtype:
        return x + update
    return x + update.to(x.dtype)
