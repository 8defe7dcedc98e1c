"""`ssattn info`: versions and which backends run on this machine."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="show versions and available backends")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    import ssattn
    from ssattn import _backends

    print(f"ssattn {ssattn.__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    err = _backends.triton_import_error()
    if err is None:
        import triton

        print(f"triton {triton.__version__} (interpreter: {_backends.triton_interpreting()})")
        for name in ("attention", "pyramid"):
            mod = _backends.kernel_module(name)
            print(f"  kernels.{name}: {'ok' if mod is not None else 'not importable'}")
    else:
        print(f"triton: not available ({err})")
    native = _backends.native_module()
    print(f"native extension ssattn._C: {'built' if native is not None else 'not built'}"
          + (f" (CUDA kernels: {native.has_cuda()})" if native is not None and hasattr(native, 'has_cuda') else ""))
    return 0
