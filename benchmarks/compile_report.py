"""Static sm_90 (Hopper) compile report of ssattn's Triton kernels; no GPU needed.

Every Triton kernel is compiled ahead of time for GPUTarget("cuda", 90, 32)
with the installed Triton, for each autotune config of kernels/attention.py
that its `_prune` keeps, over representative shape classes, plus the pyramid
kernel at its default options. Per compiled kernel the table gives registers
per thread, spill stores/loads and stack (from Triton's own `ptxas -v` run),
shared memory (Triton's metadata: it is dynamic, ptxas does not see it),
CTAs per SM that registers, shared memory and warps allow, and the MMA
instructions in the PTX (wgmma.mma_async = Hopper warpgroup MMA, mma.sync =
the Ampere path). These are compiler facts, not GPU measurements.

The kernel arguments are produced by the real host code (kernels/attention.py
forward/backward, kernels/pyramid.py _launch) called on meta tensors with the
launches intercepted, and specialized by Triton's own binder, so every
kernel is compiled exactly as a contiguous (or NCHW-view) call on a GPU would
specialize it: pointers 16-byte aligned, integers equal to 1 turned into
constants, multiples of 16 marked divisible.

    python benchmarks/compile_report.py --out report.md           # everything (minutes)
    python benchmarks/compile_report.py --quick                   # one config per kernel
    python benchmarks/compile_report.py --kernels fwd,dq --dtypes bf16 --head-dims 64

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

ATTN_KINDS = ("fwd", "dkdv", "dq", "delta")
KINDS = ATTN_KINDS + ("pyramid",)
DTYPES = {"bf16": (torch.bfloat16, ""), "fp32-tf32": (torch.float32, "tf32"), "fp32-ieee": (torch.float32, "ieee"),
          "fp32-tf32x3": (torch.float32, "tf32x3")}
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

    def __call__(self, tuned, raw, kind, grid_fn, args, meta):  # attention._launch
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


def attention_launches(dtype, prec, d, layout="contiguous", has_w=True, has_kpm=False, weight_grad=True):
    """{kind: (JITFunction, args, meta)} of one forward + backward, from the real host code."""
    q, k, v, w, kpm = _attn_inputs(dtype, d, layout, has_w, has_kpm)
    scale = d ** -0.5
    calls = []
    with _patched(attn, _check=lambda *a: None, _launch=_Recorder(calls),
                  attn_bwd_delta_kernel=_Recorder(calls, "delta")):
        out, lse = attn.forward(q, k, v, w, kpm, scale, precision=prec or "ieee")
        attn.backward(torch.empty_like(out), q, k, v, w, kpm, out, lse, scale, weight_grad, precision=prec or "ieee")
    raw = {"delta": attn.attn_bwd_delta_kernel}
    return {kind: (fn or raw[kind], args, meta) for kind, fn, args, meta in calls}


def attention_jobs(kinds, dtypes, head_dims, quick, configs=None):
    """Jobs for every (shape class, kept config); quick: the SSATTN_AUTOTUNE=0 heuristic config only;
    configs: explicit [(BLOCK_M, BLOCK_N, warps, stages)] instead of the autotune lists (not pruned)."""
    jobs = []
    for case, dtype, prec, d, extra, case_kinds in _attention_cases(dtypes, head_dims, quick):
        launches = attention_launches(dtype, prec, d, **extra)
        for kind in (k for k in kinds if k in case_kinds):
            fn, args, meta = launches[kind]
            cfgs = _attention_configs(kind, fn, args, meta, dtype, quick)
            if configs and kind != "delta":
                cfgs = [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st} for bm, bn, w, st in configs]
            for cfg in cfgs:
                jobs.append(Job(kind, case, fn, args, {**meta, **cfg}))
    return jobs


def _attention_cases(dtypes, head_dims, quick):
    """(label, dtype, options, d, launch kwargs, kernels): the main grid, plus KPM=True and the NCHW view."""
    for name in dtypes:
        dtype, prec = DTYPES[name]
        for d in head_dims:
            yield f"{name} d={d}", dtype, prec, d, {}, ATTN_KINDS
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
    bm, bn = (64, 64) if GH * GW <= 1024 else (32, 32)
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
    return res


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
        f"- date: {datetime.date(2026, 11, 22).isoformat()}",
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
    rows = ["| kernel | case | config | regs | spill st/ld B | stack B | smem KB | CTAs/SM | wgmma | mma.sync | wgmma ser. | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        j = r.job
        if not r.ok:
            rows.append(f"| {j.kernel} | {j.case} | {j.config()} | | | | | | | | | FAILED: {r.error} |")
            continue
        spill = f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores is not None else "?"
        spill = f"**{spill}**" if (r.spill_stores or r.spill_loads) else spill
        note = ">227KB" if r.smem > SMEM_PER_BLOCK else ""
        rows.append(
            f"| {j.kernel} | {j.case} | {j.config()} | {r.regs} | {spill} | {r.stack} | {r.smem / 1024:.1f} | "
            f"{r.blocks_per_sm()} | {r.wgmma} | {r.mma_sync} | {r.serialized[:60]} | {note} |"
        )
    return "\n".join(rows)


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
                 wgmma=r.wgmma, mma_sync=r.mma_sync, serialized=r.serialized) for r in results]


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help=f"comma-separated subset of {','.join(DTYPES)}")
    p.add_argument("--configs", default="", help="attention configs to compile instead of the autotune lists "
                   "(not pruned), e.g. 32x64w8s2,64x64w4s3")
    p.add_argument("--head-dims", default=None, help="comma-separated head dims (default 32,64,128; quick: 64)")
    p.add_argument("--quick", action="store_true", help="one config per kernel and shape class (the heuristic one)")
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
    jobs = attention_jobs(attn_kinds, a.dtypes, a.head_dims, a.quick, a.configs) if a.dtypes else []
    if "pyramid" in a.kernels:
        jobs += pyramid_jobs(a.quick)
    results = []
    for i, job in enumerate(jobs):
        r = compile_job(job)
        print(f"[{i + 1}/{len(jobs)}] {job.kernel} {job.case} {job.config()}: "
              f"{'ok' if r.ok else r.error} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
        results.append(r)
    cmd = "python benchmarks/compile_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = header(cmd, tool_versions()) + "\n" + summary(results) + "\n" + markdown_table(results) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"versions": tool_versions(), "results": to_json(results)}, f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: every kernel compiles, so its ptxas log is seen
        os.environ["TRITON_CACHE_DIR"] = cache
        sys.exit(main())
