"""Degradation routing: embedded classifier accuracy on held-out generated sets, and CPU throughput.

    python benchmarks/bench_routing.py [--n 400] [--size 128] [--out routing.md]

Accuracy: DegradationSet(split="train", seed=fit seed + 1000) (the fit's
photographs, other crops/parameters) and DegradationSet(split="test") (other
photographs), confusion matrix (rows: true class) and accuracy per severity.
Throughput: the embedded classifier alone, and DegradationRouter with three
small U-Net experts (width 8) on a batch, images/s, best of 3 runs.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from ssattn.apps.data.degradations import DegradationSet
from ssattn.models import UNet
from ssattn.routing import ALL_CLASSES, PAPER_CLASSES, DegradationRouter, EmbeddedClassifier, _embedded_fit

FIT_SEED = int(_embedded_fit.FITS[0]["trained_on"].split("seed=")[1].split(",")[0])


def accuracy_table(kinds, n, size, seed, split) -> list[str]:
    x, y, sev = DegradationSet(n=n, size=size, seed=seed, split=split, kinds=kinds).tensors()
    pred = EmbeddedClassifier(kinds)(x).argmax(1)
    k = len(kinds)
    cm = torch.zeros(k, k, dtype=torch.long).index_put_((y, pred), torch.ones_like(y), accumulate=True)
    acc = (pred == y).float().mean().item()
    lines = [f"**{len(kinds)} classes, split={split}, seed={seed}, n={n}, {size}px: accuracy {acc:.1%}**", "",
             "| true \\ predicted | " + " | ".join(kinds) + " | recall |", "|---" * (k + 2) + "|"]
    for i, c in enumerate(kinds):
        lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in cm[i]) + f" | {cm[i, i] / cm[i].sum():.0%} |")
    per_sev = [f"{s}: {(pred[sev == s] == y[sev == s]).float().mean():.0%}" for s in range(1, 6)]
    lines += ["", "accuracy per severity: " + ", ".join(per_sev), ""]
    return lines


def best_rate(fn, n_images, repeats=3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_images / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)", ""]
    for kinds in (PAPER_CLASSES, ALL_CLASSES):
        n = args.n if kinds == PAPER_CLASSES else args.n * 3 // 2
        lines += accuracy_table(kinds, n, args.size, FIT_SEED + 1000, "train")
        lines += accuracy_table(kinds, n, args.size, FIT_SEED + 1000, "test")
    x, y, _ = DegradationSet(n=args.batch, size=args.size, seed=5, kinds=PAPER_CLASSES).tensors()
    clf = EmbeddedClassifier()
    experts = {c: UNet(3, 3, 8).eval() for c in PAPER_CLASSES[:3]}
    router = DegradationRouter(clf, experts=experts, passthrough=("none",))
    one = experts["reflection"]
    with torch.no_grad():
        rates = {"embedded classifier": best_rate(lambda: clf(x), len(x)),
                 "router, 3 U-Net experts (width 8)": best_rate(lambda: router(x), len(x)),
                 "one U-Net expert on the whole batch (no routing)": best_rate(lambda: one(x), len(x))}
    lines += [f"throughput, batch {args.batch} x 3 x {args.size} x {args.size} (images/s, best of 3):", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in rates.items()]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
