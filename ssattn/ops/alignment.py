"""Registrations for the compiled alignment-loss op ssattn::alignment_loss_fused (ssattn._C).

The schema and the CPU/CUDA kernels come from csrc/ (loading ssattn._C
registers them); this module adds the fake kernel and the autograd formula
when the extension is built. The op returns the loss and, in the same pass
over F and M, the gradients dL/dF and dL/dM that autograd will need; the
backward only hands them back (scaled when grad_output is not exactly 1).
A backward that builds a graph (create_graph=True, for double backward)
recomputes the gradients from the reference formulas instead, so that they
are differentiable: the kernel's saved gradients are constants.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backends
from ..reference import alignment as _reference

OP_NAME = "ssattn::alignment_loss_fused"


def has_cuda() -> bool:
    """Whether ssattn._C was compiled with its CUDA kernels."""
    mod = _backends.native_module()
    return mod is not None and bool(getattr(mod, "has_cuda", lambda: False)())


def missing(device_type: str) -> str | None:
    """Why the compiled op cannot run on this device type, or None when it can."""
    if _backends.native_module() is None or not _ensure_registered():
        return "the extension ssattn._C is not built; reinstall with a C++ compiler: pip install --no-build-isolation -e ."
    if device_type == "cuda" and not has_cuda():
        return "ssattn._C was built without its CUDA kernels (torch was a CPU build or nvcc was not found)"
    return None


def available(device) -> bool:
    """Whether the compiled op can run on `device` (a torch.device or a device type such as "cuda")."""
    kind = device if isinstance(device, str) else torch.device(device).type
    return kind in ("cpu", "cuda") and missing(kind) is None


# --------------------------------------------------------------------------- fake kernel + autograd
def _fake(features, maps, weights, eta, mean, normalized, grad_features, grad_maps):
    acc = torch.float64 if features[0].dtype == torch.float64 else torch.float32
    loss = features[0].new_empty((), dtype=acc)
    gf = [torch.empty_like(f) for f in features] if grad_features else []
    gm = [torch.empty_like(m) for m in maps] if grad_maps else []
    return loss, gf, gm


def _setup_context(ctx, inputs, output):
    features, maps, weights, eta, mean, normalized, _, _ = inputs
    _, gf, gm = output
    ctx.n_f, ctx.n_m = len(gf), len(gm)
    ctx.levels = len(features)
    ctx.loss_args = dict(eta=eta, weights=list(weights), reduction="mean" if mean else "sum",
                         form="normalized" if normalized else "paper")
    # The inputs too (no copies: they are alive anyway) for a backward that builds a graph.
    ctx.save_for_backward(*gf, *gm, *features, *maps)
    ctx.mark_non_differentiable(*gf, *gm)
    # The gradient outputs get no incoming gradient; without this autograd
    # would allocate and zero-fill one tensor the size of every dF per backward.
    ctx.set_materialize_grads(False)


def _grad_is_one(g: Tensor) -> bool:
    """True only for a concrete grad_output equal to 1 (loss.backward()); False while tracing."""
    if type(g) is not torch.Tensor or torch.compiler.is_compiling() or g.device.type == "meta":
        return False  # FakeTensor / FunctionalTensor under torch.compile, meta tensors: multiply
    if g.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # no host sync inside a CUDA graph capture
    return bool(g == 1)


def _differentiable_grads(ctx, features, maps, grad_loss):
    """dL/dF and dL/dM (times grad_loss) as a graph, from the reference: for double backward."""
    with torch.enable_grad():
        loss = _reference.alignment_loss(features, maps, **ctx.loss_args)
    wanted = [x for x in features + maps if x.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True, allow_unused=True))
    out = [next(grads) if x.requires_grad else None for x in features + maps]
    return out[: ctx.levels], out[ctx.levels :]


def _backward(ctx, grad_loss, _grad_gf, _grad_gm):
    none = [None] * ctx.levels  # the returned structure must match the inputs (lists of levels)
    rest = (None,) * 6  # weights, eta, mean, normalized, grad_features, grad_maps
    if grad_loss is None:  # the loss took no part in what is differentiated
        return (none, none, *rest)
    saved = ctx.saved_tensors
    n_g = ctx.n_f + ctx.n_m
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        features, maps = list(saved[n_g : n_g + ctx.levels]), list(saved[n_g + ctx.levels :])
        gf, gm = _differentiable_grads(ctx, features, maps, grad_loss)
        return (gf, gm, *rest)
    gf, gm = list(saved[: ctx.n_f]), list(saved[ctx.n_f : n_g])
    if not _grad_is_one(grad_loss):
        gf = [g * grad_loss for g in gf]
        gm = [g * grad_loss for g in gm]
    return (gf or none, gm or none, *rest)


_registered = False


def _ensure_registered() -> bool:
    """Add the fake kernel and autograd to the compiled op, once, when the extension loads."""
    global _registered
    if not _registered and _backends.native_module() is not None and hasattr(torch.ops.ssattn, "alignment_loss_fused"):
        torch.library.register_fake(OP_NAME)(_fake)
        torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)
        _registered = True
    return _registered


# By name it also takes meta tensors (shapes only, through the fake kernel); "auto" gives them the reference.
_backends.register("alignment_loss", "native", auto_devices=("cpu", "cuda"),
                   runs_on=lambda device_type: device_type in ("cpu", "cuda", "meta"),
                   devices_text="the compiled extension runs on CPU, CUDA and meta tensors", missing=missing)


# --------------------------------------------------------------------------- entry point used by functional.py
def _kernel_dtypes(features, maps):
    """One feature dtype and one map dtype (that one, or float32 for half features) for the kernel."""
    fd = features[0].dtype
    for f in features[1:]:
        fd = torch.promote_types(fd, f.dtype)
    md = maps[0].dtype
    for m in maps[1:]:
        md = torch.promote_types(md, m.dtype)
    acc = torch.promote_types(torch.promote_types(fd, md), torch.float32)
    if acc == torch.float64:
        return torch.float64, torch.float64
    return fd, (md if md == fd else torch.float32)


def alignment_loss_native(features, maps, *, eta: float, weights, reduction: str, form: str = "paper") -> Tensor:
    """The loss of docs/operations.md section 3 through the compiled op (inputs validated by functional)."""
    if not _ensure_registered():
        raise RuntimeError(f"ssattn.alignment_loss: {missing('cpu')}")
    fd, md = _kernel_dtypes(features, maps)
    features = [f if f.dtype == fd else f.to(fd) for f in features]
    maps = [m if m.dtype == md else m.to(md) for m in maps]
    grad_on = torch.is_grad_enabled()
    gf = grad_on and any(f.requires_grad for f in features)
    gm = grad_on and any(m.requires_grad for m in maps)
    loss, _, _ = torch.ops.ssattn.alignment_loss_fused(
        features, maps, [float(w) for w in weights], float(eta), reduction == "mean", form == "normalized", gf, gm
    )
    return loss
