"""Caption-feature loss (docs/operations.md section 4), forward + backward: the fused op against eager PyTorch.

"eager" is what a user writes without ssattn: one loss per space, summed
(F.l1_loss / F.mse_loss / 1 - F.cosine_similarity over the last dim, mean),
autograd for the backward. "native" is ssattn.caption_feature_loss(backend="native"),
the fused C++ op (one pass: loss and dL/dX). Feature sizes are a ClipCap
captioner's: visual (B, 512) or (B, 768), prefix (B, 10, 768), language
(B, 10 + T, 768) with T = 8 caption tokens; B = 8 and 32; float32 and bf16.
The peers alternate round by round in one process (so a change in machine
load hits both); each figure is the median (and min) over the rounds.

    python benchmarks/bench_caption_loss.py [--rounds 50] [--threads 1]
    python benchmarks/bench_caption_loss.py train [--steps 8] [--clipcap-geometry]   # step with / without it
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import ssattn

SPACES = ("visual", "prefix", "language")


def eager(xs, ys, distance, weights):
    total = 0.0
    for x, y, w in zip(xs, ys, weights):
        if distance == "l1":
            d = F.l1_loss(x.float(), y.float())
        elif distance == "l2":
            d = F.mse_loss(x.float(), y.float())
        else:
            d = (1 - F.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8)).mean()
        total = total + w * d
    return total


def native(xs, ys, distance, weights):
    return ssattn.caption_feature_loss(xs, ys, distance=distance, weights=weights, backend="native")


def features(B, visual, T, dtype):
    shapes = [(B, visual), (B, 10, 768), (B, 10 + T, 768)]
    xs = [torch.randn(s, dtype=dtype).requires_grad_(True) for s in shapes]
    ys = [torch.randn(s, dtype=dtype) for s in shapes]
    return xs, ys


def step(fn, xs, ys, distance, weights):
    for x in xs:
        x.grad = None
    fn(xs, ys, distance, weights).backward()


def compare(B, visual, T, dtype, distance, rounds):
    xs, ys = features(B, visual, T, dtype)
    weights = [1.0, 1.0, 1.0]
    peers = {"eager": eager, "native": native}
    times = {k: [] for k in peers}
    for fn in peers.values():
        for _ in range(3):
            step(fn, xs, ys, distance, weights)
    for _ in range(rounds):
        for name, fn in peers.items():
            t0 = time.perf_counter()
            step(fn, xs, ys, distance, weights)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    mins = {k: min(v) * 1e3 for k, v in times.items()}
    return med, mins


def run_ops(args):
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds, forward + backward")
    print("| distance | dtype | B | visual | eager median / min ms | native median / min ms | speedup median / min |")
    print("|---|---|---|---|---|---|---|")
    for distance in ("l1", "l2", "cosine"):
        for dtype in (torch.float32, torch.bfloat16):
            for B in (8, 32):
                for visual in (512, 768):
                    med, mins = compare(B, visual, 8, dtype, distance, args.rounds)
                    print(f"| {distance} | {str(dtype).split('.')[-1]} | {B} | {visual} | "
                          f"{med['eager']:.3f} / {mins['eager']:.3f} | {med['native']:.3f} / {mins['native']:.3f} | "
                          f"{med['eager'] / med['native']:.2f}x / {mins['eager'] / mins['native']:.2f}x |", flush=True)


def run_train(args):
    """Median step time of the trainer's step (forward, loss, backward, Adam) with and without the caption loss."""
    import tempfile

    from ssattn.apps.training.caption import caption_criterion
    from ssattn.apps.training.losses import ReconstructionLoss
    from ssattn.caption.testing import CLIPCAP_GEOMETRY, save_tiny_captioner
    from ssattn.models import UNet, unet_ss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, ref, g = torch.rand(args.batch, 3, args.size, args.size), torch.rand(args.batch, 3, args.size, args.size), \
        torch.rand(args.batch, 1, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        geometry = CLIPCAP_GEOMETRY if args.clipcap_geometry else dict(hidden=args.hidden, embed=args.embed)
        folder = save_tiny_captioner(tmp + "/cap", **geometry)
        rows = []
        for ss in (False, True):
            # the two variants alternate step by step, so a change in machine load hits both
            runs = []
            for with_caption in (False, True):
                torch.manual_seed(0)
                model = unet_ss(3, 3, 16) if ss else UNet(3, 3, 16)
                crit = ReconstructionLoss()
                if with_caption:
                    crit = caption_criterion(crit, weight=0.1, captioner=str(folder))
                runs.append((with_caption, model, crit, torch.optim.Adam(model.parameters(), 1e-3), []))
            for i in range(args.steps + 2):
                for with_caption, model, crit, opt, times in runs:
                    t0 = time.perf_counter()
                    opt.zero_grad()
                    out = model(x, guidance=g) if ss else model(x)
                    loss = crit(out, ref)
                    if ss:
                        loss = loss + model.alignment_loss()
                    loss.backward()
                    opt.step()
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
            for with_caption, _, _, _, times in runs:
                rows.append((("unet-ss" if ss else "unet"), with_caption, statistics.median(times) * 1e3))
    what = ("ClipCap geometry (CLIP ViT-B/32 224 px, GPT-2 small; random weights)" if args.clipcap_geometry
            else f"tiny captioner (CLIP 224/32 hidden {args.hidden}, 1 layer; GPT-2 width {args.embed}, 1 layer)")
    print(f"torch {torch.__version__}, {args.threads} thread(s), B={args.batch}, {args.size}px, {what}, "
          f"median of {args.steps} steps after 2 warm-up steps")
    print("| model | caption loss | ms/step |")
    print("|---|---|---|")
    for name, cap, ms in rows:
        print(f"| {name} | {'0.1' if cap else 'off'} | {ms:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", choices=("ops", "train"), default="ops")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--clipcap-geometry", action="store_true", help="train: a captioner of ClipCap's real sizes")
    args = p.parse_args()
    (run_train if args.what == "train" else run_ops)(args)


if __name__ == "__main__":
    main()
