"""The ablation's table: every finished run of a folder gathered into means over seeds, paired differences from
the baseline (same seed, same data, same initial weights and batches), per-class IoU, and the findings in words.

table.json holds:
    config, bounds (the segmenter on the degraded inputs and on the references), classes,
    rows: [{variant, guidance, label, train_flags, seeds, metrics: {m: {mean, std, per_seed}},
            paired: {m: {mean, std, per_seed}} (variant - baseline), iou / paired_iou: {class: {mean, std}},
            guard: {fired, runs, max_growth, max_growth_in_map, per_seed: [{rms_growth, rms_in_map_growth,
            warns_at}]} (the library's guard replayed from each run's recorded checks),
            feature_scale: {level: {in, out}}, ms_per_step, pairing}],
    findings: [lines]
std is the sample standard deviation over seeds; a paired spread is that of the per-seed differences.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ssattn.semantic.modules import GUARD_FACTORS, guard_warning_call

from .runner import VARIANTS, AblationConfig, read_run

METRICS = ("psnr", "ssim", "psnr_fg", "ssim_fg", "psnr_bg", "ssim_bg", "miou")
# The paired-difference table: metric, header, scale (mIoU in points), decimals.
PAIRED_COLUMNS = (("psnr_fg", "fg PSNR (dB)", 1, 2), ("psnr", "PSNR (dB)", 1, 2), ("psnr_bg", "bg PSNR (dB)", 1, 2),
                  ("ssim_fg", "fg SSIM", 1, 4), ("ssim", "SSIM", 1, 4), ("ssim_bg", "bg SSIM", 1, 4),
                  ("miou", "mIoU (points)", 100, 1))
GUIDANCE_WORDS = {"oracle": "oracle (true masks)", "embedded": "embedded guidance", None: "-"}


def _num(x) -> float:
    """A stored score as a float: null (a non-finite value in strict JSON) is NaN."""
    return float("nan") if x is None else float(x)


def _stats(values) -> dict:
    v = [_num(x) for x in values]
    finite = [x for x in v if math.isfinite(x)]
    mean = float(np.mean(finite)) if finite else float("nan")
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")
    return {"mean": mean, "std": std, "per_seed": v}


def collect(config: AblationConfig, out_dir: str) -> dict:
    """{(variant, guidance): {seed: result}} of the runs finished with these settings."""
    found = {}
    for name, g, seed in config.runs():
        r = read_run(out_dir, config, name, g, seed)
        if r is not None:
            found.setdefault((name, g), {})[seed] = r
    return found


def _growth(result: dict, key: str = "rms") -> float | None:
    """The largest growth of a level's feature scale (`key`: "rms" or "rms_in_map") over the guard's first check,
    in one run (None: no checks)."""
    hist = result.get("guard_history") or []
    if len(hist) < 2:
        return None
    first = hist[0][key]
    return max(h[key][i] / first[i] for h in hist[1:] for i in range(len(first)) if first[i] > 0)


def guard_of(result: dict, form: str) -> dict:
    """One run's guard: the growth of both scales and the call at which the library's guard warns, replayed from
    the run's recorded checks (the rule of this ssattn, whatever rule the run was made with)."""
    hist = result.get("guard_history") or []
    return {"rms_growth": _growth(result), "rms_in_map_growth": _growth(result, "rms_in_map"),
            "warns_at": guard_warning_call(hist, form) if hist else None}


def signs(per_seed) -> str:
    """How many seeds went up and down: "higher in 1, lower in 4 of 5"."""
    v = [x for x in per_seed if math.isfinite(x)]
    return f"higher in {sum(x > 0 for x in v)}, lower in {sum(x < 0 for x in v)} of {len(v)}"


def effect_words(mean: float, std: float, n: int, unit: str = " dB", digits: int = 2, per_seed=None) -> str:
    """A paired difference against twice its spread: the rule this table states its findings by."""
    if n < 2 or not math.isfinite(std):
        return f"{mean:+.{digits}f}{unit} (one seed: no spread)"
    text = f"{mean:+.{digits}f} ± {std:.{digits}f}{unit} over {n} seeds"
    if per_seed is not None:
        text += f" ({signs(per_seed)})"
    if mean > 2 * std:
        return text + ": a gain larger than twice its spread"
    if mean < -2 * std:
        return text + ": a loss larger than twice its spread"
    return text + ": within twice its spread"


def summarize(config: AblationConfig, out_dir: str, bounds: dict) -> dict:
    """The table (see the module docstring) of the runs finished in out_dir."""
    from ssattn.apps.data.scenes import CLASSES

    runs = collect(config, out_dir)
    base = runs.get(("baseline", None), {})
    rows = []
    for name in config.variants:
        v = VARIANTS[name]
        for g in (config.guidances if v.guided else (None,)):
            got = runs.get((name, g), {})
            if not got:
                continue
            seeds = sorted(got)
            paired_seeds = [s for s in seeds if s in base]
            metrics = {m: _stats(got[s]["scores"][m] for s in seeds) for m in METRICS}
            paired = {m: _stats(_num(got[s]["scores"][m]) - _num(base[s]["scores"][m]) for s in paired_seeds)
                      for m in METRICS}
            iou = {c: _stats(got[s]["scores"]["iou"][k] for s in seeds) for k, c in enumerate(CLASSES)}
            paired_iou = {c: _stats(_num(got[s]["scores"]["iou"][k]) - _num(base[s]["scores"]["iou"][k])
                                    for s in paired_seeds) for k, c in enumerate(CLASSES)}
            guards = [guard_of(got[s], v.form) for s in seeds]
            growth = [g["rms_growth"] for g in guards]
            scale = {lv: {side: float(np.mean([got[s]["feature_scale"][lv][side] for s in seeds]))
                          for side in ("in", "out")} for lv in config.levels}
            pairing = all(got[s]["init_digest"] == base[s]["init_digest"] and
                          got[s]["batch_digest"] == base[s]["batch_digest"] for s in paired_seeds
                          if v.steps_factor == 1)
            rows.append({
                "variant": name, "guidance": g, "label": v.label, "train_flags": v.train_flags(config.levels),
                "seeds": seeds, "paired_seeds": paired_seeds, "metrics": metrics, "paired": paired, "iou": iou,
                "paired_iou": paired_iou, "feature_scale": scale,
                "guard": {"fired": sum(g["warns_at"] is not None for g in guards), "runs": len(seeds),
                          "max_growth": max((x for x in growth if x is not None), default=None),
                          "max_growth_in_map": max((g["rms_in_map_growth"] for g in guards
                                                    if g["rms_in_map_growth"] is not None), default=None),
                          "per_seed": guards},
                "ms_per_step": float(np.mean([got[s]["ms_per_step"] for s in seeds])),
                "pairing": pairing,
            })
    table = {"config": dataclasses.asdict(config), "bounds": bounds.get("scores", {}),
             "segmenter": bounds.get("segmenter"), "classes": list(CLASSES), "rows": rows}
    table["findings"] = findings(table)
    return table


def _row(table: dict, variant: str, guidance=None) -> dict | None:
    return next((r for r in table["rows"] if r["variant"] == variant and r["guidance"] == guidance), None)


def findings(table: dict) -> list[str]:
    """The table's results in sentences: foreground gains against twice their spread, the doubling check, the
    guard, pairing."""
    lines = []
    rows = [r for r in table["rows"] if r["variant"] not in ("baseline", "baseline_2x") and r["paired_seeds"]]
    gains = [r for r in rows if len(r["paired_seeds"]) > 1
             and r["paired"]["psnr_fg"]["mean"] > 2 * r["paired"]["psnr_fg"]["std"]]
    if rows:
        if gains:
            lines.append("Foreground gains larger than twice their paired spread: " + "; ".join(
                f"{r['label']} with {GUIDANCE_WORDS[r['guidance']]}, "
                f"{r['paired']['psnr_fg']['mean']:+.2f} ± {r['paired']['psnr_fg']['std']:.2f} dB over "
                f"{len(r['paired_seeds'])} seeds" for r in gains) + ".")
        else:
            lines.append("No variant shows a foreground gain larger than twice its paired spread.")
        for r in rows:
            p = r["paired"]
            lines.append(f"{r['label']}, {GUIDANCE_WORDS[r['guidance']]}: foreground PSNR "
                         f"{effect_words(p['psnr_fg']['mean'], p['psnr_fg']['std'], len(r['paired_seeds']), per_seed=p['psnr_fg']['per_seed'])}; "
                         f"whole image {p['psnr']['mean']:+.2f} ± {p['psnr']['std']:.2f} dB; mIoU "
                         f"{100 * p['miou']['mean']:+.1f} ± {100 * p['miou']['std']:.1f} points "
                         f"({signs(p['miou']['per_seed'])}).")
    doubled = _row(table, "baseline_2x")
    if doubled and doubled["paired_seeds"]:
        p = doubled["paired"]["psnr_fg"]
        lines.append(f"Doubling check: the baseline at {2 * table['config']['steps']} steps instead of "
                     f"{table['config']['steps']} changes foreground PSNR by {p['mean']:+.2f} ± {p['std']:.2f} dB "
                     f"(whole image {doubled['paired']['psnr']['mean']:+.2f} dB) over "
                     f"{len(doubled['paired_seeds'])} seeds.")
    guarded = [r for r in table["rows"] if r["variant"] not in ("baseline", "baseline_2x")]
    if guarded:
        lines.append("Divergence guard (warned in / runs): " + "; ".join(
            f"{r['variant']} {r['guidance']} {r['guard']['fired']}/{r['guard']['runs']}" for r in guarded) + ".")
    broken = [r["variant"] + (f" {r['guidance']}" if r["guidance"] else "") for r in table["rows"] if not r["pairing"]]
    lines.append("Pairing held in every run (the same initial U-Net weights and the same batches as the baseline "
                 "of its seed)." if not broken else f"PAIRING BROKEN in: {', '.join(broken)}.")
    return lines


def _bound(scores: dict, key: str, digits: int) -> str:
    """A score of the inputs or references: the reference's PSNR is infinite (null in strict JSON, with a note)."""
    v = scores[key]
    if v is None:
        return "inf" if "+Infinity" in scores.get(f"{key}_note", "") else "-"
    return "inf" if v == float("inf") else f"{v:.{digits}f}"


def _pm(s: dict, digits: int, scale: float = 1) -> str:
    if not math.isfinite(s["mean"]):
        return "-"
    std = "" if not math.isfinite(s["std"]) else f" ± {scale * s['std']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f}{std}"


def _signed(s: dict, digits: int, scale: float = 1) -> str:
    if not math.isfinite(s["mean"]):
        return "-"
    std = "" if not math.isfinite(s["std"]) else f" ± {scale * s['std']:.{digits}f}"
    return f"{scale * s['mean']:+.{digits}f}{std}"


def markdown(table: dict) -> list[str]:
    """table.md's lines: the scores, the paired differences, per-class IoU, guard and feature scales, findings."""
    c = table["config"]
    classes = table["classes"]
    lines = [f"# -SS ablation: {c['size']} px scenes, {c['n_train']} train / {c['n_test']} held-out, U-Net width "
             f"{c['width']}, stages {','.join(c['levels'])}, {c['steps']} steps x batch {c['batch_size']}, "
             f"seeds {list(c['seeds'])}", ""]
    lines += ["## Findings", ""] + [f"- {x}" for x in table["findings"]] + [""]
    lines += ["## Scores (mean ± std over seeds, held-out scenes)", "",
              "| model | guidance | seeds | PSNR | SSIM | fg PSNR | fg SSIM | bg PSNR | bg SSIM | mIoU | ms/step |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, b in table["bounds"].items():
        cells = " | ".join(_bound(b, m, d) for m, d in (("psnr", 2), ("ssim", 4), ("psnr_fg", 2), ("ssim_fg", 4),
                                                          ("psnr_bg", 2), ("ssim_bg", 4), ("miou", 3)))
        lines.append(f"| {name} | - | - | {cells} | - |")
    for r in table["rows"]:
        m = r["metrics"]
        lines.append(f"| {r['label']} | {r['guidance'] or '-'} | {len(r['seeds'])} | {_pm(m['psnr'], 2)} | "
                     f"{_pm(m['ssim'], 4)} | {_pm(m['psnr_fg'], 2)} | {_pm(m['ssim_fg'], 4)} | {_pm(m['psnr_bg'], 2)} | "
                     f"{_pm(m['ssim_bg'], 4)} | {_pm(m['miou'], 3)} | {r['ms_per_step']:.0f} |")
    lines += ["", "## Paired differences from the baseline (variant - U-Net, same seed; mean ± spread)", "",
              "| model | guidance | seeds | " + " | ".join(h for _, h, _, _ in PAIRED_COLUMNS) +
              " | fg PSNR vs 2x spread | fg PSNR seeds up / down |",
              "|---|---|---|" + "---|" * (len(PAIRED_COLUMNS) + 2)]
    for r in table["rows"]:
        if r["variant"] == "baseline":
            continue
        p = r["paired"]
        fg = p["psnr_fg"]
        n = len(r["paired_seeds"])
        verdict = ("-" if n < 2 else "gain > 2x spread" if fg["mean"] > 2 * fg["std"] else
                   "loss > 2x spread" if fg["mean"] < -2 * fg["std"] else "within 2x spread")
        lines.append(f"| {r['label']} | {r['guidance'] or '-'} | {n} | " +
                     " | ".join(_signed(p[m], d, s) for m, _, s, d in PAIRED_COLUMNS) +
                     f" | {verdict} | {sum(x > 0 for x in fg['per_seed'])} / {sum(x < 0 for x in fg['per_seed'])} |")
    lines += ["", "## Per-class IoU of the segmenter (mean over seeds)", "",
              "| images | guidance | " + " | ".join(classes) + " | mIoU |", "|---|---|" + "---|" * (len(classes) + 1)]
    for name, b in table["bounds"].items():
        lines.append(f"| {name} | - | " + " | ".join("-" if x is None or math.isnan(x) else f"{x:.3f}" for x in b["iou"])
                     + f" | {_bound(b, 'miou', 3)} |")
    for r in table["rows"]:
        lines.append(f"| {r['label']} | {r['guidance'] or '-'} | " +
                     " | ".join(_pm(r["iou"][k], 3) for k in classes) + f" | {_pm(r['metrics']['miou'], 3)} |")
    lines += ["", "Paired per-class IoU differences from the baseline (points):", "",
              "| model | guidance | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
    for r in table["rows"]:
        if r["variant"] != "baseline":
            lines.append(f"| {r['label']} | {r['guidance'] or '-'} | " +
                         " | ".join(_signed(r["paired_iou"][k], 1, 100) for k in classes) + " |")
    levels = table["config"]["levels"]
    lines += ["", "## Decoder features and the divergence guard", "",
              "Mean |F| inside / outside the object masks on held-out scenes (mean over seeds); the largest "
              "growth of a level's feature RMS, over the level and inside the map, over the guard's first check "
              "during training (max over seeds); in how many runs the guard warns, replayed from the runs' "
              "recorded checks with this ssattn's rule (paper form: the RMS inside the map, "
              f"{GUARD_FACTORS['paper']:g}x; normalized form: the RMS, {GUARD_FACTORS['normalized']:g}x).", "",
              "| model | guidance | " + " | ".join(f"{lv} in / out" for lv in levels)
              + " | RMS growth | in the map | guard warns |",
              "|---|---|" + "---|" * (len(levels) + 3)]
    for r in table["rows"]:
        g = r["guard"]
        growth = "-" if g["max_growth"] is None else f"{g['max_growth']:.1f}x"
        inside = "-" if g.get("max_growth_in_map") is None else f"{g['max_growth_in_map']:.1f}x"
        warned = "-" if g["max_growth"] is None else f"{g['fired']}/{g['runs']}"
        lines.append(f"| {r['label']} | {r['guidance'] or '-'} | " +
                     " | ".join(f"{r['feature_scale'][lv]['in']:.2f} / {r['feature_scale'][lv]['out']:.2f}"
                                for lv in levels) + f" | {growth} | {inside} | {warned} |")
    lines += ["", "## Each variant as `ssattn train` options", ""]
    lines += [f"- {r['label']}: `{r['train_flags']}`" for r in table["rows"] if r["guidance"] in (None, "oracle")]
    seg = table.get("segmenter") or {}
    if seg:
        lines += ["", f"Segmenter: {seg.get('steps_run')} steps, weights of step {seg.get('best_step')} kept "
                      f"(validation mIoU {seg.get('best_miou', float('nan')):.3f}; "
                      f"{'stopped when it no longer rose' if seg.get('stopped_early') else 'stopped at the step limit'})."]
    return lines
