"""`ssattn info`: versions and which backends run on this machine."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="show versions and available backends")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    import ssattn
    from ssattn import _backends

    cuda = torch.cuda.is_available()
    usable = f"usable ({torch.cuda.device_count()} device(s))" if cuda else "not usable here (no CUDA device or a CPU build)"
    print(f"ssattn {ssattn.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}: {usable}")
    err = _backends.triton_import_error()
    if err is None:
        import triton

        print(f"triton {triton.__version__} (interpreter: {_backends.triton_interpreting()})")
        for name in ("attention", "attention_short", "pyramid"):
            mod = _backends.kernel_module(name)
            print(f"  kernels.{name}: {'ok' if mod is not None else 'not importable'}")
    else:
        print(f"triton: not available ({err})")
    native = _backends.native_module()
    line = f"native extension ssattn._C: {'built' if native is not None else 'not built'}"
    if native is not None and hasattr(native, "has_cuda"):
        # Compiled in is not the same as runnable: the kernels also need a CUDA device.
        compiled = bool(native.has_cuda())
        line += f" (CUDA kernels compiled: {'yes' if compiled else 'no'}, usable: {'yes' if compiled and cuda else 'no'})"
    print(line)
    return 0
