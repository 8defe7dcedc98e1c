"""The demo's pictures, drawn with Pillow: a comparison grid (figure.png) and a metric plot (metrics.png)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def _font(size: int):
    return ImageFont.load_default(size=size)


def _tile(img: Tensor, side: int) -> Image.Image:
    t = img.detach().float().clamp(0, 1).cpu()
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    arr = (t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr).resize((side, side), Image.NEAREST)


def comparison_figure(path: str, columns, min_side: int = 128) -> None:
    """columns: [(label, images (n, C, S, S), captions (n strings) or None)]; one row per image.

    Each crop is scaled by a whole factor to at least min_side pixels (nearest: pixels stay visible as pixels).
    """
    n, size = columns[0][1].shape[0], columns[0][1].shape[-1]
    side = size * max(1, math.ceil(min_side / size))
    pad, head, foot = 6, 22, 18
    font = _font(13)
    width = len(columns) * (side + pad) + pad
    height = head + n * (side + foot + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (label, images, captions) in enumerate(columns):
        x = pad + c * (side + pad)
        draw.text((x + side // 2, 4), label, fill="black", font=font, anchor="ma")
        for r in range(n):
            y = head + r * (side + foot + pad)
            canvas.paste(_tile(images[r], side), (x, y))
            if captions is not None:
                draw.text((x + side // 2, y + side + 2), captions[r], fill="black", font=font, anchor="ma")
    canvas.save(path)


def metrics_plot(path: str, panels, labels, colours=("#4c72b0", "#dd8452", "#55a868")) -> None:
    """panels: [(title, {model: per-seed values}, reference lines [(label, value)], decimals)]; models in `labels`
    order.

    Each model: a wide mark at the mean, an error bar of one sample std, and a dot per seed.
    """
    pw, ph, left, right, top, bottom = 330, 300, 56, 70, 34, 56
    font, small = _font(13), _font(11)
    canvas = Image.new("RGB", (len(panels) * (left + pw + right) + 10, ph + top + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (title, values, lines, decimals) in enumerate(panels):
        x0 = 10 + p * (left + pw + right) + left
        y0, y1 = top, top + ph
        everything = [v for vs in values.values() for v in vs] + [v for _, v in lines]
        lo, hi = min(everything), max(everything)
        span = max(hi - lo, 1e-6)
        lo, hi = lo - 0.25 * span, hi + 0.15 * span
        ymap = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)  # noqa: E731
        draw.text((x0 + pw // 2, 6), title, fill="black", font=font, anchor="ma")
        draw.line([(x0, y0), (x0, y1), (x0 + pw, y1)], fill="black")
        for k in range(5):  # y ticks
            v = lo + (hi - lo) * k / 4
            draw.line([(x0 - 4, ymap(v)), (x0, ymap(v))], fill="black")
            draw.text((x0 - 6, ymap(v)), f"{v:.{decimals}f}", fill="black", font=small, anchor="rm")
        for label, v in lines:
            y = ymap(v)
            for xs in range(x0, x0 + pw, 8):
                draw.line([(xs, y), (min(xs + 4, x0 + pw), y)], fill="#888888")
            draw.text((x0 + pw + 4, y), label, fill="#555555", font=small, anchor="lm")  # outside the data
        slot = pw / len(labels)
        for i, name in enumerate(labels):
            vs = values[name]
            mean = float(np.mean(vs))
            std = float(np.std(vs, ddof=1)) if len(vs) > 1 else 0.0
            cx = x0 + slot * (i + 0.5)
            colour = colours[i % len(colours)]
            # The mean as a wide mark, not a bar: the axis does not start at zero.
            draw.line([(cx - slot * 0.3, ymap(mean)), (cx + slot * 0.3, ymap(mean))], fill=colour, width=5)
            draw.line([(cx, ymap(mean - std)), (cx, ymap(mean + std))], fill="black", width=2)
            for yv in (mean - std, mean + std):
                draw.line([(cx - 8, ymap(yv)), (cx + 8, ymap(yv))], fill="black", width=2)
            for j, v in enumerate(vs):
                dx = (j - (len(vs) - 1) / 2) * 7
                draw.ellipse([cx + dx - 3, ymap(v) - 3, cx + dx + 3, ymap(v) + 3], fill="white", outline="black")
            draw.text((cx, y1 + 6), labels[name], fill="black", font=small, anchor="ma")
            draw.text((cx, y1 + 22), f"{mean:.{decimals}f} ± {std:.{decimals}f}", fill="black", font=small, anchor="ma")
    canvas.save(path)
