"""The dispatch registry: which implementations each operation has, and which one a call uses.

Each op module in ssattn.ops registers its fast implementations here
(`register`): the backend name, the device types it runs on, the dtypes it
takes and a check that says why its component (Triton kernels, the compiled
extension) cannot load. `resolve` only reads the registry; this module
imports no op, and nothing here imports a component at `import ssattn` time.
"auto" tries the op's implementations in registration order and falls back
to the reference (warning once when a component is missing); an explicitly
requested backend that cannot run raises.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "reference", "triton", "native")

_warned: set[str] = set()


def constant_for_compile(fn):
    """Mark fn's result as a compile-time constant, as torch.compiler.assume_constant_result does.

    That public decorator imports torch._dynamo (seconds at `import ssattn`) only to set this
    attribute; tests/test_ops.py's fullgraph compile tests fail if the mechanism changes.
    """
    fn._dynamo_marked_constant = True
    return fn


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# --------------------------------------------------------------------------- optional components
def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when Triton imports, else the reason it does not."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def kernel_module(name: str):
    """ssattn.kernels.<name>, or None when Triton or the module cannot be imported."""
    if triton_import_error() is not None:
        return None
    try:
        return importlib.import_module(f"ssattn.kernels.{name}")
    except ImportError as exc:
        warn_once(f"kernel:{name}", f"ssattn: Triton kernels '{name}' failed to import ({exc}); using the reference path")
        return None


@functools.lru_cache(maxsize=None)
def native_module():
    """The compiled extension ssattn._C, or None."""
    try:
        return importlib.import_module("ssattn._C")
    except Exception:
        return None


def triton_runs_on(device_type: str) -> bool:
    """Where Triton kernels run: CUDA, and CPU tensors under TRITON_INTERPRET=1 (asked for by name only)."""
    return device_type == "cuda" or (device_type == "cpu" and triton_interpreting())


TRITON_DEVICES = "Triton kernels run on CUDA tensors, or on CPU under TRITON_INTERPRET=1"


def kernel_missing(name: str) -> str | None:
    """Why ssattn.kernels.<name> cannot be used, or None when it can."""
    err = triton_import_error()
    if err is not None:
        return f"Triton is not importable: {err}"
    if kernel_module(name) is None:
        return f"the Triton kernels '{name}' failed to import"
    return None


def triton_kernels(op: str, backend: str, name: str, backends: tuple[str, ...] = ("triton",)):
    """ssattn.kernels.<name> for an op called with one of its Triton backends, or a clear error."""
    if backend not in backends:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {list(backends)}")
    mod = kernel_module(name)
    if mod is None:
        raise RuntimeError(f"ssattn: the Triton kernels '{name}' are not available")
    return mod


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Implementation:
    """One fast implementation of an op."""

    backend: str
    auto_devices: tuple[str, ...]  # device types "auto" picks it for
    runs_on: Callable[[str], bool]  # whether it can run on a device type when asked for by name
    devices_text: str  # where it runs, in words, for error messages
    dtypes: tuple[torch.dtype, ...] | None  # None: any dtype
    missing: Callable[[str], str | None]  # device type -> why it cannot run there, or None


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, *, auto_devices, devices_text: str, runs_on=None, dtypes=None,
             missing: Callable[[str], str | None] = lambda device_type: None) -> None:
    """Register a fast implementation of `op` (tried by "auto" in registration order).

    auto_devices: the device types "auto" picks it for. runs_on(device_type): where it can run
    when asked for by name (default: auto_devices; the Triton interpreter adds CPU, which "auto"
    never picks because it is slow). dtypes: the input dtypes it takes (others use the next
    implementation or the reference, silently, also when this backend is asked for by name).
    missing(device_type): why it cannot run although meant to (a component not built or not
    importable), or None; "auto" warns once about it, a request by name raises.
    """
    if backend in ("auto", "reference"):
        raise ValueError(f"backend name {backend!r} is reserved")
    auto_devices = tuple(auto_devices)
    _REGISTRY.setdefault(op, {})[backend] = Implementation(
        backend, auto_devices, runs_on or (lambda device_type: device_type in auto_devices), devices_text,
        None if dtypes is None else tuple(dtypes), missing,
    )


def backends_of(op: str) -> tuple[str, ...]:
    """The fast backends registered for op, in the order "auto" tries them."""
    return tuple(_REGISTRY.get(op, {}))


def _takes(impl: Implementation, dtype) -> bool:
    return dtype is None or impl.dtypes is None or dtype in impl.dtypes


def _why_not(impl: Implementation, device_type: str) -> str | None:
    if not impl.runs_on(device_type):
        return impl.devices_text
    return impl.missing(device_type)


@constant_for_compile
def resolve(op: str, backend: str, device_type: str, dtype: torch.dtype | None = None,
            allow_fast: bool = True) -> str:
    """The backend one call uses: "reference" or a registered fast backend's name.

    A function of constants only, evaluated eagerly even while torch.compile traces, so the
    graph contains just the chosen path. allow_fast=False (e.g. inputs the fast path has no
    backward for) makes "auto" take the reference without a warning.
    """
    if backend not in BACKENDS and backend not in backends_of(op):
        raise ValueError(f"backend must be one of {['auto', 'reference', *backends_of(op)]}, got {backend!r}")
    if backend == "reference":
        return "reference"
    impls = _REGISTRY.get(op, {})
    if backend == "auto":
        if not allow_fast:
            return "reference"
        for impl in impls.values():
            if device_type not in impl.auto_devices or not _takes(impl, dtype):
                continue  # not meant for this device or dtype: nothing to warn about
            reason = impl.missing(device_type)
            if reason is None:
                return impl.backend
            warn_once(
                f"{op}:{impl.backend}:{device_type}",
                f"ssattn.{op}: the {impl.backend} backend is not available on {device_type} "
                f"({reason}); falling back to the reference implementation",
            )
        return "reference"
    impl = impls.get(backend)
    if impl is None:
        raise ValueError(f"ssattn.{op} has no '{backend}' backend; use one of {['auto', 'reference', *impls]}")
    reason = _why_not(impl, device_type)
    if reason is not None:
        raise RuntimeError(f"ssattn.{op}: backend '{backend}' cannot run on {device_type} ({reason})")
    # A dtype the fast path does not take (e.g. float64) runs the reference formulas, as documented.
    return backend if _takes(impl, dtype) else "reference"


def auto_unavailable(op: str, device_type: str, dtype: torch.dtype | None = None) -> list[tuple[str, str]]:
    """(backend, why) for each implementation "auto" would try for op on this device and dtype but cannot
    run now (a component not built or not importable): why "auto" falls back to the reference."""
    out = []
    for impl in _REGISTRY.get(op, {}).values():
        if device_type in impl.auto_devices and _takes(impl, dtype):
            reason = impl.missing(device_type)
            if reason is not None:
                out.append((impl.backend, reason))
    return out


def available(op: str, backend: str, device_type: str) -> bool:
    """Whether a registered backend of op can run on this device type now (for `ssattn info` and tests)."""
    impl = _REGISTRY.get(op, {}).get(backend)
    return impl is not None and _why_not(impl, device_type) is None
