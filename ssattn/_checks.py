"""Input validation shared by the functional API and the modules.

Every check raises an error that names the argument and says what was
expected. Value-range checks on maps need one host sync; they run in eager
mode only (never while torch.compile traces) and can be switched off with
``ssattn.set_value_checks(False)`` or ``SSATTN_VALUE_CHECKS=0``.
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
from collections.abc import Sequence

import torch

_VALUE_CHECKS = os.environ.get("SSATTN_VALUE_CHECKS", "1") not in ("0", "false", "False")


def set_value_checks(enabled: bool) -> None:
    """Turn the eager-mode value-range checks on maps on or off.

    They cost one device-to-host sync per call; switch them off for maximum
    throughput once the inputs are known to be good.
    """
    global _VALUE_CHECKS
    _VALUE_CHECKS = bool(enabled)


def value_checks_enabled() -> bool:
    if not _VALUE_CHECKS:
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return False
    return True


def tensor(name: str, x, *, ndim: int | None = None, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def parameter_dtype(param: torch.dtype, **inputs: torch.Tensor) -> None:
    """Inputs in a module's parameter dtype (autocast converts them itself): else a projection fails deep inside."""
    first = next(iter(inputs.values()))
    if torch.is_autocast_enabled(first.device.type):
        return
    for name, x in inputs.items():
        if x.dtype != param:
            raise TypeError(
                f"{name} has dtype {x.dtype} but the module's parameters are {param}: convert one "
                f"(module.to({x.dtype}) or {name}.to({param})), or run under torch.autocast"
            )


def same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )


def unit_interval(name: str, x: torch.Tensor) -> None:
    """Raise if a map has values outside [0, 1]. NaN passes (and propagates)."""
    if not value_checks_enabled() or x.numel() == 0 or is_shape_only(x):
        return
    lo, hi = torch.aminmax(x.detach().float())
    lo, hi = float(lo), float(hi)
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must have values in [0, 1], got min {lo:g} and max {hi:g} "
            "(normalise the map first; ssattn.set_value_checks(False) disables this check)"
        )


def size_pair(name: str, s) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s)
        ok = all(int(v) == v for v in s)
    except (TypeError, ValueError):
        ok = False
    if not ok or h < 1 or w < 1:
        raise ValueError(f"{name} must be a pair of positive integers (H, W), got {s!r}")
    return h, w


def nonempty_spatial(name: str, x: torch.Tensor) -> None:
    """A (B, C, H, W) tensor with H >= 1 and W >= 1 (B may be 0)."""
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty spatial size (H >= 1, W >= 1), got shape {tuple(x.shape)}")


def pyramid_sizes(sizes) -> list[tuple[int, int]]:
    """SPEC 1's level sizes: a non-empty list of (H, W) pairs, none larger than sizes[0] (the image)."""
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__") or len(sizes) == 0:
        raise ValueError(f"sizes must be a non-empty list of (H, W) pairs, got {sizes!r}")
    pairs = [size_pair(f"sizes[{i}]", s) for i, s in enumerate(sizes)]
    H, W = pairs[0]
    for i, (h, w) in enumerate(pairs[1:], 1):
        if h > H or w > W:
            raise ValueError(f"sizes[{i}] = {(h, w)} is larger than the image size sizes[0] = {(H, W)}")
    return pairs


def real(name: str, value) -> float:
    """A finite real number (not a bool, which Python would take as 0 or 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def scale(value) -> float | None:
    """The attention scale: None (head_dim ** -0.5) or a finite number."""
    return None if value is None else real("scale", value)


def sharpening(gamma, delta) -> None:
    """SPEC 1's sharpening parameters: gamma >= 1 (finite), 0 <= delta < 1."""
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 1):
        raise ValueError(f"gamma must be a finite number >= 1, got {gamma!r}")
    if not (isinstance(delta, (int, float)) and 0 <= delta < 1):
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")


def nonempty_list(name: str, xs) -> list:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list of tensors, got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError(f"{name} must not be empty")
    return list(xs)


def choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def number(name: str, value, *, minimum: float | None = None) -> float:
    """A finite real number (not a bool, not a string), at least `minimum` when given; as a float."""
    import numbers

    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def numbers_per_level(name: str, values, levels: int | None = None) -> list[float]:
    """One finite number per level (a list or tuple); `levels` checks the count when given."""
    if isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of numbers, one per level, got {type(values).__name__}")
    out = [number(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if levels is not None and len(out) != levels:
        raise ValueError(f"{name} must have one value per level ({levels}), got {len(out)}")
    return out


def is_shape_only(x: torch.Tensor) -> bool:
    """Meta tensors and fake tensors (tracing): shapes but no values to check."""
    if x.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x)


def load_failure(exc: Exception) -> str:
    """Why torch.load(weights_only=True) could not read a file, in a few words, for a message that names the
    file and what it should be. Never torch's own text for a refused object: it advises loading with
    weights_only=False, which runs any code in the file."""
    if isinstance(exc, pickle.UnpicklingError):
        return "it holds Python objects other than tensors and plain values"
    text = str(exc).strip().splitlines()
    return f"unreadable: {type(exc).__name__}{': ' + text[0] if text else ''}"
