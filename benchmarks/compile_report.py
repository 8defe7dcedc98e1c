"""Static sm_90 (Hopper) compile report of ssattn's Triton kernels; no GPU needed.

Every Triton kernel is compiled ahead of time for GPUTarget("cuda", 90, 32)
with the installed Triton, for each autotune config of ssattn/kernels/attention.py
that its `_prune` keeps, over representative shape classes, plus the pyramid
kernel at its default options. Per compiled kernel the table gives registers
per thread, spill stores/loads and stack (from Triton's own `ptxas -v` run),
shared memory (Triton's metadata: it is dynamic, ptxas does not see it),
CTAs per SM that registers, shared memory and warps allow, and the MMA
instructions in the PTX (wgmma.mma_async = Hopper warpgroup MMA, mma.sync =
the Ampere path). These are compiler facts, not GPU measurements.

The kernel arguments are produced by the real host code (ssattn/kernels/attention.py
forward/backward, ssattn/kernels/pyramid.py _launch) called on meta tensors with the
launches intercepted, and specialized by Triton's own binder, so every
kernel is compiled exactly as a contiguous (or NCHW-view) call on a GPU would
specialize it: pointers 16-byte aligned, integers equal to 1 turned into
constants, multiples of 16 marked divisible.

    python benchmarks/compile_report.py --out report.md           # everything (minutes)
    python benchmarks/compile_report.py --quick                   # one config per kernel
    python benchmarks/compile_report.py --kernels fwd,dq --dtypes bf16 --head-dims 64
    python benchmarks/compile_report.py --quick --pipeline --dtypes bf16,bf16-fexp2   # + TTGIR comparison

Also from the TTGIR: per kernel, 2-D tile round trips through shared memory
(`ttg.local_load` into a 2-D tensor, `ttg.local_alloc` of a 2-D register
tensor), fully drained wgmma waits (`pendings = 0`), and exponential
instructions per score (1 for exp2, 0.5 for packed ex2.approx.f16x2).
`--pipeline` compiles each MMA kernel once more without the per-key weight
and tables the two: the weight must cost fwd and dq no tile round trip and no
drained wait (issue 12; enforced by tests/test_kernels_compile.py).

Uses Triton internals that are the same in 3.6 to 3.9 (runtime.jit.
create_function_from_signature, JITFunction._pack_args, compiler.ASTSource).
"""

from __future__ import annotations

import os
import sys

# The AOT compile needs real JITFunctions: TRITON_INTERPRET=1 (set by the test suite) would make
# @triton.jit return interpreter objects. It must be dropped before the kernels are imported.
os.environ.pop("TRITON_INTERPRET", None)
# Triton prints the ptxas -v log it already produces; capturing it avoids a second ptxas run.
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from ssattn.kernels import attention as attn  # noqa: E402
from ssattn.kernels import attention_short as short  # noqa: E402
from ssattn.kernels import pyramid as pyr  # noqa: E402
from ssattn.reference.pyramid import NORM_EPS  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
SMEM_PER_SM = 228 * 1024  # H100: 228 KB per SM, of which a block may use 227 KB
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED = 1024  # per resident block, reserved by the driver
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32

ATTN_KINDS = ("fwd", "dkdv", "dq", "fused", "delta")  # fused: the single-pass backward (dkdv + dq by atomics)
SHORT_KINDS = ("short-fwd", "short-bwd")  # ssattn/kernels/attention_short.py (Nk <= 128), text keys
KINDS = ATTN_KINDS + SHORT_KINDS + ("pyramid",)
SHORT_L = 77  # text keys of the short-key cases: CLIP's 77 tokens (BLOCK_N 128)
DTYPES = {"bf16": (torch.bfloat16, ""), "fp16": (torch.float16, ""), "fp32-tf32": (torch.float32, "tf32"),
          "fp32-ieee": (torch.float32, "ieee"), "fp32-tf32x3": (torch.float32, "tf32x3"),
          "bf16-fexp2": (torch.bfloat16, ""), "fp16-fexp2": (torch.float16, "")}
FAST_EXP2_DTYPES = ("bf16-fexp2", "fp16-fexp2")  # the forward with SSATTN_FAST_EXP2=1 (packed ex2.approx.f16x2)
# Kernels whose weighted TTGIR must not add tile round trips or drained waits to the unweighted one
# (issue 12); dkdv and fused are compared too, for information.
PIPELINE_KINDS = ("fwd", "dq", "dkdv", "fused")
PIPELINE_ENFORCED = ("fwd", "dq")
NO_W = " no-w"
DEFAULT_DTYPES = ("bf16", "fp32-tf32", "fp32-ieee")
ATTN_B, ATTN_H, ATTN_N = 4, 2, 4096  # N = 64x64 tokens: large enough that _prune's size rule drops nothing


@dataclasses.dataclass
class Job:
    kernel: str  # fwd | dkdv | dq | delta | pyramid
    case: str  # shape class, e.g. "bf16 d=64 W"
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict  # constexprs + num_warps / num_stages

    def config(self) -> str:
        kw = self.kwargs
        if self.kernel == "pyramid":
            return f"BM{kw['BM']} BN{kw['BN']} BK{kw['BK']} w{kw.get('num_warps', 4)}"
        if self.kernel == "delta":
            return f"BM{kw['BLOCK_M']} w{kw.get('num_warps', 4)}"
        return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{kw['num_warps']} s{kw['num_stages']}"


# --------------------------------------------------------------------------- argument capture
class _Recorder:
    """Stands in for a kernel or a launch helper: records what the host code would launch."""

    def __init__(self, calls, kind=None):
        self.calls, self.kind = calls, kind

    def __getitem__(self, grid):  # kernel[grid](*args, **kwargs)
        return lambda *args, **kwargs: self.calls.append((self.kind, None, args, kwargs))

    def __call__(self, tuned, raw, kind, grid_fn, args, meta, deterministic=False):  # attention._launch
        self.calls.append((kind, raw, args, meta))


@contextlib.contextmanager
def _patched(module, **attrs):
    old = {k: getattr(module, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(module, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _attn_inputs(dtype, d, layout, has_w, has_kpm):
    """Meta tensors shaped like a module call: contiguous (B, h, N, d), or the NCHW view (token stride 1)."""
    B, h, N = ATTN_B, ATTN_H, ATTN_N
    if layout == "nchw":  # SemanticCrossAttention: (B, h*d, H, W).view(B, h, d, N).transpose(-1, -2)
        q, k, v = (torch.empty(B, h * d, 64, 64, dtype=dtype, device="meta").view(B, h, d, N).transpose(-1, -2)
                   for _ in range(3))
    else:
        q, k, v = (torch.empty(B, h, N, d, dtype=dtype, device="meta") for _ in range(3))
    w = torch.empty(B, N, dtype=dtype, device="meta") if has_w else None
    kpm = torch.empty(B, N, dtype=torch.bool, device="meta") if has_kpm else None
    return q, k, v, w, kpm


def attention_launches(dtype, prec, d, layout="contiguous", has_w=True, has_kpm=False, weight_grad=True,
                       fast_exp2=False):
    """{kind: (JITFunction, args, meta)} of one forward + both backwards (two-pass and single-pass),
    from the real host code."""
    q, k, v, w, kpm = _attn_inputs(dtype, d, layout, has_w, has_kpm)
    scale = d ** -0.5
    calls = []
    with _patched(attn, _check=lambda *a: None, _launch=_Recorder(calls),
                  attn_bwd_delta_kernel=_Recorder(calls, "delta"),
                  fast_exp2_enabled=lambda *a: fast_exp2):
        out, stats = attn.forward(q, k, v, w, kpm, scale, precision=prec or "ieee")
        for deterministic in (True, False):
            attn.backward(torch.empty_like(out), q, k, v, w, kpm, out, stats, scale, weight_grad,
                          precision=prec or "ieee", deterministic=deterministic)
    raw = {"delta": attn.attn_bwd_delta_kernel}
    return {kind: (fn or raw[kind], args, meta) for kind, fn, args, meta in calls}


def attention_jobs(kinds, dtypes, head_dims, quick, configs=None, pipeline=""):
    """Jobs for every (shape class, kept config); quick: the default heuristic config only;
    configs: explicit [(BLOCK_M, BLOCK_N, warps, stages)] instead of the autotune lists (not pruned);
    pipeline: also each MMA kernel compiled without the weight (case label + NO_W), to compare TTGIR."""
    jobs = []
    for case, dtype, prec, d, extra, case_kinds in _attention_cases(dtypes, head_dims, quick, pipeline):
        launches = attention_launches(dtype, prec, d, **extra)
        for kind in (k for k in kinds if k in case_kinds):
            fn, args, meta = launches[kind]
            cfgs = _attention_configs(kind, fn, args, meta, dtype, quick)
            if configs and kind != "delta":
                cfgs = [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st} for bm, bn, w, st in configs]
            for cfg in cfgs:
                jobs.append(Job(kind, case, fn, args, {**meta, **cfg}))
    return jobs


def _attention_cases(dtypes, head_dims, quick, pipeline=""):
    """(label, dtype, options, d, launch kwargs, kernels): the main grid, the unweighted twins (pipeline),
    the packed-exp2 forward, plus KPM=True and the NCHW view."""
    for name in dtypes:
        dtype, prec = DTYPES[name]
        for d in head_dims:
            if name in FAST_EXP2_DTYPES:
                if d <= 64:  # the option's range
                    yield f"{name} d={d}", dtype, prec, d, {"fast_exp2": True}, ("fwd",)
                continue
            yield f"{name} d={d}", dtype, prec, d, {}, ATTN_KINDS
            # "ci" (the CI test): the enforced kernels of the first dtype only, to keep it short.
            if pipeline == "all" or (pipeline == "ci" and name == dtypes[0]):
                kinds = PIPELINE_ENFORCED if pipeline == "ci" else PIPELINE_KINDS
                yield f"{name} d={d}{NO_W}", dtype, prec, d, {"has_w": False, "weight_grad": False}, kinds
    if quick:
        return
    dtype, prec = DTYPES[dtypes[0]]
    d = 64 if 64 in head_dims else head_dims[0]
    yield f"{dtypes[0]} d={d} KPM", dtype, prec, d, {"has_kpm": True}, ATTN_KINDS
    if "bf16" in dtypes and 32 in head_dims:  # the module's NCHW view: stride 1 along the tokens
        yield "bf16 d=32 NCHW", torch.bfloat16, "", 32, {"layout": "nchw"}, ("fwd",)


def _attention_configs(kind, fn, args, meta, dtype, quick):
    """Kernel kwargs per config: the autotune list after _prune, or the heuristic one."""
    if kind == "delta":
        return [{}]
    named = {**dict(zip(fn.arg_names, args)), **meta}
    if quick:
        return [attn._heuristic(kind, attn._class_of(named))]
    kept = attn._prune(kind, attn._configs(attn.configs.choices(kind)), named)
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in kept]


def short_launches(dtype, prec, d, L=SHORT_L):
    """{kind: (JITFunction, args, kwargs)} of the short-key forward and (atomic) backward, from the real host
    code, on the text module's views: q from an NCHW 64x64 image projection, k and v Linear head views of
    (B, L, h*d) word features, a weight and a padding mask over the words."""
    B, h, N = ATTN_B, ATTN_H, ATTN_N
    q = torch.empty(B, h * d, 64, 64, dtype=dtype, device="meta").view(B, h, d, N).transpose(-1, -2)
    k, v = (torch.empty(B, L, h * d, dtype=dtype, device="meta").view(B, L, h, d).transpose(1, 2) for _ in range(2))
    w = torch.empty(B, L, dtype=dtype, device="meta")
    kpm = torch.empty(B, L, dtype=torch.bool, device="meta")
    calls = []
    with _patched(short, _check_short=lambda *a: None, short_fwd_kernel=_Recorder(calls, "short-fwd"),
                  short_bwd_kernel=_Recorder(calls, "short-bwd")):
        out, stats = short.forward(q, k, v, w, kpm, d ** -0.5, precision=prec or "ieee")
        short.backward(torch.empty_like(out), q, k, v, w, kpm, out, stats, d ** -0.5, True, precision=prec or "ieee")
    raw = {"short-fwd": short.short_fwd_kernel, "short-bwd": short.short_bwd_kernel}
    return {kind: (raw[kind], args, kwargs) for kind, _, args, kwargs in calls}


def short_jobs(kinds, dtypes, head_dims):
    """One job per short-key kernel, dtype and head dim (the launcher's one config), at L = SHORT_L."""
    jobs = []
    for name in dtypes:
        if name in FAST_EXP2_DTYPES:
            continue
        dtype, prec = DTYPES[name]
        for d in head_dims:
            launches = short_launches(dtype, prec, d)
            jobs += [Job(kind, f"{name} d={d} L={SHORT_L}", *launches[kind]) for kind in kinds]
    return jobs


def pyramid_jobs(quick):
    """The pyramid kernel as the GPU path launches it (SPEC benchmark: B=16, 24x24 grid, 512..64)."""
    sizes = [(512, 512), (256, 256), (128, 128), (64, 64)]
    cases = [("24x24 grid", (24, 24), False)]
    if not quick:  # each pyramid compile takes ~10 s: quick keeps the grid case only
        cases += [("24x24 features Cf=256", (24, 24), True), ("64x64 grid", (64, 64), False)]
    jobs = []
    for label, (gh, gw), has_text in cases:
        calls = []
        with _patched(pyr, _pyramid_kernel=_Recorder(calls, "pyramid")):
            _pyramid_launch(16, gh, gw, sizes, has_text)
        _, _, args, kwargs = calls[0]
        jobs.append(Job("pyramid", label, pyr._pyramid_kernel, args, kwargs))
    return jobs


def _pyramid_launch(B, gh, gw, sizes, has_text):
    """guidance_pyramid's CUDA-path choices (tiles, rows, programs per image), then the real _launch."""
    GH, GW = max(16, pyr._pow2(gh)), max(16, pyr._pow2(gw))
    if has_text:
        scores = torch.empty(B, gh * gw, 256, device="meta")
        text = torch.empty(B, 256, device="meta")
    else:
        scores, text = torch.empty(B, gh, gw, device="meta"), None
    wy, wx, wyoff, wxoff = pyr._weights(gh, gw, sizes, GH, GW, "meta")
    outs = [torch.empty(B, 1, h, w, device="meta") for h, w in sizes]
    bm, bn = (64, 32) if GH * GW <= 1024 else (32, 32)  # as guidance_pyramid picks on CUDA
    rch = 4 * bm
    n_items = sum(-(-w // bn) * -(-h // rch) for h, w in sizes)
    G = max(1, min(n_items, -(-(H100_SMS if has_text else 2 * H100_SMS) // B)))
    pyr._launch(scores, text, wy, wx, outs, sizes, wyoff, wxoff, gh, gw, 2.0, 0.2, False, NORM_EPS, G, rch,
                GH, GW, bm, bn, "ieee", True)


# --------------------------------------------------------------------------- compile + measure
@dataclasses.dataclass
class Result:
    job: Job
    ok: bool
    error: str = ""
    seconds: float = 0.0
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    smem: int | None = None
    wgmma: int = 0
    mma_sync: int = 0
    serialized: str = ""  # ptxas C7515/C7510: wgmma serialized (lost overlap), with its reason
    tile_loads: int = 0  # TTGIR: ttg.local_load into a 2-D tensor (a tile read back from shared memory)
    tile_allocs: int = 0  # TTGIR: ttg.local_alloc of a 2-D register tensor (a tile written to shared memory)
    drained_waits: int = 0  # TTGIR: warp_group_dot_wait with pendings = 0 (no wgmma left in flight)
    ex2_f32: int = 0  # PTX: ex2.approx(.ftz).f32 instructions
    ex2_packed: int = 0  # PTX: ex2.approx(.ftz).f16x2 / bf16x2 instructions (two exponentials each)
    ex2_per_score: float | None = None  # TTGIR: exponential instructions per score in the 2-D exp2 sites
    exp2_sites: int = 0  # TTGIR: 2-D exponential sites (score tiles exponentiated)
    loops: int = 0  # TTGIR: scf.for loops
    loads_outside: int = 0  # TTGIR: 2-D tile loads from global memory outside any loop (tt.load / async copy)
    loads_inside: int = 0  # TTGIR: the same inside a loop

    def blocks_per_sm(self) -> int | None:
        """Resident CTAs per SM allowed by registers, shared memory, warps (H100 limits)."""
        if self.regs is None or self.smem is None:
            return None
        warps = self.job.kwargs.get("num_warps", 4)
        regs_per_warp = -(-self.regs * 32 // 256) * 256  # allocated per warp in units of 256
        by_regs = (REGS_PER_SM // regs_per_warp) // warps
        by_smem = SMEM_PER_SM // (self.smem + SMEM_RESERVED) if self.smem else MAX_BLOCKS_PER_SM
        return min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM)


def compile_job(job: Job, target=TARGET) -> Result:
    """Compile one job for target with the specialization Triton's launcher would give its arguments."""
    backend = make_backend(target)
    binder = create_function_from_signature(job.fn.signature, job.fn.params, backend)
    start = time.time()
    log = io.StringIO()
    try:
        bound, spec, opts = binder(*job.args, **job.kwargs)
        options, signature, constexprs, attrs = job.fn._pack_args(backend, job.kwargs, bound, spec, opts)
        src = ASTSource(job.fn, signature, constexprs, attrs)
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # report the failure and go on with the other configs
        return Result(job, False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                      seconds=time.time() - start)
    res = Result(job, True, seconds=time.time() - start)
    ptx = ck.asm["ptx"]
    res.smem = int(ck.metadata.shared)
    res.wgmma = len(re.findall(r"wgmma\.mma_async", ptx))
    res.mma_sync = len(re.findall(r"\bmma\.sync", ptx))
    _parse_ptxas(log.getvalue() or _run_ptxas(ptx, target), res)
    _parse_ttgir(ck.asm["ttgir"], res)
    res.ex2_f32 = len(re.findall(r"\bex2\.approx(?:\.ftz)?\.f32\b", ptx))
    res.ex2_packed = len(re.findall(r"\bex2\.approx(?:\.ftz)?\.(?:f16x2|bf16x2)\b", ptx))
    return res


_TENSOR_2D = r"tensor<\d+x\d+x"


def pipeline_counts(ttgir: str) -> dict:
    """The TTGIR facts of issue 12 / KERNEL-NOTES: 2-D tile round trips through shared memory and
    fully drained wgmma waits. A 1-D local_load (the weight vector's own small ring) is not counted."""
    lines = ttgir.splitlines()
    return {
        "tile_loads": sum(1 for ln in lines if "ttg.local_load" in ln and re.search(r"->\s*" + _TENSOR_2D, ln)),
        "tile_allocs": sum(1 for ln in lines if re.search(r"ttg\.local_alloc %\S+ : \(" + _TENSOR_2D, ln)),
        "drained_waits": sum(1 for ln in lines if "warp_group_dot_wait" in ln and "pendings = 0 :" in ln),
    }


def exp2_per_score(ttgir: str) -> float | None:
    """Exponential instructions per score, averaged over the 2-D exponential sites of the TTGIR:
    1 for math.exp2, 1/pack for a packed inline-asm ex2 (e.g. 0.5 for ex2.approx.f16x2, pack=2)."""
    costs = []
    for ln in ttgir.splitlines():
        if re.search(r"math\.exp2 %\S+ : " + _TENSOR_2D, ln):
            costs.append(1.0)
        elif "elementwise_inline_asm" in ln and "ex2" in ln and re.search(_TENSOR_2D, ln):
            m = re.search(r"packed_element = (\d+)", ln)
            costs.append(1.0 / int(m.group(1)) if m else 1.0)
    return sum(costs) / len(costs) if costs else None


def tile_loads(ttgir: str) -> dict:
    """Loops and the 2-D tile loads from global memory outside and inside them (the short-key kernels load
    K and V once, outside any loop). Counts tt.load of a 2-D pointer tensor and async copies into shared
    memory; loops are not nested in these kernels."""
    counts = {"loops": 0, "loads_outside": 0, "loads_inside": 0, "exp2_sites": 0}
    loop_indent = None
    for ln in ttgir.splitlines():
        indent = len(ln) - len(ln.lstrip())
        if loop_indent is not None and indent == loop_indent and ln.strip().startswith("}"):
            loop_indent = None
        if "scf.for" in ln:
            counts["loops"] += 1
            loop_indent = indent if loop_indent is None else loop_indent
        if re.search(r"(= tt\.load |ttg\.async_copy_global_to_local ).*tensor<\d+x\d+x!tt\.ptr", ln):
            counts["loads_inside" if loop_indent is not None else "loads_outside"] += 1
        if re.search(r"math\.exp2 %\S+ : " + _TENSOR_2D, ln):
            counts["exp2_sites"] += 1
    return counts


def _parse_ttgir(ttgir: str, res: "Result") -> None:
    for key, value in {**pipeline_counts(ttgir), **tile_loads(ttgir)}.items():
        setattr(res, key, value)
    res.ex2_per_score = exp2_per_score(ttgir)


def _run_ptxas(ptx: str, target) -> str:
    """ptxas -v on the PTX (only when Triton's own log was not printed, e.g. a cache hit)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{target.arch}a" if target.arch >= 90 else f"sm_{target.arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(target.arch).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _parse_ptxas(log: str, res: Result) -> None:
    m = re.search(r"Used (\d+) registers", log)
    res.regs = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        res.stack, res.spill_stores, res.spill_loads = (int(g) for g in m.groups())
    m = re.search(r"wgmma\.mma_async instructions are serialized due to ([^\n.]*)", log)
    res.serialized = m.group(1).strip() if m else ""


# --------------------------------------------------------------------------- output
def tool_versions() -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(TARGET.arch)
    out = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return {"triton": triton.__version__, "torch": torch.__version__, "ptxas": out[-1] if out else "?",
            "ptxas_path": tool.path}


def header(cmd: str, versions: dict) -> str:
    return "\n".join([
        f"# Static compile report: ssattn Triton kernels for sm_90 (triton {versions['triton']})",
        "",
        "**Static compiler facts, not GPU measurements.** Compiled ahead of time without a GPU for",
        "`GPUTarget(\"cuda\", 90, 32)` (H100); nothing was run. Registers/spills/stack from ptxas -v,",
        "shared memory from Triton's metadata (dynamic shared memory), MMA counts from the PTX.",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- triton {versions['triton']}, torch {versions['torch']}",
        f"- ptxas: {versions['ptxas']} ({versions['ptxas_path']})",
        f"- command: `{cmd}`",
        f"- attention shapes: B={ATTN_B}, h={ATTN_H}, Nq=Nk={ATTN_N}, contiguous (B, h, N, d) unless NCHW; "
        "weight (B, N) in the input dtype; WEIGHT_GRAD=True; scale = d^-0.5",
        "- pyramid: B=16, levels 512/256/128/64, fp32 scores, default options (GPU path tiles, ppi from 132 SMs)",
        "- CTAs/SM: resident blocks allowed by registers (65536/SM), shared memory (228 KB/SM, 1 KB reserved",
        "  per block) and warps (64/SM); `>227KB` marks a config whose shared memory exceeds the per-block limit",
        "- wgmma ser.: ptxas reported the wgmma.mma_async instructions serialized (performance loss), with reason",
        "",
    ])


def markdown_table(results) -> str:
    rows = ["| kernel | case | config | regs | spill st/ld B | stack B | smem KB | CTAs/SM | wgmma | mma.sync | wgmma ser. "
            "| tile ld/alloc | waits(0) | ex2/score | loops; global tile loads out/in | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        j = r.job
        if not r.ok:
            rows.append(f"| {j.kernel} | {j.case} | {j.config()} | | | | | | | | | | | | | FAILED: {r.error} |")
            continue
        spill = f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores is not None else "?"
        spill = f"**{spill}**" if (r.spill_stores or r.spill_loads) else spill
        note = ">227KB" if r.smem > SMEM_PER_BLOCK else ""
        rows.append(
            f"| {j.kernel} | {j.case} | {j.config()} | {r.regs} | {spill} | {r.stack} | {r.smem / 1024:.1f} | "
            f"{r.blocks_per_sm()} | {r.wgmma} | {r.mma_sync} | {r.serialized[:60]} | {r.tile_loads}/{r.tile_allocs} | "
            f"{r.drained_waits} | {_ex2_text(r)} | {r.loops}; {r.loads_outside}/{r.loads_inside} | {note} |"
        )
    return "\n".join(rows)


def _ex2_text(r) -> str:
    if r.ex2_per_score is None:
        return ""
    packed = f", {r.ex2_packed} x2" if r.ex2_packed else ""
    return f"{r.ex2_per_score:g} ({r.ex2_f32} f32{packed})"


def pipeline_pairs(results) -> list[dict]:
    """Each MMA kernel with the weight against the same kernel and config without it (cases ending NO_W)."""
    by_key = {(r.job.kernel, r.job.case, r.job.config()): r for r in results if r.ok}
    pairs = []
    for (kernel, case, config), plain in by_key.items():
        if not case.endswith(NO_W):
            continue
        weighted = by_key.get((kernel, case[: -len(NO_W)], config))
        if weighted is None:
            continue
        keys = ("tile_loads", "tile_allocs", "drained_waits")
        w = {k: getattr(weighted, k) for k in keys}
        u = {k: getattr(plain, k) for k in keys}
        pairs.append(dict(kernel=kernel, case=case[: -len(NO_W)], config=config, weighted=w, unweighted=u,
                          enforced=kernel in PIPELINE_ENFORCED, ok=all(w[k] <= u[k] for k in keys)))
    return pairs


def pipeline_table(pairs) -> str:
    if not pairs:
        return ""
    rows = ["## The weight and the Hopper pipeline (TTGIR, with / without the weight)", "",
            "Per kernel and config: 2-D `ttg.local_load` (a tile read back from shared memory), `ttg.local_alloc`",
            "of a 2-D register tensor (a tile written to shared memory) and `warp_group_dot_wait {pendings = 0}`",
            "(no wgmma left in flight), compiled with the per-key weight and without it. The weight must add none",
            f"in {', '.join(PIPELINE_ENFORCED)} (tests/test_kernels_compile.py); its own 1-D ring is not counted.", "",
            "| kernel | case | config | tile loads | tile allocs | drained waits | weight costs nothing |",
            "|---|---|---|---|---|---|---|"]
    for p in pairs:
        w, u = p["weighted"], p["unweighted"]
        verdict = "yes" if p["ok"] else "**NO**"
        rows.append(f"| {p['kernel']} | {p['case']} | {p['config']} | {w['tile_loads']} / {u['tile_loads']} | "
                    f"{w['tile_allocs']} / {u['tile_allocs']} | {w['drained_waits']} / {u['drained_waits']} | {verdict} |")
    return "\n".join(rows) + "\n"


def summary(results) -> str:
    ok = [r for r in results if r.ok]
    spills = [r for r in ok if r.spill_stores or r.spill_loads]
    big = [r for r in ok if r.smem > SMEM_PER_BLOCK]
    no_mma = [r for r in ok if r.job.kernel not in ("delta",) and not r.wgmma]
    lines = [
        "## Summary", "",
        f"- compiled: {len(ok)} of {len(results)} ({sum(r.seconds for r in results):.0f} s of compile time)",
        f"- spilling: {len(spills)}" + "".join(f"\n  - {r.job.kernel} {r.job.case} {r.job.config()}: "
                                           f"{r.spill_stores} B stores / {r.spill_loads} B loads" for r in spills),
        f"- shared memory over 227 KB: {len(big)}" + "".join(f"\n  - {r.job.kernel} {r.job.case} {r.job.config()}: "
                                                        f"{r.smem / 1024:.1f} KB" for r in big),
        f"- no wgmma (MMA kernels): {len(no_mma)}" + "".join(
            f"\n  - {r.job.kernel} {r.job.case} {r.job.config()}: mma.sync {r.mma_sync}" for r in no_mma),
        "",
    ]
    return "\n".join(lines)


def to_json(results) -> list:
    return [dict(kernel=r.job.kernel, case=r.job.case, config=r.job.config(), ok=r.ok, error=r.error,
                 seconds=round(r.seconds, 2), regs=r.regs, spill_stores=r.spill_stores, spill_loads=r.spill_loads,
                 stack=r.stack, smem=r.smem, blocks_per_sm=r.blocks_per_sm() if r.ok else None,
                 wgmma=r.wgmma, mma_sync=r.mma_sync, serialized=r.serialized, tile_loads=r.tile_loads,
                 tile_allocs=r.tile_allocs, drained_waits=r.drained_waits, ex2_f32=r.ex2_f32,
                 ex2_packed=r.ex2_packed, ex2_per_score=r.ex2_per_score, exp2_sites=r.exp2_sites, loops=r.loops,
                 loads_outside=r.loads_outside, loads_inside=r.loads_inside) for r in results]


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help=f"comma-separated subset of {','.join(DTYPES)}")
    p.add_argument("--configs", default="", help="attention configs to compile instead of the autotune lists "
                   "(not pruned), e.g. 32x64w8s2,64x64w4s3")
    p.add_argument("--head-dims", default=None, help="comma-separated head dims (default 32,64,128; quick: 64)")
    p.add_argument("--quick", action="store_true", help="one config per kernel and shape class (the heuristic one)")
    p.add_argument("--pipeline", nargs="?", const="all", default="", choices=("all", "ci"),
                   help="also compile the MMA kernels without the weight and compare their TTGIR (issue 12): "
                        "all = fwd/dq/dkdv/fused for every dtype; ci = fwd and dq of the first dtype")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--json", help="write the results as JSON to this file")
    a = p.parse_args(argv)
    a.kernels = [k for k in a.kernels.split(",") if k]
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    for k in a.kernels:
        if k not in KINDS:
            p.error(f"--kernels: unknown kernel {k!r}; expected some of {','.join(KINDS)}")
    for d in a.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r}; expected some of {','.join(DTYPES)}")
    try:
        a.configs = [tuple(int(v) for v in re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", c).groups())
                     for c in a.configs.split(",") if c]
    except AttributeError:
        p.error(f"--configs: expected BMxBNwWsS items such as 64x64w4s3, got {a.configs!r}")
    a.head_dims = [int(d) for d in (a.head_dims or ("64" if a.quick else "32,64,128")).split(",")]
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    attn_kinds = [k for k in a.kernels if k in ATTN_KINDS]
    jobs = attention_jobs(attn_kinds, a.dtypes, a.head_dims, a.quick, a.configs, a.pipeline) if a.dtypes else []
    short_kinds = [k for k in a.kernels if k in SHORT_KINDS]
    if short_kinds and a.dtypes:
        jobs += short_jobs(short_kinds, a.dtypes, a.head_dims)
    if "pyramid" in a.kernels:
        jobs += pyramid_jobs(a.quick)
    results = []
    for i, job in enumerate(jobs):
        r = compile_job(job)
        print(f"[{i + 1}/{len(jobs)}] {job.kernel} {job.case} {job.config()}: "
              f"{'ok' if r.ok else r.error} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
        results.append(r)
    cmd = "python benchmarks/compile_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    pairs = pipeline_pairs(results)
    text = (header(cmd, tool_versions()) + "\n" + summary(results) + "\n" + pipeline_table(pairs) + "\n"
            + markdown_table(results) + "\n")
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"versions": tool_versions(), "results": to_json(results), "pipeline": pairs}, f, indent=1)
    return 0 if all(r.ok for r in results) and all(p["ok"] for p in pairs if p["enforced"]) else 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: every kernel compiles, so its ptxas log is seen
        os.environ["TRITON_CACHE_DIR"] = cache
        sys.exit(main())
