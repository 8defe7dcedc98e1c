"""ssattn::guidance_pyramid: the no-grad op behind guidance_pyramid's fast path.

Sizes travel flattened ([H0, W0, H1, W1, ...]). The op runs the backend named
by its `backend` argument ("triton": ssattn.kernels.pyramid) and has no
autograd; which path a call takes (inputs that require grad, float64, grids
too large for the kernel: the reference) is decided here, by `choose`.
`out_dtype` sets the maps' dtype (None: the scores' dtype), which the fake
kernel mirrors; `precision` is the float32 dot precision ("ieee" or "tf32x3").
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backends
from ..reference.pyramid import NORM_EPS

OP = "guidance_pyramid"

_backends.register(
    OP, "triton", auto_devices=("cuda",), runs_on=_backends.triton_runs_on, devices_text=_backends.TRITON_DEVICES,
    dtypes=(torch.float16, torch.bfloat16, torch.float32), missing=lambda _: _backends.kernel_missing("pyramid"),
)


def _pairs(flat: list[int]) -> list[tuple[int, int]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


@_backends.constant_for_compile
def choose(backend: str, device_type: str, dtype: torch.dtype, grid: tuple[int, int], needs_grad: bool) -> str:
    """The backend a pyramid call uses: "reference" or "triton"."""
    if needs_grad and backend == "triton":
        raise ValueError(
            "guidance_pyramid: the triton backend has no backward; inputs that require grad need "
            "backend='reference' or 'auto' (or detach them)"
        )
    chosen = _backends.resolve(OP, backend, device_type, dtype, not needs_grad)
    if chosen == "triton" and not _kernels(chosen).fits(*grid):
        _backends.warn_once(
            f"{OP}:grid:{grid}",
            f"ssattn: the Triton pyramid kernel holds grids up to {_kernels(chosen).MAX_GRID_CELLS} cells; "
            f"{grid[0]}x{grid[1]} uses the PyTorch formulas",
        )
        return "reference"
    return chosen


def _kernels(backend: str):
    return _backends.triton_kernels("guidance_pyramid", backend, "pyramid")


def check_inputs(scores: Tensor, text: Optional[Tensor], grid_size: list[int], sizes: list[int]) -> None:
    """What the kernel relies on (metadata only, no host sync); the op and its fake kernel run it,
    so a direct call of torch.ops.ssattn.guidance_pyramid with inconsistent shapes raises."""
    if len(grid_size) != 2 or min(grid_size) < 1:
        raise ValueError(f"grid_size must be [gh, gw] with both >= 1, got {list(grid_size)}")
    if len(sizes) < 2 or len(sizes) % 2 or min(sizes) < 1:
        raise ValueError(f"sizes must be a flat list [H0, W0, H1, W1, ...] of integers >= 1, got {list(sizes)}")
    gh, gw = grid_size
    if scores.dim() != 3 or scores.shape[0] < 1:
        raise ValueError(f"scores must have 3 dimensions and a batch >= 1, got shape {tuple(scores.shape)}")
    if text is None:
        if tuple(scores.shape[1:]) != (gh, gw):
            raise ValueError(f"scores must be a (B, {gh}, {gw}) grid for grid_size {[gh, gw]}, got {tuple(scores.shape)}")
    else:
        if scores.shape[1] != gh * gw or scores.shape[2] < 1:
            raise ValueError(f"scores must be patch features (B, {gh * gw}, Cf) for grid_size {[gh, gw]}, "
                             f"got {tuple(scores.shape)}")
        if text.dim() not in (1, 2) or text.shape[-1] != scores.shape[-1] or (
                text.dim() == 2 and text.shape[0] != scores.shape[0]):
            raise ValueError(f"text must have shape (Cf,) or (B, Cf) = {(scores.shape[0], scores.shape[-1])}, "
                             f"got {tuple(text.shape)}")
        if text.device != scores.device:
            raise ValueError(f"text is on {text.device} but scores is on {scores.device}")
    H, W = sizes[0], sizes[1]
    for i in range(2, len(sizes), 2):
        if sizes[i] > H or sizes[i + 1] > W:
            raise ValueError(f"sizes: level {i // 2} ({sizes[i]}, {sizes[i + 1]}) is larger than the image ({H}, {W})")


@torch.library.custom_op("ssattn::guidance_pyramid", mutates_args=())
def guidance_pyramid_op(
    scores: Tensor, text: Optional[Tensor], grid_size: list[int], sizes: list[int],
    gamma: float, delta: float, renormalize: bool, backend: str, out_dtype: Optional[torch.dtype] = None,
    precision: str = "ieee",
) -> list[Tensor]:
    check_inputs(scores, text, grid_size, sizes)
    return _kernels(backend).guidance_pyramid(
        scores, text, tuple(grid_size), _pairs(sizes), gamma, delta, renormalize,
        eps=NORM_EPS, out_dtype=out_dtype, precision=precision,
    )


@guidance_pyramid_op.register_fake
def _(scores, text, grid_size, sizes, gamma, delta, renormalize, backend, out_dtype=None, precision="ieee"):
    check_inputs(scores, text, grid_size, sizes)
    dtype = out_dtype or scores.dtype
    return [scores.new_empty((scores.shape[0], 1, h, w), dtype=dtype) for h, w in _pairs(sizes)]
