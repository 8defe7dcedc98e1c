"""Build script: the ssattn packages and the optional extension ssattn._C.

The extension is built when torch is importable at build time (use
`pip install --no-build-isolation`); set SSATTN_NO_NATIVE=1 to skip it. Its
CUDA kernels (minutes of nvcc) are built only where they can run or are asked
for: torch is a CUDA build, nvcc is found, and a CUDA GPU is visible at build
time (for its architectures only), or SSATTN_CUDA=1 or TORCH_CUDA_ARCH_LIST
asks for them (a docker or cluster build without a GPU; default architectures
"8.0;9.0"). SSATTN_NO_CUDA=1 always skips them. Otherwise one line says the
C++ part alone is built. ninja, when installed, compiles the sources in
parallel (MAX_JOBS bounds the jobs). A failed extension build does not fail
the install: ssattn then warns once and uses the reference paths.
"""

import importlib.util
import os
import sys
import time

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["ssattn", "ssattn.*"])

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
CPU_SOURCES = ["module.cpp", "alignment_op.cpp", "alignment_cpu.cpp", "caption_loss_op.cpp", "caption_loss_cpu.cpp"]
CUDA_SOURCES = ["alignment_cuda.cu", "caption_loss_cuda.cu"]
FALLBACK = "ssattn will warn once and use the reference implementation"


def _log(msg: str) -> None:
    print(f"ssattn setup: {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


DEFAULT_ARCHS = "8.0;9.0"  # A100 and H100/H200, when the CUDA kernels are asked for without a GPU to detect


def cuda_plan(torch_cuda_version, gpu_visible: bool, env) -> tuple[bool, str]:
    """(build the CUDA kernels?, why) from torch's CUDA version (None for a CPU build), whether a CUDA GPU is
    visible now, and the environment (SSATTN_NO_CUDA, SSATTN_CUDA, TORCH_CUDA_ARCH_LIST)."""
    def flag(name):
        return env.get(name, "0").strip().lower() not in ("", "0", "false", "no")

    if flag("SSATTN_NO_CUDA"):
        return False, "SSATTN_NO_CUDA is set: building the C++ (CPU) part only"
    if torch_cuda_version is None:
        return False, "torch is a CPU build: building the C++ (CPU) part only"
    if env.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return True, f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}: building the CUDA kernels for it"
    if flag("SSATTN_CUDA"):
        return True, f"SSATTN_CUDA is set: building the CUDA kernels for {DEFAULT_ARCHS}"
    if gpu_visible:
        return True, "a CUDA GPU is visible: building the CUDA kernels for its architecture"
    return False, ("no CUDA GPU visible: building the C++ (CPU) part only (its CUDA kernels could not run here; "
                   "SSATTN_CUDA=1 or TORCH_CUDA_ARCH_LIST=... builds them anyway, e.g. in a docker build)")


def _cuda_env(torch) -> bool:
    """Decide whether to build the CUDA kernels (cuda_plan) and set what torch.utils.cpp_extension needs."""
    try:
        gpu = torch.version.cuda is not None and torch.cuda.is_available()
    except Exception:  # a broken driver: no GPU to build for
        gpu = False
    want, why = cuda_plan(torch.version.cuda, gpu, os.environ)
    _log(why)
    if not want:
        return False
    # /usr/local/bin/nvcc may be a wrapper, and CUDA_HOME=/usr/local then misses cudart: prefer the toolkit dir.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
    if not gpu:  # without a GPU torch cannot detect the architectures (and fails with an IndexError)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
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


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import cuda_plan
    EXT_MODULES, CMDCLASS = _native()
    setup(packages=PACKAGES, ext_modules=EXT_MODULES, cmdclass=CMDCLASS)
