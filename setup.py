"""Build script: packages (kernels/ ships as ssattn.kernels) and the optional extension ssattn._C.

The extension is built when torch is importable at build time (use
`pip install --no-build-isolation`); set SSATTN_NO_NATIVE=1 to skip it. Its
CUDA kernels are built too when torch is a CUDA build and nvcc is found
(SSATTN_NO_CUDA=1 skips them; TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0").
A failed extension build does not fail the install: ssattn then warns once
and uses the reference paths.
"""

import importlib.util
import os
import sys
import time

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["ssattn", "ssattn.*"]) + ["ssattn.kernels"]
PACKAGE_DIR = {"ssattn.kernels": "kernels"}

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
CPU_SOURCES = ["module.cpp", "alignment_op.cpp", "alignment_cpu.cpp", "caption_loss_op.cpp", "caption_loss_cpu.cpp"]
CUDA_SOURCES = ["alignment_cuda.cu", "caption_loss_cuda.cu"]
FALLBACK = "ssattn will warn once and use the reference implementation"


def _log(msg: str) -> None:
    print(f"ssattn setup: {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _cuda_env(torch) -> bool:
    """Set what torch.utils.cpp_extension needs to compile .cu files here; True when CUDA can be built."""
    if _flag("SSATTN_NO_CUDA"):
        _log("SSATTN_NO_CUDA is set: building the C++ (CPU) path only")
        return False
    if torch.version.cuda is None:
        _log("torch is a CPU build: building the C++ (CPU) path only")
        return False
    # /usr/local/bin/nvcc may be a wrapper, and CUDA_HOME=/usr/local then misses cudart: prefer the toolkit dir.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
    # Without a GPU torch cannot guess the architectures (and fails with an IndexError).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return True


def _nvidia_includes() -> list:
    """Include dirs of pip-installed CUDA headers (cusparse.h etc. for CUDA 13 wheels of torch)."""
    dirs = []
    try:
        spec = importlib.util.find_spec("nvidia.cu13")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        inc = os.path.join(loc, "include")
        if os.path.isdir(inc):
            dirs.append(inc)
    return dirs


def _native():
    """(ext_modules, cmdclass) for ssattn._C, or ([], {}) when it is not to be built."""
    if _flag("SSATTN_NO_NATIVE"):
        _log(f"SSATTN_NO_NATIVE is set: not building ssattn._C; {FALLBACK}")
        return [], {}
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken torch
        _log(
            f"torch is not importable at build time ({exc}); not building ssattn._C; {FALLBACK}. "
            "Build it with: pip install --no-build-isolation -e ."
        )
        return [], {}
    want_cuda = _cuda_env(torch)
    try:
        from torch.utils import cpp_extension as ce  # reads CUDA_HOME at import
    except Exception as exc:
        _log(f"torch.utils.cpp_extension failed to import ({exc}); not building ssattn._C; {FALLBACK}")
        return [], {}
    if want_cuda and ce.CUDA_HOME is None:
        _log("nvcc not found (set CUDA_HOME): building the C++ (CPU) path only")
        want_cuda = False
    cxx = ["-O3", "-g0"]
    sources = [os.path.join(CSRC, s) for s in CPU_SOURCES]
    if want_cuda:
        ext = ce.CUDAExtension(
            "ssattn._C",
            sources + [os.path.join(CSRC, s) for s in CUDA_SOURCES],
            include_dirs=[os.path.join(HERE, CSRC)] + _nvidia_includes(),
            define_macros=[("SSATTN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-Xcompiler", "-g0"]},
        )
    else:
        ext = ce.CppExtension(
            "ssattn._C", sources, include_dirs=[os.path.join(HERE, CSRC)], extra_compile_args={"cxx": cxx}
        )

    class BuildNative(ce.BuildExtension):
        """torch's BuildExtension, but a failure leaves a pure-Python install instead of an error."""

        def run(self):
            start = time.time()
            what = "C++ and CUDA" if want_cuda else "C++"
            _log(f"building ssattn._C ({what}; CUDA_HOME={os.environ.get('CUDA_HOME')}, "
                 f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
            try:
                super().run()
            except Exception as exc:  # compiler missing, compile or link error
                _log(f"building ssattn._C FAILED ({type(exc).__name__}: {exc}); installing without it; {FALLBACK}")
                return
            _log(f"built ssattn._C in {time.time() - start:.0f} s")

    return [ext], {"build_ext": BuildNative.with_options(use_ninja=_has_ninja())}


def _has_ninja() -> bool:
    try:
        from torch.utils.cpp_extension import is_ninja_available

        return is_ninja_available()
    except Exception:
        return False


EXT_MODULES, CMDCLASS = _native()

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=EXT_MODULES, cmdclass=CMDCLASS)
