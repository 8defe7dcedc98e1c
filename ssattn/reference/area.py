"""Area resize of maps (SPEC 1 step 5): F.adaptive_avg_pool2d, also under torch.compile with dynamic shapes.

Inductor's lowering of adaptive_avg_pool2d fails when the sizes are symbolic
("cannot determine truth value of Relational", an upstream bug in the torch
versions we support), which breaks the second call of a compiled module at
another input size. While compiling, the same average is written as two
matrix products with the pooling windows' weights (the separable form the
Triton pyramid kernel uses): row i of the (n_out, n_in) matrix is
1 / (end - start) on the window [floor(i n_in / n_out), ceil((i + 1) n_in / n_out)),
the windows of adaptive_avg_pool2d, overlapping when the ratio is not an
integer. Eager calls run adaptive_avg_pool2d itself, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def area_matrix(n_in, n_out, dtype: torch.dtype, device) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D adaptive average pooling; sizes may be symbolic."""
    i = torch.arange(n_out, device=device)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    j = torch.arange(n_in, device=device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


def area_resize(x: torch.Tensor, size, *, separable: bool | None = None) -> torch.Tensor:
    """x (..., H, W) area-averaged to size (h, w), as F.adaptive_avg_pool2d(x, size).

    separable: None (default) uses the matrix form only while torch.compile traces;
    True / False force it on or off (tests compare the two).
    """
    h, w = size
    if separable is None:
        separable = torch.compiler.is_compiling()
    if not separable:
        return F.adaptive_avg_pool2d(x, (h, w))
    H, W = x.shape[-2:]
    # Half inputs average in float32, as adaptive_avg_pool2d accumulates them.
    compute = torch.promote_types(x.dtype, torch.float32)
    ah = area_matrix(H, h, compute, x.device)
    aw = area_matrix(W, w, compute, x.device)
    return torch.matmul(torch.matmul(ah, x.to(compute)), aw.transpose(0, 1)).to(x.dtype)
