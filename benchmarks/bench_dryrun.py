"""The drop-in's dry run (issue 23) against one real forward pass of the same network, on CPU.

    python benchmarks/bench_dryrun.py [--reps 5] [--threads 1]

For each network, `semantic_sensitive(net, pairs)` with no options sizes its
stages by a shape-only dry run (ssattn.dropin.dryrun.shape_pass) on a fake
input of (2, C, 256, 256). Reported, per network:
  dry run ms     median time of shape_pass inside the construction (the
                 process already warm: torch's shape functions imported)
  first ms       the same in a fresh interpreter: the first dry run of a
                 process also imports torch's Python shape functions
                 (torch._refs, torch._dynamo), once
  forward ms     median time of one real forward pass at that input shape,
                 training mode with autograd (a training step's forward) and
                 under torch.no_grad()
  largest alloc  the largest single CPU allocation seen by the profiler
                 (profile_memory=True) during the whole construction (dry
                 run and the new stages' own weights), and during the real
                 forward (no_grad)
Networks: the reference U-Net at width 16 (the default of `ssattn train`)
and 32, the largest network of the drop-in tests (the random encoder-decoder
with the most multiply-adds at 256 px), and the U-Net with a plain CPU tensor
attribute (the fake-tensor path: the meta pass fails on it first).
Dry runs and forwards alternate, `--reps` times each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)

NETS = ("unet16", "unet32", "largest-test", "unet16-fake-path")


def _largest_test_net():
    """(seed, network) of the test suite's random encoder-decoder with the most multiply-adds at 256 px."""
    import torch

    from tests import _dropin_nets as nets

    def macs(net):
        total = []

        def hook(m, a, o):
            total.append(o[0].numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups)

        handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            net(torch.zeros(1, net.in_ch, 64, 64))
        for h in handles:
            h.remove()
        return sum(total)

    seeds = range(40)  # tests/test_dropin_random.py's SEEDS
    seed = max(seeds, key=lambda s: macs(nets.random_net(s)))
    return seed, nets.random_net(seed)


def build(name: str):
    """(network, pairs, description)."""
    import torch

    from ssattn.models import DEFAULT_PAIRS, UNet

    if name in ("unet16", "unet32", "unet16-fake-path"):
        width = 32 if name == "unet32" else 16
        net = UNet(width=width)
        if name == "unet16-fake-path":
            class Shifted(UNet):  # input mean kept as a plain attribute (not a buffer), as some repositories do
                def forward(self, x):
                    return super().forward(x - self.mean) + self.mean

            net = Shifted(width=16)
            net.mean = torch.full((1, 3, 1, 1), 0.5)
        params = sum(p.numel() for p in net.parameters())
        fake = " with a plain CPU tensor attribute (the fake-tensor path)" if name == "unet16-fake-path" else ""
        return net, dict(DEFAULT_PAIRS), f"UNet width {width} ({params / 1e6:.2f}M params){fake}"
    seed, net = _largest_test_net()
    params = sum(p.numel() for p in net.parameters())
    return net, net.pairs, (f"random_net({seed}) of the tests: {len(net.decoder_kinds) + 1} levels, "
                            f"{net.encoder_kind} encoder, decoders {net.decoder_kinds} ({params / 1e3:.1f}k params)")


def _timed_shape_pass():
    """Wrap the wrapper's shape_pass: returns a list that receives (seconds, input shape) per dry run."""
    from ssattn.dropin import wrapper

    seen, real = [], wrapper.shape_pass

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        result = real(*args, **kwargs)
        seen.append((time.perf_counter() - t0, result.shape))
        return result

    wrapper.shape_pass = timed
    return seen


def first_run(name: str) -> dict:
    """In a fresh interpreter: the first dry run of the process."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from ssattn.dropin import semantic_sensitive

    seen = _timed_shape_pass()
    net, pairs, _ = build(name)
    semantic_sensitive(net, pairs)
    return {"first_ms": 1000 * seen[0][0]}


def _largest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((max(e.self_cpu_memory_usage, 0) for e in prof.events()), default=0)


def measure(name: str, reps: int) -> dict:
    import torch

    from ssattn.dropin import semantic_sensitive

    seen = _timed_shape_pass()
    net, pairs, desc = build(name)
    semantic_sensitive(net, pairs).remove()  # warm: torch's shape functions imported
    shape = seen[-1][1]
    x = torch.randn(*shape)
    dry, fwd_grad, fwd_nograd = [], [], []
    for _ in range(reps):
        seen.clear()
        semantic_sensitive(net, pairs).remove()
        dry.append(seen[0][0])
        t0 = time.perf_counter()
        net(x)  # training mode, autograd on: a training step's forward
        fwd_grad.append(time.perf_counter() - t0)
        with torch.no_grad():
            t0 = time.perf_counter()
            net(x)
            fwd_nograd.append(time.perf_counter() - t0)
    alloc_dry = _largest_allocation(lambda: semantic_sensitive(net, pairs).remove())
    with torch.no_grad():
        alloc_fwd = _largest_allocation(lambda: net(x))
    med = {k: 1000 * statistics.median(v) for k, v in (("dry", dry), ("grad", fwd_grad), ("nograd", fwd_nograd))}
    return {"net": name, "description": desc, "input": list(shape), "dry_ms": med["dry"], "forward_ms": med["grad"],
            "forward_nograd_ms": med["nograd"], "dry_over_forward": med["dry"] / med["grad"],
            "dry_over_forward_nograd": med["dry"] / med["nograd"], "largest_alloc_dry_bytes": alloc_dry,
            "largest_alloc_forward_bytes": alloc_fwd}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    p.add_argument("--first", default=None, help=argparse.SUPPRESS)  # child process: one first dry run
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.first:
        print(json.dumps(first_run(args.first)))
        return
    rows = []
    for name in args.nets:
        env = dict(os.environ, BENCH_THREADS=str(args.threads))
        out = subprocess.run([sys.executable, __file__, "--first", name], capture_output=True, text=True, env=env,
                             cwd=ROOT, check=True)
        row = {**measure(name, args.reps), **json.loads(out.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    import ssattn

    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; torch {torch.__version__}, ssattn "
          f"{getattr(ssattn, '__version__', '?')}; {args.threads} thread(s), {args.reps} reps\n")
    print("| network | dry-run input | dry run ms (first in process) | forward ms, train + autograd (no_grad) "
          "| dry run / forward | largest allocation: construction / forward |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['description']} | {tuple(r['input'])} | {r['dry_ms']:.1f} ({r['first_ms']:.0f}) | "
              f"{r['forward_ms']:.0f} ({r['forward_nograd_ms']:.0f}) | {r['dry_over_forward']:.3f} "
              f"({r['dry_over_forward_nograd']:.3f}) | {r['largest_alloc_dry_bytes']} B / "
              f"{r['largest_alloc_forward_bytes'] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
