"""Fit the embedded degradation classifier on generated data and write ssattn/routing/_embedded_fit.py.

    python benchmarks/fit_embedded_classifier.py [--n 800] [--size 128] [--seed 1]

A multinomial logistic regression (L-BFGS, L2 penalty) on the standardised
features of ssattn.routing.features, for the routing paper's four classes and
for all six. Training images: DegradationSet(split="train", seed=SEED),
kinds x severities 1-5 in turn. The library reads only the written numbers;
it never imports the generator (ssattn.apps) at run time.
"""

from __future__ import annotations

import argparse
import pathlib

import torch
import torch.nn.functional as F

from ssattn.apps.data.degradations import DegradationSet
from ssattn.routing.classes import ALL_CLASSES, PAPER_CLASSES
from ssattn.routing.features import FEATURES, features

OUT = pathlib.Path(__file__).resolve().parents[1] / "ssattn" / "routing" / "_embedded_fit.py"


def fit(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, l2: float) -> dict:
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = ((feats - mean) / std).double()
    w = torch.zeros(z.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=1000, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, labels) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    acc = ((z @ w + b).argmax(1) == labels).double().mean().item()
    return {"mean": mean.tolist(), "std": std.tolist(), "weight": w.detach().tolist(), "bias": b.detach().tolist(),
            "train_accuracy": acc}


def _fmt(v):
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return f"{v:.6g}" if isinstance(v, float) else repr(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=800, help="training images per class set (800)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--l2", type=float, default=1e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    fits = []
    for name, kinds, n in (("paper4", PAPER_CLASSES, args.n), ("all6", ALL_CLASSES, args.n * 3 // 2)):
        x, y, _ = DegradationSet(n=n, size=args.size, seed=args.seed, split="train", kinds=kinds).tensors()
        f = features(x)
        res = fit(f, y, len(kinds), args.l2)
        print(f"{name}: {n} images, train accuracy {res['train_accuracy']:.3f}")
        fits.append({"name": name, "classes": list(kinds), "features": list(FEATURES), **res,
                     "trained_on": f"DegradationSet(n={n}, size={args.size}, seed={args.seed}, split='train')"})
    lines = ['"""Fitted numbers of the embedded classifier, written by benchmarks/fit_embedded_classifier.py: do not edit."""',
             "", "FITS = ["]
    for f in fits:
        lines.append("    {")
        for k, v in f.items():
            lines.append(f"        {k!r}: {_fmt(v)},")
        lines.append("    },")
    lines.append("]")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
