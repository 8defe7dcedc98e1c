"""What each part of -SS does, measured: the ablation on the demo's synthetic scenes, paired seeds.

    python benchmarks/ablation_ss.py --out ablation-ss --jobs 2

Trains, for each seed, the U-Net and its variants (attention only, alignment
only, both in each loss form, eta = 0; each with the true masks and with
the embedded guidance) on the same scenes, from the same initial weights,
with the same batches; scores them on held-out scenes (PSNR / SSIM over the
whole image, the objects and the background; a multi-class segmenter's
per-class IoU and mIoU) and writes OUT/table.json, OUT/table.md and
OUT/paired.png. Rerunning the command resumes: finished runs are kept.

Why a script and not an `ssattn` command: the ablation needs per-pixel
object labels (foreground and background scores, the oracle guidance, the
per-class IoU), which the folder datasets `ssattn train` reads do not
carry. On your own data, train each variant with the `ssattn train`
options table.md lists for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ssattn.apps.ablation import VARIANTS, AblationConfig, GUIDANCES, markdown, run_all, summarize
from ssattn.apps.ablation.plot import paired_plot
from ssattn.apps.jsonfile import write_json


def parse(argv=None) -> argparse.Namespace:
    d = AblationConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="ablation-ss", help="results folder (default %(default)s); reruns resume")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per run (default %(default)s)")
    p.add_argument("--seeds", type=int, default=len(d.seeds), help="training seeds 0..N-1 (default %(default)s)")
    p.add_argument("--first-seed", type=int, default=0, help="first training seed (default %(default)s)")
    p.add_argument("--size", type=int, default=d.size, help="scene size, a multiple of 8 (default %(default)s)")
    p.add_argument("--n-train", type=int, default=d.n_train, help="training scenes (default %(default)s)")
    p.add_argument("--n-test", type=int, default=d.n_test, help="held-out scenes (default %(default)s)")
    p.add_argument("--width", type=int, default=d.width, help="U-Net base width (default %(default)s)")
    p.add_argument("--levels", default=",".join(d.levels), help="-SS decoder stages (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="scene seed (default %(default)s)")
    p.add_argument("--variants", default=",".join(d.variants),
                   help="comma-separated, from " + ", ".join(VARIANTS) + " (default: all)")
    p.add_argument("--guidance", default=",".join(d.guidances),
                   help="comma-separated, from " + ", ".join(GUIDANCES) + " (default: both)")
    p.add_argument("--seg-max-steps", type=int, default=d.seg_max_steps,
                   help="the segmenter's step limit; it stops earlier when its validation mIoU stops rising "
                        "(default %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default %(default)s)")
    p.add_argument("--report-only", action="store_true", help="only write the table and plot of the finished runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def config_of(args) -> AblationConfig:
    return AblationConfig(
        size=args.size, n_train=args.n_train, n_test=args.n_test, width=args.width,
        levels=tuple(v.strip() for v in args.levels.split(",") if v.strip()), steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
        data_seed=args.data_seed, variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        guidances=tuple(g.strip() for g in args.guidance.split(",") if g.strip()),
        seg_max_steps=args.seg_max_steps, threads=args.threads)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        config = config_of(args)
    except ValueError as exc:
        print(f"ablation_ss: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if not args.report_only:
        run_all(config, args.out, jobs=args.jobs, progress=not args.no_progress)
    path = os.path.join(args.out, "bounds.json")
    if not os.path.isfile(path):
        print(f"ablation_ss: {args.out} holds no ablation yet (no bounds.json): run it without --report-only first",
              file=sys.stderr)
        return 2
    with open(path) as f:
        bounds = json.load(f)
    table = summarize(config, args.out, bounds)
    write_json(os.path.join(args.out, "table.json"), table, indent=1)  # strict: inf and NaN as null, with a note
    lines = markdown(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if any(r["variant"] != "baseline" and r["paired_seeds"] for r in table["rows"]):
        paired_plot(os.path.join(args.out, "paired.png"), table)
    print("\n".join(lines))
    print(f"\nwrote table.json, table.md, paired.png into {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
