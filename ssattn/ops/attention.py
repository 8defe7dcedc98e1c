"""ssattn::masked_attention_fwd / _bwd: the registered op behind masked_cross_attention's fast paths.

The op runs a fast backend named by its `backend` argument ("triton": the
kernels of ssattn.kernels.attention; "triton-short": those of
ssattn.kernels.attention_short, for Nk <= 128 keys, which `choose` gives
"auto" in place of "triton" when the keys are that few); the reference (ssattn.reference) is the
only PyTorch formulation of SPEC 2 and is called directly by the functional
API, never through this op. Contract of every backend: forward returns
(out, stats), stats (B, h, Nq, 2) float32 the softmax statistics in base 2:
[..., 0] the row max of the base-2 logits scale*log2(e)*m_j<q_i, k_j>,
[..., 1] log2 of the row sum of exp2(logit - row max); both +inf for a row
with no key (so exp2(logit - max - log2sum) = 0). Kept as two numbers, not one
log-sum-exp, so the backward recomputes the forward's P to float32 rounding
even at logits of 1e4 (one ulp of a combined value would be ~1e-3 in P).
Backward returns (dq, dk, dv, dweight), dweight empty when not asked for.
`precision` is the float32 dot precision ("ieee", "tf32", "tf32x3"; ignored
for half inputs). `deterministic` asks for the same bits run to run (and in
every process): the Triton backend then runs its two-pass backward with the
heuristic config; otherwise its single-pass backward (dq by float32 atomics).
The functional API passes torch.are_deterministic_algorithms_enabled().

Layouts: out takes q's memory layout (`empty_like(q)` when v's head dim is
q's), so when q is a head view of an NCHW or channels-last projection, out
seen as (B, h*d, H, W) is a view in the same format: the module's path has
no copy. Gradients take their input's layout; grad_out is read as it comes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backends

OP = "masked_cross_attention"
PRECISIONS = ("ieee", "tf32", "tf32x3")

_backends.register(
    OP, "triton", auto_devices=("cuda",), runs_on=_backends.triton_runs_on, devices_text=_backends.TRITON_DEVICES,
    dtypes=(torch.float16, torch.bfloat16, torch.float32), missing=lambda _: _backends.kernel_missing("attention"),
)
# The short-key kernels (Nk <= SHORT_MAX_KEYS, e.g. image-word attention over L <= 77 text keys): no auto
# devices, so the registry's "auto" never takes them (nor warns twice when Triton is missing); `choose` gives
# them to "auto" by the key count, where the general Triton kernels would run.
SHORT = "triton-short"
SHORT_MAX_KEYS = 128
_backends.register(
    OP, SHORT, auto_devices=(), runs_on=_backends.triton_runs_on, devices_text=_backends.TRITON_DEVICES,
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    missing=lambda _: _backends.kernel_missing("attention_short"),
)
_KERNEL_MODULES = {"triton": "attention", SHORT: "attention_short"}


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax statistics are kept in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_like(q: Tensor, dv: int) -> Tensor:
    """The uninitialised output (B, h, Nq, dv): q's layout when dv == d, else contiguous."""
    if q.shape[-1] == dv:
        return torch.empty_like(q)
    return q.new_empty((*q.shape[:-1], dv))


def _fp32_allows_tf32() -> bool:
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)  # newer torch: "ieee" | "tf32" | "none"
    if prec == "tf32":
        return True
    if prec == "ieee":
        return False
    if torch.get_float32_matmul_precision() != "highest":
        return True
    return bool(getattr(matmul, "allow_tf32", False))


@_backends.constant_for_compile
def default_precision() -> str:
    """float32 dot precision from torch's TF32 setting ("tf32" or "ieee").

    Read once per compiled graph: the setting is baked into a graph when it is traced.
    """
    return "tf32" if _fp32_allows_tf32() else "ieee"


@_backends.constant_for_compile
def default_deterministic() -> bool:
    """torch.use_deterministic_algorithms(True) asks the kernels for the same bits run to run.

    Off by default (torch's default): the Triton backward then takes its single pass, which computes
    every exponential once instead of twice.
    """
    return torch.are_deterministic_algorithms_enabled()


def check_inputs(q: Tensor, k: Tensor, v: Tensor, weight: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> None:
    """The shapes, dtypes and devices every backend relies on; metadata only, so no host sync.

    The op runs this itself (and so does its fake kernel): a direct call of
    torch.ops.ssattn.masked_attention_fwd with mismatched shapes raises instead of letting a
    kernel read out of bounds. The functional API calls it too, after its type checks.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, h, N, d), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    for name, t in (("k", k), ("v", v), ("weight", weight), ("key_padding_mask", key_padding_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on the same device")
    B, h, _, d = q.shape
    if k.shape[:2] != (B, h) or v.shape[:2] != (B, h):
        raise ValueError(
            f"q, k and v must agree in batch and heads (B, h): q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[-1] != d:
        raise ValueError(f"k must have head dim {d} like q, got {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have as many keys as k ({k.shape[2]}), got {tuple(v.shape)}")
    if k.shape[2] < 1 or q.shape[2] < 1 or d < 1 or v.shape[-1] < 1:
        raise ValueError(f"q and k must have at least one token and head dim >= 1: q {tuple(q.shape)}, k {tuple(k.shape)}")
    nk = k.shape[2]
    if weight is not None:
        if not weight.is_floating_point():
            raise TypeError(f"weight must have a floating dtype, got {weight.dtype}")
        if tuple(weight.shape) != (B, nk):
            raise ValueError(f"weight must have shape (B, Nk) = {(B, nk)}, got {tuple(weight.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padded key), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(B, nk)}, got {tuple(key_padding_mask.shape)}")


def _check_backward_inputs(grad_out, q, k, v, weight, key_padding_mask, out, stats) -> None:
    check_inputs(q, k, v, weight, key_padding_mask)
    B, h, nq, _ = q.shape
    expected = (B, h, nq, v.shape[-1])
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape (B, h, Nq, dv) = {expected}, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} on {q.device} like q, got {t.dtype} on {t.device}")
    if tuple(stats.shape) != (B, h, nq, 2) or stats.dtype != stats_dtype(q.dtype) or stats.device != q.device:
        raise ValueError(f"stats must be {stats_dtype(q.dtype)} of shape (B, h, Nq, 2) = {(B, h, nq, 2)} on {q.device}, "
                         f"got {stats.dtype} {tuple(stats.shape)} on {stats.device}")


def _kernels(backend: str):
    return _backends.triton_kernels("masked_attention", backend, _KERNEL_MODULES.get(backend, "attention"),
                                    tuple(_KERNEL_MODULES))


@_backends.constant_for_compile
def _short_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether "auto" may take the short-key kernels on this device type and dtype (constants only)."""
    return _backends.available(OP, SHORT, device_type) and _backends.resolve(OP, SHORT, device_type, dtype) == SHORT


def choose(backend: str, device_type: str, dtype: torch.dtype, nk: int) -> str:
    """The backend a masked_cross_attention call with nk keys uses: the registry's choice, and for
    "auto" the short-key kernels in place of "triton" when nk <= SHORT_MAX_KEYS.

    nk may be a symbolic size under torch.compile(dynamic=True): the comparison becomes a guard.
    """
    chosen = _backends.resolve(OP, backend, device_type, dtype)
    if chosen == SHORT and nk > SHORT_MAX_KEYS:  # asked for by name
        raise ValueError(f"masked_cross_attention: backend {SHORT!r} takes at most {SHORT_MAX_KEYS} keys, "
                         f"got k with Nk = {nk}; use backend='triton' or 'auto'")
    if backend == "auto" and chosen == "triton" and nk <= SHORT_MAX_KEYS and _short_available(device_type, dtype):
        return SHORT
    return chosen


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")


@torch.library.custom_op("ssattn::masked_attention_fwd", mutates_args=())
def masked_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, weight: Optional[Tensor], key_padding_mask: Optional[Tensor],
    scale: float, backend: str, precision: str, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    check_inputs(q, k, v, weight, key_padding_mask)
    _check_precision(precision)
    return _kernels(backend).forward(q, k, v, weight, key_padding_mask, scale,
                                     precision=precision, deterministic=deterministic)


@masked_attention_fwd.register_fake
def _(q, k, v, weight, key_padding_mask, scale, backend, precision, deterministic):
    check_inputs(q, k, v, weight, key_padding_mask)
    B, h, nq, _ = q.shape
    out = out_like(q, v.shape[-1])
    stats = q.new_empty((B, h, nq, 2), dtype=stats_dtype(q.dtype))
    return out, stats


@torch.library.custom_op("ssattn::masked_attention_bwd", mutates_args=())
def masked_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, weight: Optional[Tensor],
    key_padding_mask: Optional[Tensor], out: Tensor, stats: Tensor, scale: float, weight_grad: bool,
    backend: str, precision: str, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_backward_inputs(grad_out, q, k, v, weight, key_padding_mask, out, stats)
    _check_precision(precision)
    dq, dk, dv, dw = _kernels(backend).backward(
        grad_out, q, k, v, weight, key_padding_mask, out, stats, scale, weight_grad,
        precision=precision, deterministic=deterministic,
    )
    return dq, dk, dv, dw


@masked_attention_bwd.register_fake
def _(grad_out, q, k, v, weight, key_padding_mask, out, stats, scale, weight_grad, backend, precision, deterministic):
    _check_backward_inputs(grad_out, q, k, v, weight, key_padding_mask, out, stats)
    dw = weight.new_empty(weight.shape) if (weight is not None and weight_grad) else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dw


def _setup_context(ctx, inputs, output):
    q, k, v, weight, kpm, scale, backend, precision, deterministic = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, weight, kpm, out, stats)
    ctx.scale, ctx.backend, ctx.precision, ctx.deterministic = scale, backend, precision, deterministic


def _backward(ctx, grad_out, grad_stats):
    q, k, v, weight, kpm, out, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    weight_grad = weight is not None and need[3]
    dq, dk, dv, dw = torch.ops.ssattn.masked_attention_bwd(
        grad_out, q, k, v, weight, kpm, out, stats, ctx.scale, weight_grad, ctx.backend, ctx.precision,
        ctx.deterministic,
    )
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        dw if weight_grad else None,
        None, None, None, None, None,
    )


masked_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def masked_attention(q, k, v, weight, key_padding_mask, scale: float, backend: str) -> Tensor:
    """The op's output for validated inputs, with float32 precision and determinism from torch's settings."""
    out, _ = torch.ops.ssattn.masked_attention_fwd(
        q, k, v, weight, key_padding_mask, scale, backend, default_precision(), default_deterministic(),
    )
    return out
