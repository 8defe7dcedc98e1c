"""CPU: masked cross-attention time and peak memory, and the per-step overhead of -SS on the U-Net.

    python benchmarks/bench_cpu.py attention [--sizes 64 128] [--threads 1]
    python benchmarks/bench_cpu.py overhead [--size 64] [--batch 2] [--steps 10]

attention: one fresh interpreter per (implementation, N, mode), so each
peak is that case's alone: peak extra memory = the process's maximum RSS
after the call minus its maximum RSS before it (inputs already made), from
resource.getrusage. Implementations on the same NCHW inputs (B=1, C=32,
h=1, d=32):
  reference  ssattn.masked_cross_attention(backend="reference"), the
             (N, N) scores materialised (what "auto" ran on CPU before)
  cpu-flash  backend="cpu-flash": ssattn.ops.attention_cpu (what "auto"
             runs on CPU above its size threshold)
  sdpa       the chain a user writes: m * k, m * v, permute + contiguous,
             F.scaled_dot_product_attention (its default CPU dispatch),
             permute back
Modes: fwd, and fwd+bwd (gradients for q, k, v and the map).

overhead: median seconds per training step (forward, L1 + alignment loss,
backward, Adam step) of ssattn.models.UNet against unet_ss (all three
decoder stages, or --levels, backend "auto"), alternating in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

IMPLS = ("reference", "cpu-flash", "sdpa")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_case(impl: str, side: int, mode: str, reps: int) -> dict:
    """Run in a fresh interpreter: time and peak extra memory of one case."""
    import torch
    import torch.nn.functional as F

    import ssattn

    ssattn.set_value_checks(False)
    B, C, h = 1, 32, 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, C, side, side, generator=g) for _ in range(3))
    m = torch.rand(B, 1, side, side, generator=g)
    grad = mode == "fwd+bwd"
    for t in (q, k, v, m):
        t.requires_grad_(grad)

    def heads(x):
        return x.view(B, h, C // h, side * side).transpose(-1, -2)

    def run():
        if impl == "sdpa":
            qh, kh, vh = (heads(t).contiguous() for t in (q, k * m, v * m))
            out = F.scaled_dot_product_attention(qh, kh, vh)
        else:
            out = ssattn.masked_cross_attention(heads(q), heads(k), heads(v), m.reshape(B, -1), backend=impl)
        out = out.transpose(-1, -2).reshape(B, C, side, side)
        if grad:
            torch.autograd.grad(out.square().sum(), (q, k, v, m))

    before = _maxrss_mb()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "N": side * side, "mode": mode, "s": min(times), "reps": reps,
            "peak_extra_mb": _maxrss_mb() - before}


def attention(args) -> None:
    rows = []
    for side in args.sizes:
        for mode in ("fwd", "fwd+bwd"):
            for impl in IMPLS:
                reps = 3 if side * side <= 4096 else 1
                cmd = [sys.executable, __file__, "_case", impl, str(side), mode, str(reps), str(args.threads)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    rows.append({"impl": impl, "N": side * side, "mode": mode, "error": res.stderr.strip()[-200:]})
                else:
                    rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| N | mode | impl | time s (min of reps) | peak extra MB |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['N']} | {r['mode']} | {r['impl']} | failed: {r['error']} | |")
        else:
            print(f"| {r['N']} | {r['mode']} | {r['impl']} | {r['s']:.3f} ({r['reps']}) | {r['peak_extra_mb']:.0f} |")


def overhead(args) -> None:
    import torch
    import torch.nn.functional as F

    from ssattn.models import UNet, unet_ss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = UNet(width=args.width)
    ss = unet_ss(width=args.width, levels=args.levels)
    ss.model.load_state_dict(plain.state_dict())
    x = torch.rand(args.batch, 3, args.size, args.size)
    ref = torch.rand_like(x)
    m = torch.rand(args.batch, 1, args.size, args.size)
    opts = {"unet": torch.optim.Adam(plain.parameters(), 1e-4), "unet-ss": torch.optim.Adam(ss.parameters(), 1e-4)}

    def step(name):
        opt = opts[name]
        opt.zero_grad()
        if name == "unet":
            loss = F.l1_loss(plain(x), ref)
        else:
            loss = F.l1_loss(ss(x, guidance=m), ref) + ss.alignment_loss()
        loss.backward()
        opt.step()

    times = {"unet": [], "unet-ss": []}
    for i in range(args.steps + 2):
        for name in times:
            t0 = time.perf_counter()
            step(name)
            if i >= 2:  # two warm-up steps
                times[name].append(time.perf_counter() - t0)
    a, b = (statistics.median(times[n]) for n in ("unet", "unet-ss"))
    levels = ",".join(args.levels or ss.pairs)
    print(f"| {args.size}x{args.size} | {args.batch} | {args.width} | {levels} | {1000 * a:.1f} | {1000 * b:.1f} | "
          f"{b / a:.2f}x |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_case":
        impl, side, mode, reps, threads = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
        import torch

        torch.set_num_threads(threads)
        print(json.dumps(one_case(impl, side, mode, reps)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("attention")
    a.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="map sides (N = side^2)")
    a.add_argument("--threads", type=int, default=1)
    o = sub.add_parser("overhead")
    o.add_argument("--size", type=int, default=64)
    o.add_argument("--batch", type=int, default=2)
    o.add_argument("--width", type=int, default=16)
    o.add_argument("--steps", type=int, default=10)
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--levels", nargs="+", default=None, help="decoder stages to refine (default: all three)")
    args = p.parse_args()
    attention(args) if args.what == "attention" else overhead(args)


if __name__ == "__main__":
    main()
