"""Alignment loss (SPEC 3), forward + backward: ssattn._C against eager PyTorch and torch.compile.

Run: pytest benchmarks/bench_alignment.py --benchmark-group-by=group
     (add -m "not gpu" on a machine without CUDA, or just let the GPU cases skip).
CPU ratio on a shared machine (issue 24's problem: B = 4, one thread):
     python benchmarks/bench_alignment.py [--rounds 200] [--batch 4] [--threads 1] [--channels-last]
     Eager and native alternate within each round (the order flips every
     round), so a change in machine load hits both; it prints medians of the
     wall and thread CPU times and the median of the per-round ratios.
     The paper form is called without a `form` argument, so the same command
     also times a build from before that argument existed (PYTHONPATH=<tree>).
     python benchmarks/bench_alignment.py --kernel [--rounds 200]
     The op alone (no autograd, no argument checks), hot (run twice in a row)
     and cold (after writing 64 MiB elsewhere), against F * 2 (one read and
     one write of F) and F.sum() (one read): how far the kernel is from the
     memory traffic it cannot avoid.

GPU cases: 4 decoder levels C = 32, 64, 128, 256 at 256, 128, 64, 32 pixels
square (SPEC's peer table), B = 8 and 16, float32 and bfloat16 (maps in the
features' dtype), NCHW. CPU cases are scaled down (from 64x64, B = 2, one
thread) and add channels-last. Every peer computes the same formula
(ssattn.reference.alignment_loss) and its gradients w.r.t. features and maps,
in both forms ("paper" and "normalized", docs/operations.md section 3).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import time

import pytest
import torch

import ssattn
from ssattn import _backends
from ssattn import reference as ref
from ssattn.ops import alignment as align_ops

HAS_CUDA = torch.cuda.is_available()
NATIVE = _backends.native_module()
ETA = 1.0

GPU_LEVELS = [(32, 256), (64, 128), (128, 64), (256, 32)]  # (C, H = W)
CPU_LEVELS = [(32, 64), (64, 32), (128, 16), (256, 8)]
PEERS = ["eager", "compile", "native"]
FORMS = ["paper", "normalized"]


def _inputs(B, levels, dtype, device, channels_last=False):
    feats, maps = [], []
    for C, S in levels:
        f = torch.randn(B, C, S, S, device=device, dtype=dtype)
        if channels_last:
            f = f.contiguous(memory_format=torch.channels_last)
        feats.append(f.requires_grad_())
        maps.append(torch.rand(B, 1, S, S, device=device, dtype=dtype).requires_grad_())
    return feats, maps


def _eager(F, M, form="paper"):
    return ref.alignment_loss(F, M, eta=ETA, reduction="mean", form=form)


@functools.lru_cache(maxsize=None)
def _compiled(form):
    return torch.compile(functools.partial(_eager, form=form), dynamic=False)


def _native(F, M, form="paper"):
    return ssattn.alignment_loss(F, M, eta=ETA, reduction="mean", form=form, backend="native")


def _fn(peer, form):
    if peer == "compile":
        return _compiled(form)
    return functools.partial({"eager": _eager, "native": _native}[peer], form=form)


def _step(fn, F, M, sync):
    for x in F + M:
        x.grad = None
    loss = fn(F, M)
    loss.backward()
    sync()


def _bench(benchmark, peer, F, M, device, rounds, form="paper"):
    if peer == "native" and (NATIVE is None or not align_ops.available(device)):
        pytest.skip(f"ssattn._C cannot run on {device}")
    fn = _fn(peer, form)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up (and compilation)
        _step(fn, F, M, sync)
    benchmark.pedantic(_step, args=(fn, F, M, sync), rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B", [8, 16])
@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("form", FORMS)
def test_alignment_cuda_fwd_bwd(benchmark, form, peer, B, dtype):
    F, M = _inputs(B, GPU_LEVELS, dtype, "cuda")
    benchmark.group = f"alignment cuda {form} B={B} {str(dtype).split('.')[-1]} 4 levels from 256x256 fwd+bwd"
    mb = sum(f.numel() for f in F) * F[0].element_size() / 2**20
    benchmark.extra_info.update(peer=peer, form=form, feature_MiB=round(mb, 1))
    _bench(benchmark, peer, F, M, "cuda", rounds=50, form=form)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("peer", ["eager", "native"])
@pytest.mark.parametrize("form", FORMS)
def test_alignment_cpu_fwd_bwd(benchmark, form, peer, dtype, layout):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        F, M = _inputs(2, CPU_LEVELS, dtype, "cpu", channels_last=layout == "channels_last")
        benchmark.group = f"alignment cpu {form} B=2 {str(dtype).split('.')[-1]} {layout} 4 levels from 64x64 fwd+bwd"
        benchmark.extra_info.update(peer=peer, form=form, threads=1)
        _bench(benchmark, peer, F, M, "cpu", rounds=30, form=form)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32], ids=["fp32"])
def test_alignment_cpu_fwd_bwd_compile(benchmark, dtype):
    """torch.compile on CPU (Inductor C++ codegen; slow to compile, hence marked slow)."""
    torch.set_num_threads(1)
    F, M = _inputs(2, CPU_LEVELS, dtype, "cpu")
    benchmark.group = f"alignment cpu B=2 {str(dtype).split('.')[-1]} nchw 4 levels from 64x64 fwd+bwd"
    benchmark.extra_info.update(peer="compile", threads=1)
    _bench(benchmark, "compile", F, M, "cpu", rounds=30)


# --------------------------------------------------------------------------- CLI: the CPU ratio, peers alternating
def _cli_fn(peer, form):
    kw = {} if form == "paper" else {"form": form}  # paper: also runs on builds without the argument
    if peer == "eager":
        return lambda F, M: ref.alignment_loss(F, M, eta=ETA, reduction="mean", **kw)
    return lambda F, M: ssattn.alignment_loss(F, M, eta=ETA, reduction="mean", backend="native", **kw)


def _timed_step(fn, F, M):
    """(wall, thread CPU) seconds and minor page faults of one forward + backward."""
    for x in F + M:
        x.grad = None
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.thread_time()
    fn(F, M).backward()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def cpu_ratio(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    F, M = _inputs(args.batch, CPU_LEVELS, torch.float32, "cpu", channels_last=args.channels_last)
    forms = [f for f in args.forms.split(",") if f]
    fns = {(peer, form): _cli_fn(peer, form) for form in forms for peer in ("eager", "native")}
    times = {key: ([], [], []) for key in fns}
    load_before = os.getloadavg()
    for fn in fns.values():  # warm-up
        for _ in range(3):
            _timed_step(fn, F, M)
    for r in range(args.rounds):
        for form in forms:
            order = ("eager", "native") if r % 2 == 0 else ("native", "eager")
            for peer in order:
                for series, value in zip(times[(peer, form)], _timed_step(fns[(peer, form)], F, M)):
                    series.append(value)
    load_after = os.getloadavg()
    _header(args, F, load_before, load_after)
    print("| form | eager wall ms | native wall ms | ratio (wall) | eager CPU ms | native CPU ms | ratio (CPU) "
          "| eager / native page faults per step |")
    print("|---|---|---|---|---|---|---|---|")
    for form in forms:
        (ew, ec, ef), (nw, nc, nf) = times[("eager", form)], times[("native", form)]
        ratio_w = statistics.median(e / n for e, n in zip(ew, nw))
        ratio_c = statistics.median(e / n for e, n in zip(ec, nc))
        print(f"| {form} | {_ms(ew)} | {_ms(nw)} | {ratio_w:.2f}x | {_ms(ec)} | {_ms(nc)} | {ratio_c:.2f}x "
              f"| {statistics.mean(ef):.0f} / {statistics.mean(nf):.0f} |")


def _ms(seconds):
    return f"{1e3 * statistics.median(seconds):.3f}"


def _header(args, F, load_before, load_after):
    shape = " + ".join(f"{args.batch}x{c}x{s}x{s}" for c, s in CPU_LEVELS)
    mib = sum(f.numel() * f.element_size() for f in F) / 2**20
    print(f"# ssattn {ssattn.__file__}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{'channels-last' if args.channels_last else 'NCHW'} float32 {shape} ({mib:.2f} MiB of F); "
          f"{args.rounds} rounds")
    print(f"# load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")


def kernel_floor(args):
    """The op alone, hot and cold, next to one read + one write of F and one read of F (thread CPU time)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    F, M = _inputs(args.batch, CPU_LEVELS, torch.float32, "cpu", channels_last=args.channels_last)
    F, M = [f.detach() for f in F], [m.detach() for m in M]
    op = torch.ops.ssattn.alignment_loss_fused
    w = [1.0] * len(F)
    cases = {
        "op, paper: loss, dF, dM": lambda: op(F, M, w, ETA, True, False, True, True),
        "op, paper: loss only": lambda: op(F, M, w, ETA, True, False, False, False),
        "op, normalized: loss, dF, dM": lambda: op(F, M, w, ETA, True, True, True, True),
        "F * 2 (read F, write F-sized)": lambda: [f * 2 for f in F],
        "F.sum() (read F)": lambda: [f.sum() for f in F],
    }
    junk = torch.empty(64 * 2**20 // 4)  # 64 MiB: more than this machine's last-level cache
    hot, cold = ({k: [] for k in cases} for _ in range(2))
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, fn in cases.items():
            fn()  # hot: right after the same call
            t = time.thread_time()
            fn()
            hot[name].append(time.thread_time() - t)
            junk.fill_(1.0)  # cold: after writing more than the cache holds
            t = time.thread_time()
            fn()
            cold[name].append(time.thread_time() - t)
    _header(args, F, load_before, os.getloadavg())
    print("| what | hot CPU ms | cold CPU ms |")
    print("|---|---|---|")
    for name in cases:
        print(f"| {name} | {_ms(hot[name])} | {_ms(cold[name])} |")


def main():
    p = argparse.ArgumentParser(description="Alignment loss on CPU: the C++ path against eager PyTorch, fwd+bwd")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--forms", default="paper,normalized", help="comma-separated: paper, normalized")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--kernel", action="store_true", help="time the op alone, hot and cold, next to F * 2 and F.sum()")
    args = p.parse_args()
    kernel_floor(args) if args.kernel else cpu_ratio(args)


if __name__ == "__main__":
    main()
