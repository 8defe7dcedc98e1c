"""The ablation's picture (Pillow): each variant's paired difference from the baseline, per metric, with a dot
per seed, the mean as a wide mark and one spread either side."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from ssattn.apps.demo.figures import _font

PANELS = (("psnr_fg", "foreground PSNR - baseline (dB)", 1, 2), ("psnr", "whole-image PSNR - baseline (dB)", 1, 2),
          ("psnr_bg", "background PSNR - baseline (dB)", 1, 2), ("miou", "segmenter mIoU - baseline (points)", 100, 1))
COLOURS = {"oracle": "#dd8452", "embedded": "#4c72b0", None: "#55a868"}
SHORT = {"attention": "attention", "alignment": "alignment", "both_paper": "both, paper", "both_normalized":
         "both, normalized", "eta0": "eta = 0", "baseline_2x": "U-Net 2x steps"}


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is at least raw (tick spacing)."""
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def paired_plot(path: str, table: dict) -> None:
    """Write the PNG: a 2x2 grid of panels (PANELS), one column per variant and guidance (not the baseline)."""
    rows = [r for r in table["rows"] if r["variant"] != "baseline" and r["paired_seeds"]]
    if not rows:
        raise ValueError("the table has no paired runs to plot (run the baseline and at least one variant)")
    slot, left, right, top, bottom = 64, 64, 16, 40, 70
    pw, ph = max(slot * len(rows), 330), 300
    slot = pw / len(rows)
    font, small = _font(14), _font(11)
    cols = 2
    W = cols * (left + pw + right) + 10
    legend_h = 26
    H = legend_h + 2 * (top + ph + bottom)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    x = 10
    for g, words in (("oracle", "oracle guidance (true masks)"), ("embedded", "embedded guidance"),
                     (None, "no guidance")):
        draw.ellipse([x, 8, x + 10, 18], fill=COLOURS[g])
        draw.text((x + 14, 13), words, fill="black", font=small, anchor="lm")
        x += 40 + 7 * len(words)
    for p, (metric, title, scale, digits) in enumerate(PANELS):
        x0 = 10 + (p % cols) * (left + pw + right) + left
        y0 = legend_h + (p // cols) * (top + ph + bottom) + top
        y1 = y0 + ph
        values = [scale * v for r in rows for v in r["paired"][metric]["per_seed"] if math.isfinite(v)]
        for r in rows:  # the spread bars too
            d = r["paired"][metric]
            if math.isfinite(d["mean"]) and math.isfinite(d["std"]):
                values += [scale * (d["mean"] - d["std"]), scale * (d["mean"] + d["std"])]
        lo, hi = min(values + [0.0]), max(values + [0.0])
        span = max(hi - lo, 1e-6)
        lo, hi = lo - 0.1 * span, hi + 0.1 * span
        ymap = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)  # noqa: E731
        step = _nice_step((hi - lo) / 5)
        ticks = max(0, -math.floor(math.log10(step) + 1e-9))  # decimals of the step
        draw.text((x0 + pw // 2, y0 - 24), title, fill="black", font=font, anchor="ma")
        draw.line([(x0, y0), (x0, y1), (x0 + pw, y1)], fill="black")
        v = math.ceil(lo / step) * step
        while v <= hi + 1e-12:
            draw.line([(x0 - 4, ymap(v)), (x0, ymap(v))], fill="black")
            draw.text((x0 - 6, ymap(v)), f"{v:+.{ticks}f}".replace("-0.0", "+0.0") if abs(v) < step / 2 else
                      f"{v:+.{ticks}f}", fill="black", font=small, anchor="rm")
            v += step
        for xs in range(x0, x0 + pw, 8):  # zero: no difference from the baseline
            draw.line([(xs, ymap(0)), (min(xs + 4, x0 + pw), ymap(0))], fill="#888888")
        for i, r in enumerate(rows):
            cx = x0 + slot * (i + 0.5)
            colour = COLOURS[r["guidance"]]
            d = r["paired"][metric]
            pts = [scale * v for v in d["per_seed"]]
            for j, v in enumerate(pts):
                if math.isfinite(v):
                    dx = (j - (len(pts) - 1) / 2) * 4
                    draw.ellipse([cx + dx - 3, ymap(v) - 3, cx + dx + 3, ymap(v) + 3], outline=colour, fill="white")
            if math.isfinite(d["mean"]):
                mean = scale * d["mean"]
                draw.line([(cx - slot * 0.3, ymap(mean)), (cx + slot * 0.3, ymap(mean))], fill=colour, width=4)
                if math.isfinite(d["std"]):
                    std = scale * d["std"]
                    draw.line([(cx, ymap(mean - std)), (cx, ymap(mean + std))], fill="black", width=2)
                    for yv in (mean - std, mean + std):
                        draw.line([(cx - 6, ymap(yv)), (cx + 6, ymap(yv))], fill="black", width=2)
            name = SHORT.get(r["variant"], r["variant"])
            for k, part in enumerate(name.split(", ") if ", " in name else [name]):
                draw.text((cx, y1 + 6 + 13 * k), part, fill="black", font=small, anchor="ma")
            draw.text((cx, y1 + 36), f"n={len(pts)}", fill="#555555", font=small, anchor="ma")
    canvas.save(path)
