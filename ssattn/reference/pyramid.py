"""SPEC 1: similarity grid -> min-max -> sharpen -> bilinear upsample -> area pyramid."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .area import area_resize

# Norm guard of the cosine similarity; the fused kernel uses the same constant.
NORM_EPS = 1e-8


def similarity_grid(features: torch.Tensor, text: torch.Tensor, grid_size) -> torch.Tensor:
    """Cosine similarity of each patch feature with the text feature.

    features (B, gh*gw, Cf), text (B, Cf) or (Cf,) -> (B, gh, gw).
    """
    gh, gw = grid_size
    if text.dim() == 1:
        text = text.unsqueeze(0).expand(features.shape[0], -1)
    f = features / features.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    t = text / text.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    s = (f * t.unsqueeze(1)).sum(-1)
    return s.reshape(features.shape[0], gh, gw)


def normalize_minmax(s: torch.Tensor) -> torch.Tensor:
    """Per-image (s - min) / (max - min) over the last two dims; a constant grid gives 0."""
    lo = s.amin(dim=(-2, -1), keepdim=True)
    hi = s.amax(dim=(-2, -1), keepdim=True)
    rng = hi - lo
    flat = rng == 0
    # Divide by 1 where the range is 0 so neither value nor gradient becomes NaN.
    return torch.where(flat, torch.zeros_like(s), (s - lo) / torch.where(flat, torch.ones_like(rng), rng))


def sharpen(n: torch.Tensor, gamma: float, delta: float, renormalize: bool = False) -> torch.Tensor:
    """max(0, n - delta) ** gamma, optionally rescaled so each image's max is 1."""
    s = (n - delta).clamp_min(0.0) ** gamma
    if renormalize:
        peak = s.amax(dim=(-2, -1), keepdim=True)
        s = torch.where(peak > 0, s / torch.where(peak > 0, peak, torch.ones_like(peak)), s)
    return s


def guidance_pyramid(
    scores: torch.Tensor,
    sizes,
    *,
    gamma: float = 2.0,
    delta: float = 0.2,
    text: torch.Tensor | None = None,
    grid_size=None,
    renormalize: bool = False,
) -> list[torch.Tensor]:
    """Return one (B, 1, H_l, W_l) map per size; the first is M_sem at sizes[0]."""
    out_dtype = scores.dtype
    # Computed in float32 at least, whichever of scores and text is half: NORM_EPS
    # underflows in fp16 (a zero text would give 0/0), and normalisation,
    # interpolation and pow lose too much there.
    compute = torch.promote_types(out_dtype, torch.float32)
    if text is not None:
        compute = torch.promote_types(compute, text.dtype)
        text = text.to(compute)
    scores = scores.to(compute)
    if text is not None:
        scores = similarity_grid(scores, text, grid_size)
    grid = sharpen(normalize_minmax(scores), gamma, delta, renormalize).unsqueeze(1)
    m_sem = F.interpolate(grid, size=tuple(sizes[0]), mode="bilinear", align_corners=False)
    maps = [m_sem]
    for size in sizes[1:]:
        maps.append(area_resize(m_sem, tuple(size)))
    return [m.to(out_dtype) for m in maps]
