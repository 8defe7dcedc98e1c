"""Public functional API (SPEC "Public API"): validate, pick a backend, run.

backend="reference" runs the pure-PyTorch ground truth with autograd;
"triton" and "native" run the registered ops (ssattn.ops, ssattn._C);
"auto" picks the fastest path available for the device and dtype, falling
back to the reference with one warning when a fast path is missing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backends, _checks, reference
from .ops import alignment as _alignment_ops
from .ops import attention as _attention_ops
from .ops import attention_cpu as _attention_cpu
from .ops import caption_loss as _caption_ops
from .ops import pyramid as _pyramid_ops
from .reference.alignment import FORMS as ALIGNMENT_FORMS
from .reference.caption_loss import COSINE_EPS as CAPTION_COSINE_EPS
from .reference.caption_loss import DISTANCES as CAPTION_DISTANCES
from .reference.caption_loss import caption_feature_loss as _caption_reference  # `reference` is an argument below


# --------------------------------------------------------------------------- pyramid
def _check_pyramid_args(scores, sizes, gamma, delta, text, grid_size):
    """Validate; returns (level sizes, grid size (gh, gw)) as integer pairs."""
    _checks.tensor("scores", scores, ndim=3)
    if text is None:
        if grid_size is not None:
            raise ValueError("grid_size is only used with text (patch features); scores is already a (B, gh, gw) grid")
        gh, gw = scores.shape[1], scores.shape[2]
    else:
        _checks.tensor("text", text)
        if text.dim() not in (1, 2):
            raise ValueError(f"text must have shape (Cf,) or (B, Cf), got {tuple(text.shape)}")
        _checks.same_device(scores=scores, text=text)
        if grid_size is None:
            raise ValueError("grid_size=(gh, gw) is required when text is given (scores are patch features)")
        gh, gw = _checks.size_pair("grid_size", grid_size)
        if scores.shape[1] != gh * gw:
            raise ValueError(
                f"scores has {scores.shape[1]} patch features but grid_size {gh}x{gw} needs {gh * gw}"
            )
        if text.shape[-1] != scores.shape[-1]:
            raise ValueError(f"text has {text.shape[-1]} features but scores (patch features) have {scores.shape[-1]}")
        if text.dim() == 2 and text.shape[0] != scores.shape[0]:
            raise ValueError(f"text has batch {text.shape[0]} but scores have batch {scores.shape[0]}")
    if scores.shape[0] < 1 or scores.shape[1] < 1 or scores.shape[2] < 1:
        raise ValueError(f"scores must be non-empty, got shape {tuple(scores.shape)}")
    pairs = _checks.pyramid_sizes(sizes)
    _checks.sharpening(gamma, delta)
    return pairs, (gh, gw)


def guidance_pyramid(
    scores: Tensor,
    sizes,
    *,
    gamma: float = 2.0,
    delta: float = 0.2,
    text: Tensor | None = None,
    grid_size=None,
    renormalize: bool = False,
    backend: str = "auto",
) -> list[Tensor]:
    """Guidance-map pyramid of SPEC 1: one (B, 1, H_l, W_l) map per size in `sizes`.

    scores is a similarity grid (B, gh, gw), or, with `text` ((B, Cf) or
    (Cf,)), patch features (B, gh*gw, Cf) with grid_size=(gh, gw). sizes[0]
    is the image size (the first output is M_sem); later sizes are at most
    that. Values are in [0, 1]; NaN inputs give NaN maps. The fused kernel
    has no backward: inputs that require grad always take the reference path.
    """
    pairs, grid = _check_pyramid_args(scores, sizes, gamma, delta, text, grid_size)
    needs_grad = torch.is_grad_enabled() and (scores.requires_grad or (text is not None and text.requires_grad))
    dtype = scores.dtype if text is None else torch.promote_types(scores.dtype, text.dtype)
    chosen = _pyramid_ops.choose(backend, scores.device.type, dtype, grid, needs_grad)
    if chosen == "reference":
        return reference.guidance_pyramid(
            scores, pairs, gamma=gamma, delta=delta, text=text,
            grid_size=grid if text is not None else None, renormalize=renormalize,
        )
    flat = [v for hw in pairs for v in hw]
    return torch.ops.ssattn.guidance_pyramid(
        scores, text, list(grid), flat, float(gamma), float(delta), bool(renormalize), chosen
    )


# --------------------------------------------------------------------------- attention
def _check_attention_args(q, k, v, weight, key_padding_mask, scale, check_values=True):
    """Validate; returns the scale as a float (d ** -0.5 when None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, ndim=4)
    _checks.same_device(q=q, k=k, v=v, weight=weight, key_padding_mask=key_padding_mask)
    if weight is not None:
        _checks.tensor("weight", weight, ndim=2)
    if key_padding_mask is not None:
        _checks.tensor("key_padding_mask", key_padding_mask, ndim=2, floating=False)
    _attention_ops.check_inputs(q, k, v, weight, key_padding_mask)  # shapes and dtypes: the op's own rules
    if weight is not None and check_values:
        _checks.unit_interval("weight", weight)
    scale = _checks.scale(scale)
    return q.shape[-1] ** -0.5 if scale is None else scale


def masked_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    weight: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Mask-weighted cross-attention of SPEC 2: softmax(scale * m_j <q_i, k_j>) (m_j v_j).

    q (B, h, Nq, d), k and v (B, h, Nk, d) with any strides; weight (B, Nk)
    per-key map values in [0, 1]; key_padding_mask (B, Nk) bool, True for a
    padded key. A batch whose keys are all padded gets an all-zero output and
    zero gradients. Returns (B, h, Nq, d).
    """
    scale = _check_attention_args(q, k, v, weight, key_padding_mask, scale)
    return _attention(q, k, v, weight, key_padding_mask, scale, backend)


def _attention(q, k, v, weight, key_padding_mask, scale: float, backend: str) -> Tensor:
    """masked_cross_attention after validation (the modules validate their own map)."""
    chosen = _attention_ops.choose(backend, q.device.type, q.dtype, k.shape[-2])
    if chosen == _attention_cpu.BACKEND and (backend != "auto" or _attention_cpu.worth_it(q, k)):
        return _attention_cpu.masked_attention_cpu(q, k, v, weight, key_padding_mask, scale)
    if chosen in ("reference", _attention_cpu.BACKEND):  # small CPU problems: the reference (see worth_it)
        return reference.masked_cross_attention(q, k, v, weight, key_padding_mask, scale)
    return _attention_ops.masked_attention(q, k, v, weight, key_padding_mask, scale, chosen)


# --------------------------------------------------------------------------- alignment loss
def _check_alignment_args(features, maps, eta, weights, reduction, form="paper", check_values=True):
    features = _checks.nonempty_list("features", features)
    maps = _checks.nonempty_list("maps", maps)
    if len(features) != len(maps):
        raise ValueError(f"features and maps must have the same number of levels, got {len(features)} and {len(maps)}")
    for i, (f, m) in enumerate(zip(features, maps)):
        _checks.tensor(f"features[{i}]", f, ndim=4)
        _checks.tensor(f"maps[{i}]", m, ndim=4)
        _checks.same_device(**{"features[0]": features[0], f"features[{i}]": f, f"maps[{i}]": m})
        B, _, H, W = f.shape
        if m.shape[1] != 1:
            raise ValueError(f"maps[{i}] must have one channel (B, 1, H, W), got {tuple(m.shape)}")
        if (m.shape[0], m.shape[2], m.shape[3]) != (B, H, W):
            raise ValueError(
                f"maps[{i}] has shape {tuple(m.shape)} but features[{i}] is {tuple(f.shape)}: "
                f"expected ({B}, 1, {H}, {W})"
            )
        if check_values:
            _checks.unit_interval(f"maps[{i}]", m)
    eta = _checks.number("eta", eta, minimum=0)
    if weights is None:
        weights = [1.0] * len(features)
    else:
        weights = _checks.numbers_per_level("weights", weights, len(features))
    _checks.choice("reduction", reduction, ("mean", "sum"))
    _checks.choice("form", form, ALIGNMENT_FORMS)
    return features, maps, eta, weights


def alignment_loss(
    features,
    maps,
    *,
    eta: float = 1.0,
    weights=None,
    reduction: str = "mean",
    form: str = "paper",
    backend: str = "auto",
) -> Tensor:
    """Semantic alignment loss of docs/operations.md section 3, summed over levels.

    form="paper": L = sum_l w_l (||F_l (1 - M_l)||^2 - eta <F_l, M_l>), the
    paper's formula (unbounded below: it falls without limit as the features
    inside the map grow). form="normalized": the same formula applied to each
    sample's features rescaled to unit RMS, U_b = F_b / max(rms(F_b), 1e-6):
    invariant to the scale of F, and bounded below. reduction="mean" divides
    each level's term by F_l.numel() (0 for an empty level). Maps
    (B, 1, H_l, W_l) in [0, 1] broadcast over channels. Half-precision inputs
    accumulate in float32 and return a float32 loss.
    """
    return _alignment_loss(features, maps, eta, weights, reduction, backend, form=form)


def _alignment_loss(features, maps, eta, weights, reduction, backend, check_values=True, form="paper") -> Tensor:
    """alignment_loss; check_values=False skips the maps' range check (callers that built them from a checked map)."""
    features, maps, eta, weights = _check_alignment_args(features, maps, eta, weights, reduction, form, check_values)
    chosen = _backends.resolve("alignment_loss", backend, features[0].device.type, features[0].dtype)
    if chosen == "reference":
        return reference.alignment_loss(features, maps, eta=eta, weights=weights, reduction=reduction, form=form)
    return _alignment_ops.alignment_loss_native(features, maps, eta=eta, weights=weights, reduction=reduction, form=form)


# --------------------------------------------------------------------------- caption-feature loss
def _check_caption_args(enhanced, reference, distance, weights, eps):
    enhanced = _checks.nonempty_list("enhanced", enhanced)
    reference = _checks.nonempty_list("reference", reference)
    if len(enhanced) != len(reference):
        raise ValueError(f"enhanced and reference must have the same number of spaces, got {len(enhanced)} "
                         f"and {len(reference)}")
    for i, (x, y) in enumerate(zip(enhanced, reference)):
        _checks.tensor(f"enhanced[{i}]", x)
        _checks.tensor(f"reference[{i}]", y)
        _checks.same_device(**{"enhanced[0]": enhanced[0], f"enhanced[{i}]": x, f"reference[{i}]": y})
        if x.dim() < 1:
            raise ValueError(f"enhanced[{i}] must have at least one dimension (..., D), got a scalar")
        if x.shape != y.shape:
            raise ValueError(f"reference[{i}] has shape {tuple(y.shape)} but enhanced[{i}] is {tuple(x.shape)}: "
                             "they must match")
    _checks.choice("distance", distance, CAPTION_DISTANCES)
    weights = [1.0] * len(enhanced) if weights is None else _checks.numbers_per_level("weights", weights, len(enhanced))
    eps = _checks.number("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return enhanced, reference, weights, eps


def caption_feature_loss(
    enhanced,
    reference,
    *,
    distance: str = "l1",
    weights=None,
    eps: float = CAPTION_COSINE_EPS,
    backend: str = "auto",
) -> Tensor:
    """Multi-level caption-feature loss of docs/operations.md section 4: sum_s w_s d(X_s, Y_s).

    enhanced[s] and reference[s] are one space's features (any equal shapes (..., D));
    distance "l1" (mean |X - Y|), "l2" (mean (X - Y)^2) or "cosine" (mean over the
    vectors along the last dimension of 1 - cos, each norm clamped to eps). The loss
    is float32 (float64 if a pair is float64). The fused op ("native") returns the
    gradient of the enhanced features only: a reference that requires grad takes the
    reference path under "auto" and is an error under "native".
    """
    enhanced, reference, weights, eps = _check_caption_args(enhanced, reference, distance, weights, eps)
    ref_grad = torch.is_grad_enabled() and any(y.requires_grad for y in reference)
    dtype = enhanced[0].dtype
    chosen = _backends.resolve("caption_feature_loss", backend, enhanced[0].device.type, dtype,
                               allow_fast=not ref_grad)
    if chosen == "reference":
        return _caption_reference(enhanced, reference, distance=distance, weights=weights, eps=eps)
    if ref_grad:
        raise ValueError("caption_feature_loss: the fused op gives no gradient for `reference`; detach the "
                         "reference features or use backend='reference'")
    return _caption_ops.caption_loss_native(enhanced, reference, distance=distance, weights=weights, eps=eps)
