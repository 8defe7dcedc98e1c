"""`ssattn info`: versions, what was built, and which backend backend="auto" uses for each op on this machine."""

from __future__ import annotations

OPS = ("masked_cross_attention", "guidance_pyramid", "alignment_loss", "caption_feature_loss")


def register(sub) -> None:
    p = sub.add_parser("info", help="show versions, what was built, and the backend 'auto' uses for each op here")
    p.set_defaults(func=run)


def _dtypes():
    import torch

    return (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _choice(op: str, device_type: str, dtype) -> str:
    """What backend="auto" does for op on this device type and dtype, in words."""
    import warnings

    from ssattn import _backends
    from ssattn.ops import attention, attention_cpu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing component is said below, not warned about
        chosen = _backends.resolve(op, "auto", device_type, dtype)
    text = chosen
    if op == "masked_cross_attention" and chosen == attention_cpu.BACKEND and not attention_cpu.worth_it(
            _one_key(dtype), _one_key(dtype)):  # not even one key: "auto" goes by the size of the problem
        mib = attention_cpu.AUTO_MIN_SCORE_BYTES // 2**20
        text = f"reference up to {mib} MiB of attention scores per call, {chosen} above"
    elif op == "masked_cross_attention" and chosen == "triton":
        text = f"triton ({attention.SHORT} for <= {attention.SHORT_MAX_KEYS} keys)" if attention._short_available(
            device_type, dtype) else chosen
    elif op == "guidance_pyramid" and chosen != "reference":
        text = f"{chosen} (reference when the input needs gradients)"
    elif chosen == "native":
        text = f"native ({'C++' if device_type == 'cpu' else 'CUDA'}, ssattn._C)"
    missing = _backends.auto_unavailable(op, device_type, dtype)
    if chosen == "reference" and missing:
        text += " (" + "; ".join(f"{b} not available: {why}" for b, why in missing) + ")"
    return text


def _one_key(dtype):
    import torch

    return torch.empty((1, 1, 1, 1), dtype=dtype, device="meta")


def auto_backends(op: str, device_type: str) -> list[tuple[list[str], str]]:
    """[(dtype names, what "auto" uses)] for op on device_type; dtypes with the same choice are grouped."""
    groups: dict[str, list[str]] = {}
    for dtype in _dtypes():
        groups.setdefault(_choice(op, device_type, dtype), []).append(str(dtype).replace("torch.", ""))
    return [(names, text) for text, names in groups.items()]


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

        interpreting = _backends.triton_interpreting()
        print(f"triton {triton.__version__} (interpreter: {interpreting})")
        for name in ("attention", "attention_short", "pyramid"):
            if _backends.kernel_module(name) is None:
                state = "not importable"
            elif cuda:
                state = "importable, runs on the CUDA devices here"
            else:  # importable is not runnable: Triton kernels need a GPU (the interpreter is for tests)
                state = "importable; needs a CUDA GPU to run" + (" (here: the interpreter, for tests)" if interpreting
                                                                  else "")
            print(f"  kernels.{name}: {state}")
    else:
        print(f"triton: not available ({err})")
    native = _backends.native_module()
    line = f"native extension ssattn._C: {'built' if native is not None else 'not built'}"
    if native is not None and hasattr(native, "has_cuda"):
        # Compiled in is not the same as runnable: the kernels also need a CUDA device.
        compiled = bool(native.has_cuda())
        line += f" (CUDA kernels compiled: {'yes' if compiled else 'no'}, usable: {'yes' if compiled and cuda else 'no'})"
    print(line)
    print('backend="auto" on this machine (per device and input dtype):')
    for op in OPS:
        for device_type in ("cpu", "cuda") if cuda else ("cpu",):
            for names, text in auto_backends(op, device_type):
                print(f"  {op} on {device_type} ({', '.join(names)}): {text}")
    return 0
