"""Registrations for the compiled caption-feature loss ssattn::caption_loss_fused (ssattn._C).

The schema and the CPU / CUDA kernels come from csrc/caption_loss_* (loading
ssattn._C registers them); this module adds the fake kernel and the autograd
formula. The op returns the loss and, in the same pass over the feature
pairs, dL/dX for the enhanced features; the backward hands them back (scaled
when grad_output is not exactly 1). The reference features get no gradient
(functional.py sends a reference that requires grad to the reference path).
A backward that builds a graph (create_graph=True) recomputes the gradients
from the reference formulas, so that they are differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backends
from ..reference import caption_loss as _reference

OP_NAME = "ssattn::caption_loss_fused"
DISTANCE_CODES = {name: i for i, name in enumerate(_reference.DISTANCES)}  # l1 0, l2 1, cosine 2; csrc/caption_loss.h


def _has_cuda() -> bool:
    mod = _backends.native_module()
    return mod is not None and bool(getattr(mod, "has_cuda", lambda: False)())


def missing(device_type: str) -> str | None:
    """Why the compiled op cannot run on this device type, or None when it can."""
    if _backends.native_module() is None or not _ensure_registered():
        return "the extension ssattn._C is not built; reinstall with a C++ compiler: pip install --no-build-isolation -e ."
    if device_type == "cuda" and not _has_cuda():
        return "ssattn._C was built without its CUDA kernels (torch was a CPU build or nvcc was not found)"
    return None


def _loss_dtype(enhanced, reference):
    wide = any(t.dtype == torch.float64 for t in (*enhanced, *reference))
    return torch.float64 if wide else torch.float32


# --------------------------------------------------------------------------- fake kernel + autograd
def _fake(enhanced, reference, weights, distance, eps, grad):
    loss = enhanced[0].new_empty((), dtype=_loss_dtype(enhanced, reference))
    return loss, ([torch.empty_like(x, memory_format=torch.contiguous_format) for x in enhanced] if grad else [])


def _setup_context(ctx, inputs, output):
    enhanced, reference, weights, distance, eps, _ = inputs
    _, gx = output
    ctx.n = len(enhanced)
    ctx.n_g = len(gx)
    ctx.loss_args = dict(distance=_reference.DISTANCES[distance], weights=list(weights), eps=eps)
    ctx.save_for_backward(*gx, *enhanced, *reference)
    ctx.mark_non_differentiable(*gx)
    ctx.set_materialize_grads(False)


def _grad_is_one(g: Tensor) -> bool:
    """True only for a concrete grad_output equal to 1 (loss.backward()); False while tracing."""
    if type(g) is not torch.Tensor or torch.compiler.is_compiling() or g.device.type == "meta":
        return False
    return bool(g == 1)


def _backward(ctx, grad_loss, _grad_gx):
    none = [None] * ctx.n
    rest = (None,) * 4  # weights, distance, eps, grad
    if grad_loss is None:
        return (none, none, *rest)
    saved = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients from the reference
        xs = list(saved[ctx.n_g:ctx.n_g + ctx.n])
        ys = [y.detach() for y in saved[ctx.n_g + ctx.n:]]
        with torch.enable_grad():
            loss = _reference.caption_feature_loss(xs, ys, **ctx.loss_args)
        wanted = [x for x in xs if x.requires_grad]
        grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True, allow_unused=True))
        return ([next(grads) if x.requires_grad else None for x in xs], none, *rest)
    gx = list(saved[:ctx.n_g])
    if not gx:
        return (none, none, *rest)
    if not _grad_is_one(grad_loss):
        gx = [g * grad_loss.to(g.dtype) for g in gx]
    return (gx, none, *rest)


_registered = False


def _ensure_registered() -> bool:
    """Add the fake kernel and autograd to the compiled op, once, when the extension loads."""
    global _registered
    if not _registered and _backends.native_module() is not None and hasattr(torch.ops.ssattn, "caption_loss_fused"):
        torch.library.register_fake(OP_NAME)(_fake)
        torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)
        _registered = True
    return _registered


# "auto" picks it on CPU only: its CUDA kernel (csrc/caption_loss_cuda.cu) has not yet been run on a GPU by
# this project; backend="native" runs it (tests/test_caption_loss.py's gpu cases check it against the reference).
_backends.register("caption_feature_loss", "native", auto_devices=("cpu",),
                   runs_on=lambda device_type: device_type in ("cpu", "cuda", "meta"),
                   devices_text="the compiled caption loss runs on CPU, CUDA (by name) and meta tensors",
                   missing=missing)


# --------------------------------------------------------------------------- entry point used by functional.py
def caption_loss_native(enhanced, reference, *, distance: str, weights, eps: float) -> Tensor:
    """The loss of docs/operations.md section 4 through the compiled op (inputs validated by functional)."""
    if not _ensure_registered():
        raise RuntimeError(f"ssattn.caption_feature_loss: {missing('cpu')}")
    # One dtype per pair (the wider of the two); pairs may differ from each other.
    xs, ys = [], []
    for x, y in zip(enhanced, reference):
        dt = torch.promote_types(x.dtype, y.dtype)
        xs.append(x if x.dtype == dt else x.to(dt))
        ys.append(y if y.dtype == dt else y.to(dt))
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in xs)
    loss, _ = torch.ops.ssattn.caption_loss_fused(xs, ys, [float(w) for w in weights], DISTANCE_CODES[distance],
                                                  float(eps), grad)
    return loss
