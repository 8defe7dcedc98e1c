"""Degradation routing: the embedded classifier on photographs and generators it never saw, its calibration, speed.

    python benchmarks/bench_routing.py [--n 800] [--out routing.md] [--figures DIR] [--baseline REF]

Sets (four paper classes, cycling; photographs held out of every fit: TEST_PHOTOS):
  (a) routing_data.heldout_set(n, seed, TRAIN): the training parameter ranges;
  (b) routing_data.heldout_set(n, seed, OUTSIDE): every parameter outside the training ranges;
  (c) benchmarks/plain_degradations.plain_set(n, seed): a separately written generator (Pillow, scipy).
For each: accuracy, the confusion matrix (rows: true class), accuracy per photograph. On (a): expected
calibration error (15 equal-width confidence bins), a reliability diagram (PNG) and accuracy above and
below confidence thresholds. Speed: images/s of a batch of 32 at 128 px and of 8 at 512 px, best of 3, one
thread; with --baseline REF also the accuracy and speed of the classifier of git revision REF (its routing
modules read with `git show`), in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import platform
import subprocess
import sys
import tempfile

import torch

from ssattn.apps.data import routing_data as rd
from ssattn.routing import PAPER_CLASSES, EmbeddedClassifier

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_metrics import best_rate  # noqa: E402
from plain_degradations import plain_set  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def confusion(y, pred, k) -> torch.Tensor:
    return torch.zeros(k, k, dtype=torch.long).index_put_((y, pred), torch.ones_like(y), accumulate=True)


def table(title, y, pred, classes, groups=None) -> list[str]:
    k = len(classes)
    cm = confusion(y, pred, k)
    acc = (pred == y).float().mean().item()
    lines = [f"**{title}: accuracy {acc:.1%}** (n={len(y)})", "",
             "| true \\ predicted | " + " | ".join(classes) + " | recall |", "|---" * (k + 2) + "|"]
    for i, c in enumerate(classes):
        lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in cm[i]) + f" | {cm[i, i] / max(1, cm[i].sum()):.0%} |")
    if groups is not None:
        names = sorted(set(groups))
        per = []
        for g in names:
            sel = torch.tensor([x == g for x in groups])
            per.append(f"{g} {(pred[sel] == y[sel]).float().mean():.0%} (n={int(sel.sum())})")
        lines += ["", "accuracy per photograph: " + ", ".join(per)]
    return lines + [""]


def ece(conf, correct, bins=15) -> tuple[float, list]:
    edges = torch.linspace(0, 1, bins + 1)
    total, rows = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            c, a = conf[sel].mean().item(), correct[sel].float().mean().item()
            total += sel.float().mean().item() * abs(c - a)
            rows.append((lo.item(), hi.item(), int(sel.sum()), c, a))
    return total, rows


def reliability_png(path, rows, title) -> None:
    from PIL import Image, ImageDraw, ImageFont

    size, m = 360, 48
    img = Image.new("RGB", (size + 2 * m, size + 2 * m), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=12)
    xy = lambda c, a: (m + c * size, m + (1 - a) * size)  # noqa: E731
    d.rectangle([m, m, m + size, m + size], outline="black")
    d.line([xy(0, 0), xy(1, 1)], fill="#999999")
    n = sum(r[2] for r in rows)
    for lo, hi, count, c, a in rows:
        x0, _ = xy(lo, 0)
        x1, _ = xy(hi, 0)
        _, ya = xy(0, a)
        d.rectangle([x0 + 1, ya, x1 - 1, m + size], fill="#4c72b0", outline="white")
        _, yc = xy(0, c)
        d.line([(x0 + 1, yc), (x1 - 1, yc)], fill="#dd8452", width=2)
        if count / n >= 0.02:
            d.text(((x0 + x1) / 2, m + size - 4), str(count), fill="white", font=font, anchor="mb")
    for t in (0, 0.25, 0.5, 0.75, 1):
        d.text((m - 6, xy(0, t)[1]), f"{t:.2f}", fill="black", font=font, anchor="rm")
        d.text((xy(t, 0)[0], m + size + 6), f"{t:.2f}", fill="black", font=font, anchor="ma")
    d.text((m + size / 2, 14), title, fill="black", font=font, anchor="ma")
    d.text((m + size / 2, m + size + 26), "confidence (top probability); bars: accuracy, orange: mean confidence",
           fill="black", font=font, anchor="ma")
    img.save(path)


def calibration(probs, y, figure=None) -> list[str]:
    conf, pred = probs.max(1)
    correct = pred == y
    e, rows = ece(conf, correct)
    lines = [f"expected calibration error (15 bins): **{e:.3f}**; mean confidence {conf.mean():.3f}, "
             f"accuracy {correct.float().mean():.3f}", "",
             "| threshold | share below | accuracy above | accuracy below | errors below / all errors |",
             "|---|---|---|---|---|"]
    for t in THRESHOLDS:
        lo = conf < t
        above = correct[~lo].float().mean().item() if (~lo).any() else float("nan")
        below = correct[lo].float().mean().item() if lo.any() else float("nan")
        errs = (~correct).sum().item()
        lines.append(f"| {t} | {lo.float().mean():.1%} | {above:.1%} | {below:.1%} | "
                     f"{(~correct & lo).sum().item()} / {errs} |")
    lines += ["", "reliability (confidence bin: count, mean confidence, accuracy): "
              + "; ".join(f"{lo:.2f}-{hi:.2f}: {n}, {c:.2f}, {a:.2f}" for lo, hi, n, c, a in rows), ""]
    if figure is not None:
        reliability_png(figure, rows, f"set (a): reliability, ECE {e:.3f}")
        lines += [f"reliability diagram: `{figure}`", ""]
    return lines


def baseline_classifier(ref: str):
    """The EmbeddedClassifier of git revision `ref`, its routing modules read with `git show` into a temp package."""
    root = pathlib.Path(__file__).resolve().parents[1]
    pkg = pathlib.Path(tempfile.mkdtemp()) / "baseline_routing"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    names = subprocess.run(["git", "ls-tree", "--name-only", ref, "ssattn/routing/"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split()
    for path in names:
        src = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=root, check=True, capture_output=True,
                             text=True).stdout
        # its relative imports of the package's other rooms become absolute
        src = src.replace("from ..", "from ssattn.")
        (pkg / pathlib.Path(path).name).write_text(src)
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module("baseline_routing.embedded").EmbeddedClassifier()


def speed(classifiers: dict) -> list[str]:
    g = torch.Generator().manual_seed(0)
    lines = ["| classifier | 128 px, batch 32 (images/s) | 512 px, batch 8 (images/s) |", "|---|---|---|"]
    batches = {128: torch.rand(32, 3, 128, 128, generator=g), 512: torch.rand(8, 3, 512, 512, generator=g)}
    for name, clf in classifiers.items():
        with torch.no_grad():
            r = {s: best_rate(lambda x=x: clf(x), len(x)) for s, x in batches.items()}
        lines.append(f"| {name} | {r[128]:.1f} | {r[512]:.1f} |")
    return lines + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=800, help="images per set (800)")
    ap.add_argument("--seed", type=int, default=2027)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", default=None, help="git revision whose embedded classifier to time too")
    ap.add_argument("--figures", type=pathlib.Path, default=None, help="folder for the reliability diagram")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clf = EmbeddedClassifier(PAPER_CLASSES)
    lines = [f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
             f"weights {clf.settings['weights']}, temperature {clf.temperature:.3f}", ""]
    sets = {"(a) held-out photographs, training ranges": rd.heldout_set(args.n, args.seed, rd.TRAIN),
            "(b) held-out photographs, parameters outside the training ranges":
                rd.heldout_set(args.n, args.seed + 1, rd.OUTSIDE),
            "(c) a separately written generator (plain_degradations.py)": (*plain_set(args.n, args.seed + 2), None)}
    baseline = baseline_classifier(args.baseline) if args.baseline else None
    for title, (images, y, params) in sets.items():
        if baseline is not None:
            old = (baseline(images).argmax(1) == y).float().mean().item()
            lines += [f"{title}: the embedded classifier of {args.baseline}: accuracy {old:.1%}", ""]
        probs = clf(images)
        pred = probs.argmax(1)
        groups = [p["content"] for p in params] if params is not None else None
        lines += table(title, y, pred, PAPER_CLASSES, groups)
        if title.startswith("(a)"):
            fig = None
            if args.figures is not None:
                args.figures.mkdir(parents=True, exist_ok=True)
                fig = args.figures / "routing_reliability_a.png"
            lines += calibration(probs, y, fig)
        print("\n".join(lines[-12:]), flush=True)
    classifiers = {"embedded (this revision)": clf}
    if baseline is not None:
        classifiers[f"embedded of {args.baseline}"] = baseline
    lines += [f"speed, {args.threads} thread(s), best of 3:", ""] + speed(classifiers)
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
