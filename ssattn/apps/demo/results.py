"""The demo's results: per-seed scores aggregated into results.json's structure, the table, and the verdict.

results.json: {"seeds": n, "guidance": {"auc", "iou"}, "models": {name: {metric: mean, ..., "std": {metric: ..},
"per_seed": {metric: [..]}}}} for the models baseline, ss, ss_oracle and the metrics psnr, ssim, psnr_fg,
ssim_fg, miou, ms_per_step. std is the sample standard deviation over seeds.
"""

from __future__ import annotations

import math

import numpy as np

from .experiment import LABELS, MODELS

METRICS = ("psnr", "ssim", "psnr_fg", "ssim_fg", "miou", "ms_per_step")


def _std(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(per_seed: dict, guidance: dict) -> dict:
    """per_seed: {model: [scores of seed 0, seed 1, ...]} -> the results.json object."""
    n = {len(v) for v in per_seed.values()}
    if len(n) != 1 or set(per_seed) != set(MODELS):
        raise ValueError(f"per_seed must hold the models {MODELS} with the same number of seeds each")
    models = {}
    for name in MODELS:
        runs = per_seed[name]
        values = {m: [float(r[m]) for r in runs] for m in METRICS}
        models[name] = {**{m: float(np.mean(v)) for m, v in values.items()},
                        "std": {m: _std(v) for m, v in values.items()}, "per_seed": values}
    return {"seeds": n.pop(), "guidance": {"auc": float(guidance["auc"]), "iou": float(guidance["iou"])},
            "models": models}


def paired_delta(results: dict, model: str, metric: str, against: str = "baseline") -> tuple[float, float]:
    """Mean and sample std over seeds of model - against (same seed, same data)."""
    a = np.array(results["models"][model]["per_seed"][metric])
    b = np.array(results["models"][against]["per_seed"][metric])
    d = a - b
    return float(d.mean()), _std(d)


# The smallest paired difference the demo calls an effect, besides exceeding twice its seed spread (a few
# seeds can give a small spread by chance: --quick's 3 steps gave +0.06 dB with a spread of 0.02). From the
# ablation's doubling check (benchmarks/RESULTS.md, 2026-12-03): training the U-Net twice as long moved its
# foreground PSNR by +0.34 dB and its mIoU by +1.8 points (5 seeds), so smaller differences are within what the
# budget alone changes.
MIN_EFFECT = {"psnr_fg": 0.3, "miou": 2.0}  # dB; mIoU points


def effect(mean: float, std: float, unit: str, digits: int, seeds: int, minimum: float = 0.0) -> str:
    """A paired difference in words: it counts only when it exceeds twice its seed spread (which needs 2+ seeds)
    and `minimum`."""
    if math.isnan(mean):
        return "n/a"
    shown = f"{mean:+.{digits}f}".replace("-0.0", "+0.0") if round(mean, digits) == 0 else f"{mean:+.{digits}f}"
    if seeds < 2:
        return f"{shown}{unit} (one seed: no spread, no verdict)"
    text = f"{shown}{unit} (seed spread {std:.{digits}f})"
    if abs(mean) <= 2 * std or abs(mean) < minimum:
        return text + f": no effect (one must exceed twice the seed spread and {minimum:g}{unit})"
    return text + (": better" if mean > 0 else ": worse")


def verdict(results: dict) -> list[str]:
    """Lines that say, in numbers, what -SS did against the baseline on the objects."""
    lines = []
    for name in ("ss", "ss_oracle"):
        fg = paired_delta(results, name, "psnr_fg")
        mi = paired_delta(results, name, "miou")
        lines.append(f"{LABELS[name]} vs {LABELS['baseline']} over {results['seeds']} seeds: foreground PSNR "
                     f"{effect(*fg, ' dB', 2, results['seeds'], MIN_EFFECT['psnr_fg'])}; mIoU "
                     f"{effect(mi[0] * 100, mi[1] * 100, ' points', 1, results['seeds'], MIN_EFFECT['miou'])}.")
    return lines


def helped(results: dict, name: str = "ss") -> bool:
    """True when -SS raised foreground PSNR by more than twice its seed spread and MIN_EFFECT (2+ seeds)."""
    mean, std = paired_delta(results, name, "psnr_fg")
    return results["seeds"] > 1 and mean > 2 * std and mean >= MIN_EFFECT["psnr_fg"]


def table(results: dict, extra_rows=()) -> list[str]:
    """Markdown table: mean ± std over seeds per model; extra_rows are (label, scores) without spread."""
    head = ["| model | PSNR (dB) | SSIM | fg PSNR (dB) | fg SSIM | mIoU | ms/step |", "|---|---|---|---|---|---|---|"]
    rows = []
    for label, scores in extra_rows:
        rows.append(f"| {label} | {scores['psnr']:.2f} | {scores['ssim']:.4f} | {scores['psnr_fg']:.2f} | "
                    f"{scores['ssim_fg']:.4f} | {scores['miou']:.3f} | - |")
    for name in MODELS:
        r, s = results["models"][name], results["models"][name]["std"]
        rows.append(f"| {LABELS[name]} | {r['psnr']:.2f} ± {s['psnr']:.2f} | {r['ssim']:.4f} ± {s['ssim']:.4f} | "
                    f"{r['psnr_fg']:.2f} ± {s['psnr_fg']:.2f} | {r['ssim_fg']:.4f} ± {s['ssim_fg']:.4f} | "
                    f"{r['miou']:.3f} ± {s['miou']:.3f} | {r['ms_per_step']:.0f} |")
    return head + rows
