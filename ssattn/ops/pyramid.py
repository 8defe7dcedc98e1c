"""ssattn::guidance_pyramid: the no-grad op behind guidance_pyramid's fast path.

Sizes travel flattened ([H0, W0, H1, W1, ...]). The op has no autograd:
inputs that require grad take the reference path (ssattn.functional).
impl "triton:<options>" passes options to ssattn.kernels.pyramid (see its
docstring); "out=fp32|fp16|bf16" sets the maps' dtype (default: the
scores' dtype), which the fake kernel below mirrors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._backends import kernel_module


_OUT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def output_dtype(scores: Tensor, impl: str) -> torch.dtype:
    """The maps' dtype for this impl string: its "out=" option, else the scores' dtype."""
    name, _, options = impl.partition(":")
    for tok in options.split(","):
        key, _, val = tok.strip().partition("=")
        if name == "triton" and key == "out" and val in _OUT_DTYPES:
            return _OUT_DTYPES[val]
    return scores.dtype


def _pairs(flat: list[int]) -> list[tuple[int, int]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def torch_pyramid(scores, text, grid_size, sizes, gamma, delta, renormalize, options=""):
    with torch.no_grad():
        return reference.guidance_pyramid(
            scores, sizes, gamma=gamma, delta=delta, text=text,
            grid_size=grid_size if text is not None else None, renormalize=renormalize,
        )


@torch.library.custom_op("ssattn::guidance_pyramid", mutates_args=())
def guidance_pyramid_op(
    scores: Tensor, text: Optional[Tensor], grid_size: list[int], sizes: list[int],
    gamma: float, delta: float, renormalize: bool, impl: str,
) -> list[Tensor]:
    name, _, options = impl.partition(":")
    if name == "torch":
        fn = torch_pyramid
    elif name == "triton":
        mod = kernel_module("pyramid")
        if mod is None:
            raise RuntimeError("ssattn: the Triton pyramid kernel is not available")
        fn = mod.guidance_pyramid
    else:
        raise ValueError(f"unknown pyramid implementation {impl!r}")
    return fn(scores, text, tuple(grid_size), _pairs(sizes), gamma, delta, renormalize, options)


@guidance_pyramid_op.register_fake
def _(scores, text, grid_size, sizes, gamma, delta, renormalize, impl):
    dtype = output_dtype(scores, impl)
    return [scores.new_empty((scores.shape[0], 1, h, w), dtype=dtype) for h, w in _pairs(sizes)]
