"""Which fast paths exist on this machine, and which one a call uses.

Fast paths register themselves here (the Triton kernels from ssattn.kernels,
the compiled extension ssattn._C); nothing is imported at `import ssattn`
time that could fail. "auto" falls back to the reference with one warning
per missing component; an explicit backend that cannot run raises.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "triton", "native")

_warned: set[str] = set()


def constant_for_compile(fn):
    """torch.compiler.assume_constant_result, without importing torch._dynamo at `import ssattn`.

    That decorator only sets this attribute, but its import costs seconds;
    tests/test_ops.py's fullgraph compile tests fail if the mechanism changes.
    """
    fn._dynamo_marked_constant = True
    return fn


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


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
    return device_type == "cuda" or (device_type == "cpu" and triton_interpreting())


# The fast backends of each public op, and the kernel module or check behind each.
FAST_BACKENDS = {
    "guidance_pyramid": ("triton",),
    "masked_cross_attention": ("triton",),
    "alignment_loss": ("native",),
}
_KERNEL_OF = {"guidance_pyramid": "pyramid", "masked_cross_attention": "attention"}
# What "auto" tries, per device type, best first.
_PREFER = {
    "guidance_pyramid": {"cuda": ("triton",)},
    "masked_cross_attention": {"cuda": ("triton",)},
    "alignment_loss": {"cuda": ("native",), "cpu": ("native",)},
}


def can_run(op: str, name: str, device_type: str) -> bool:
    """Whether backend `name` of `op` can run on this device type now."""
    if name == "triton":
        return triton_runs_on(device_type) and kernel_module(_KERNEL_OF[op]) is not None
    if name == "native":
        from .ops import alignment  # registers the fake kernel and autograd of the compiled op

        return alignment.available(device_type)
    return False


@constant_for_compile
def resolve(op: str, backend: str, device_type: str, allow_fast: bool = True) -> str:
    """The backend one call uses: "reference" or a fast backend name.

    A function of constants only, evaluated eagerly even while torch.compile
    traces, so the graph contains just the chosen path. allow_fast=False
    (e.g. the pyramid with inputs that require grad) makes "auto" take the
    reference without a warning.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "reference":
        return "reference"
    fast = FAST_BACKENDS[op]
    if backend == "auto":
        if not allow_fast:
            return "reference"
        for name in _PREFER[op].get(device_type, ()):
            if can_run(op, name, device_type):
                return name
            warn_once(
                f"{op}:{name}:{device_type}",
                f"ssattn.{op}: the {name} backend is not available on {device_type} "
                f"({why_unavailable(name)}); falling back to the reference implementation",
            )
        return "reference"
    if backend not in fast:
        raise ValueError(f"ssattn.{op} has no '{backend}' backend; use one of {['auto', 'reference', *fast]}")
    if not can_run(op, backend, device_type):
        raise RuntimeError(f"ssattn.{op}: backend '{backend}' cannot run on {device_type} ({why_unavailable(backend)})")
    return backend


@constant_for_compile
def attention_impl(dtype: torch.dtype) -> str:
    """The impl string of the Triton attention op for inputs of this dtype.

    Read once per compiled graph: the float32 precision setting
    (torch.backends.cuda.matmul) is baked into a graph when it is traced.
    """
    mod = kernel_module("attention")
    choose = getattr(mod, "default_impl", None)
    return choose(torch.empty(0, dtype=dtype)) if choose is not None else "triton"


def why_unavailable(name: str) -> str:
    if name == "triton":
        err = triton_import_error()
        if err is not None:
            return f"Triton is not importable: {err}"
        return "Triton kernels run on CUDA tensors, or on CPU under TRITON_INTERPRET=1"
    if name == "native":
        return "the extension ssattn._C is not built; reinstall with a C++ compiler: pip install --no-build-isolation -e ."
    return "unknown backend"
