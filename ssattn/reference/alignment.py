"""docs/operations.md section 3: the semantic alignment loss, in its two forms.

form="paper":      sum_l w_l (||F (1 - M)||^2 - eta <F, M>)
form="normalized": the same formula applied to U = F_b / max(rms(F_b), eps) per sample
                   (unit RMS over the sample's C*H*W elements at that level), so the
                   loss does not depend on the scale of F and is bounded below.
"""

from __future__ import annotations

import torch

FORMS = ("paper", "normalized")

# The RMS below which a sample is not rescaled further (U = F / NORM_EPS): an all-zero
# sample gives U = 0, a term of 0 and a finite gradient. Shared with csrc/alignment.h.
NORM_EPS = 1e-6


def unit_rms(f: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """F_b / max(rms(F_b), eps) per sample b of a (B, C, H, W) tensor (autograd).

    The clamp acts on the mean square, not on its root, so an all-zero sample
    has a finite gradient (the root's derivative at 0 is infinite).
    """
    n = f[0].numel() if f.shape[0] else 0
    if n == 0:
        return f
    mean_square = f.square().sum(dim=(1, 2, 3), keepdim=True) / n
    return f / mean_square.clamp_min(eps * eps).sqrt()


def alignment_loss(features, maps, *, eta: float = 1.0, weights=None, reduction: str = "mean",
                   form: str = "paper") -> torch.Tensor:
    """Scalar loss; half-precision inputs accumulate in float32 and give a float32 loss.

    reduction="mean" divides each level's term by that level's F.numel() (an empty
    level contributes 0), for both forms.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    if weights is None:
        weights = [1.0] * len(features)
    total = None
    for f, m, w in zip(features, maps, weights):
        dtype = torch.promote_types(torch.promote_types(f.dtype, m.dtype), torch.float32)
        f32, m32 = f.to(dtype), m.to(dtype)
        if form == "normalized":
            f32 = unit_rms(f32)
        term = (f32 * (1.0 - m32)).square().sum() - eta * (f32 * m32).sum()
        if reduction == "mean":
            term = term / max(f.numel(), 1)  # an empty level's sum is 0: so is its mean
        term = w * term
        total = term if total is None else total + term
    return total
