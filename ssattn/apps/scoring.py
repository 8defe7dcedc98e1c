"""Scoring folders of enhanced images (`ssattn metrics`): pair files by stem, score them in batches, summarise.

A method is a folder of outputs. Outputs, references and masks are matched by file stem (name without the
extension). Each output gets the no-reference metrics; with its reference (same size) the full-reference ones;
with its mask the foreground ones; with a segmenter and its label map the per-class IoU. Whatever cannot be
scored (unreadable file, size mismatch, image too small for a metric) is recorded as a problem, never fatal.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssattn import metrics
from ssattn.images import ImageLoadError, list_images, load_image

NO_REFERENCE = ("uiqm", "uicm", "uism", "uiconm", "uciqe", "uciqe_chroma_std", "uciqe_contrast", "uciqe_saturation")
FULL_REFERENCE = ("psnr", "ssim")
FOREGROUND = ("psnr_fg", "ssim_fg")
# The table's columns (summary.md); metrics.csv and summary.json hold every metric.
TABLE = (("psnr", "PSNR"), ("ssim", "SSIM"), ("lpips", "LPIPS"), ("psnr_fg", "PSNR fg"), ("ssim_fg", "SSIM fg"),
         ("miou", "mIoU"), ("uiqm", "UIQM"), ("uciqe", "UCIQE"))


@dataclass
class Item:
    stem: str
    output: Path
    ref: Path | None = None
    mask: Path | None = None


@dataclass
class Method:
    """One folder of outputs, paired with the references and masks."""

    name: str
    folder: Path
    items: list[Item]
    no_reference: list[str] = field(default_factory=list)    # outputs without a reference (when --ref is given)
    missing: list[str] = field(default_factory=list)         # references without an output
    no_mask: list[str] = field(default_factory=list)         # outputs without a mask (when --masks is given)
    duplicates: list[str] = field(default_factory=list)      # stems of several outputs (left out)


def index_folder(folder) -> tuple[dict[str, Path], list[str]]:
    """Images of a folder by stem, and the stems that name more than one file (those are left out)."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in list_images(folder):
        by_stem[path.stem].append(path)
    return {s: p[0] for s, p in by_stem.items() if len(p) == 1}, sorted(s for s, p in by_stem.items() if len(p) > 1)


def method_names(folders) -> list[str]:
    """A method is named by its folder; two folders of one name are named by their paths."""
    names = [Path(os.path.normpath(f)).name or os.path.normpath(f) for f in folders]
    return [n if names.count(n) == 1 else os.path.normpath(f) for n, f in zip(names, folders)]


def pair(name: str, folder, refs: dict[str, Path] | None, masks: dict[str, Path] | None) -> Method:
    outputs, duplicates = index_folder(folder)
    items = [Item(s, outputs[s], refs.get(s) if refs is not None else None, masks.get(s) if masks is not None else None)
             for s in sorted(outputs)]
    m = Method(name, Path(folder), items, duplicates=duplicates)
    if refs is not None:
        m.no_reference = [it.stem for it in items if it.ref is None]
        m.missing = sorted(set(refs) - set(outputs))
    if masks is not None:
        m.no_mask = [it.stem for it in items if it.mask is None]
    return m


# ------------------------------------------------------------------------------------------------ loading
def load_label_map(path) -> torch.Tensor:
    """A mask file as an integer label map (H, W) int64: the stored values (palette indices for palette images).

    A colour image whose three channels agree is read as one channel; other colour images are refused.
    """
    from PIL import Image, ImageOps

    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            if img.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                a = np.asarray(img.convert("RGB") if img.mode != "LA" else img.getchannel(0))
                if a.ndim == 3:
                    if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
                        raise ImageLoadError(f"mask {path!r} is a colour image; masks must be label maps "
                                             f"(one channel of class indices)")
                    a = a[..., 0]
            elif img.mode == "F":
                raise ImageLoadError(f"mask {path!r} holds floating-point values; masks must be integer label maps")
            else:
                a = np.asarray(img)
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read mask {path!r}: {exc}") from exc
    return torch.from_numpy(np.ascontiguousarray(a).astype(np.int64))


def binary_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """With two classes, a mask stored as 0 / 255 (the usual binary PNG) means 0 / 1."""
    if num_classes == 2 and bool(((labels == 0) | (labels == 255)).all()):
        return (labels == 255).long()
    return labels


class Segmenter:
    """A segmentation network from a file: TorchScript, or (with `unsafe`) a module saved whole by torch.save.

    It maps images (B, 3, H, W) in [0, 1] to class logits (B, K, H', W'); one channel (B, 1, ...) is a binary
    logit (class 1 where > 0). Logits of another size are resized to the image's (bilinear).
    """

    def __init__(self, path, num_classes: int, device, unsafe: bool = False):
        self.path, self.num_classes, self.device = os.fspath(path), num_classes, device
        self.net = self._load(self.path, device, unsafe)

    @staticmethod
    def _is_torchscript(path: str) -> bool:
        import zipfile

        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())

    @classmethod
    def _load(cls, path: str, device, unsafe: bool) -> nn.Module:
        import pickle
        import warnings

        if not os.path.isfile(path):
            raise FileNotFoundError(f"--segmenter {path!r} does not exist or is not a file")
        if os.path.getsize(path) == 0:  # torch.load's own error says nothing
            raise ValueError(f"--segmenter {path!r} is empty (0 bytes)")
        if cls._is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": loading still works
                return torch.jit.load(path, map_location=device).eval()
        try:
            obj = torch.load(path, map_location=device, weights_only=not unsafe)
        except pickle.UnpicklingError as exc:
            if unsafe:
                raise ValueError(f"--segmenter {path!r} cannot be loaded: {str(exc) or type(exc).__name__}") from None
            raise ValueError(f"--segmenter {path!r} is not TorchScript; loading a module saved whole with torch.save "
                             f"runs code from the file: pass --unsafe-checkpoint if you trust it") from None
        except Exception as exc:
            raise ValueError(f"--segmenter {path!r} cannot be loaded: {str(exc) or type(exc).__name__}") from None
        if isinstance(obj, nn.Module):
            return obj.to(device).eval()
        from ssattn.apps.training.segmentation import TORCHSCRIPT_FILE

        what = "a state dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        hint = "save the module whole (torch.save(model)) or as TorchScript (torch.jit.trace / torch.jit.script)"
        beside = os.path.join(os.path.dirname(path), TORCHSCRIPT_FILE)  # the demo's and the ablation's
        if os.path.isfile(beside) and not os.path.samefile(beside, path):
            hint = f"a TorchScript copy is beside it: --segmenter {beside!r}"
        raise ValueError(f"--segmenter {path!r} holds {what}, not a network: {hint}")

    @torch.no_grad()
    def labels(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted labels (B, H, W) int64 for images (B, 3, H, W) in [0, 1]."""
        out = self.net(images.to(self.device, torch.float32))
        if isinstance(out, dict) and "out" in out:  # torchvision's segmentation models
            out = out["out"]
        if isinstance(out, (tuple, list)):
            out = out[0]
        K = self.num_classes
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != images.shape[0] \
                or out.shape[1] not in (K, 1) or (out.shape[1] == 1 and K != 2):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"--segmenter must map images (B, 3, H, W) to logits (B, {K}, H, W) for --classes {K}"
                             f"{' (or one binary logit channel)' if K == 2 else ''}, got {got}")
        if out.shape[-2:] != images.shape[-2:]:
            out = F.interpolate(out.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return (out[:, 0] > 0).long() if out.shape[1] == 1 else out.argmax(1)


# ------------------------------------------------------------------------------------------------ scoring
@dataclass
class Settings:
    device: torch.device
    batch_size: int = 8
    workers: int = 4
    lpips: nn.Module | None = None
    segmenter: Segmenter | None = None
    num_classes: int | None = None
    uiqm_convention: str = "paper"     # whose UIQM / UCIQE choices (ssattn.metrics.uiqm / uciqe's convention)
    uciqe_convention: str = "paper"


def conventions_line(summary: dict) -> str:
    """Which UIQM and UCIQE conventions a table used (summary.json's uiqm_convention, uciqe_convention)."""
    return (f"Conventions: UIQM: {summary.get('uiqm_convention', 'paper')}, UCIQE: "
            f"{summary.get('uciqe_convention', 'paper')} (docs/metrics.md, \"Reproducing published numbers\").")


def _load_many(paths, loader, workers: int):
    """loader(path) for each path (None passes through), in threads; an unreadable file gives its error."""
    def one(p):
        if p is None:
            return None
        try:
            return loader(p)
        except ImageLoadError as exc:
            return exc

    if workers <= 1 or len(paths) <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, paths))


def _by_size(indices, tensors):
    """Indices grouped by the spatial size of their tensors (batches need one size)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in indices:
        groups[tuple(tensors[i].shape[-2:])].append(i)
    return groups.values()


class Scorer:
    """Scores one method's items in batches; collects per-image rows, problems and the pooled confusion."""

    def __init__(self, settings: Settings):
        self.s = settings

    def columns(self, with_ref: bool, with_masks: bool) -> list[str]:
        cols = []
        if with_ref:
            cols += list(FULL_REFERENCE) + (["lpips"] if self.s.lpips is not None else [])
            if with_masks:
                cols += list(FOREGROUND)
        if self.s.segmenter is not None:
            cols += ["miou"] + [f"iou_{c}" for c in range(self.s.num_classes)]
        return cols + list(NO_REFERENCE)

    def score(self, method: Method, progress=None) -> tuple[list[dict], list[dict], torch.Tensor | None]:
        rows, problems = [], []
        K = self.s.num_classes
        pooled = torch.zeros(K, K, dtype=torch.int64) if self.s.segmenter is not None else None
        for start in range(0, len(method.items), self.s.batch_size):
            chunk = method.items[start:start + self.s.batch_size]
            r, p, conf = self._score_chunk(method, chunk)
            rows += r
            problems += p
            if conf is not None:
                pooled += conf
            if progress is not None:
                progress.update(len(chunk))
        return rows, problems, pooled

    def _problem(self, method, item, path, text):
        return {"method": method.name, "image": item.stem, "file": str(path), "problem": text}

    def _score_chunk(self, method: Method, chunk: list[Item]):
        s, dev = self.s, self.s.device
        outs = _load_many([it.output for it in chunk], load_image, s.workers)
        refs = _load_many([it.ref for it in chunk], load_image, s.workers)
        masks = _load_many([it.mask for it in chunk], load_label_map, s.workers)
        problems, rows = [], {}
        for i, it in enumerate(chunk):
            if isinstance(outs[i], Exception):
                problems.append(self._problem(method, it, it.output, f"skipped: {outs[i]}"))
                continue
            rows[i] = {"method": method.name, "image": it.stem}
            size = tuple(outs[i].shape[-2:])
            if isinstance(refs[i], Exception):
                problems.append(self._problem(method, it, it.ref, f"no full-reference metrics: {refs[i]}"))
                refs[i] = None
            elif refs[i] is not None and tuple(refs[i].shape[-2:]) != size:
                problems.append(self._problem(method, it, it.ref, f"no full-reference metrics: the reference is "
                                              f"{_hw(refs[i])}, the output {_hw(outs[i])}"))
                refs[i] = None
            if isinstance(masks[i], Exception):
                problems.append(self._problem(method, it, it.mask, f"no mask metrics: {masks[i]}"))
                masks[i] = None
            elif masks[i] is not None and tuple(masks[i].shape) != size:
                problems.append(self._problem(method, it, it.mask, f"no mask metrics: the mask is "
                                              f"{_hw(masks[i])}, the output {_hw(outs[i])}"))
                masks[i] = None
        ok = sorted(rows)
        conf_sum = None
        for group in _by_size(ok, outs):
            x = torch.stack([outs[i] for i in group]).to(dev)
            if min(x.shape[-2:]) >= metrics.underwater.BLOCK:
                u, c = metrics.uiqm_terms(x, s.uiqm_convention), metrics.uciqe_terms(x, s.uciqe_convention)
                self._put(rows, group, {"uiqm": u.uiqm, "uicm": u.uicm, "uism": u.uism, "uiconm": u.uiconm,
                                        "uciqe": c.uciqe, "uciqe_chroma_std": c.chroma_std,
                                        "uciqe_contrast": c.luminance_contrast,
                                        "uciqe_saturation": c.saturation_mean})
            else:
                for i in group:
                    problems.append(self._problem(method, chunk[i], chunk[i].output,
                                                  f"no UIQM/UCIQE: {_hw(outs[i])} is smaller than 10x10"))
            with_ref = [i for i in group if refs[i] is not None]
            if with_ref:
                self._full_reference(method, chunk, rows, problems, with_ref, outs, refs, masks)
            if s.segmenter is not None:
                with_mask = [i for i in group if masks[i] is not None]
                if with_mask:
                    conf = self._segmentation(rows, with_mask, x[[group.index(i) for i in with_mask]], masks)
                    conf_sum = conf if conf_sum is None else conf_sum + conf
        return [rows[i] for i in ok], problems, conf_sum

    @staticmethod
    def _put(rows, indices, values: dict) -> None:
        for name, v in values.items():
            for i, value in zip(indices, v.tolist()):
                rows[i][name] = value

    def _full_reference(self, method, chunk, rows, problems, idx, outs, refs, masks):
        dev = self.s.device
        # float64: the table's values are those of the files, not of a float32 rounding of them.
        x = torch.stack([outs[i] for i in idx]).to(dev, torch.float64)
        y = torch.stack([refs[i] for i in idx]).to(dev, torch.float64)
        self._put(rows, idx, {"psnr": metrics.psnr(x, y)})
        if min(x.shape[-2:]) >= 11:
            self._put(rows, idx, {"ssim": metrics.ssim(x, y)})
        else:
            for i in idx:
                problems.append(self._problem(method, chunk[i], chunk[i].output,
                                              f"no SSIM: {_hw(outs[i])} is smaller than its 11x11 window"))
        if self.s.lpips is not None:
            if min(x.shape[-2:]) >= self.s.lpips.min_side:
                self._put(rows, idx, {"lpips": self.s.lpips(x, y)})
            else:
                side = self.s.lpips.min_side
                for i in idx:
                    problems.append(self._problem(method, chunk[i], chunk[i].output, f"no LPIPS: {_hw(outs[i])} is "
                                                  f"smaller than its backbone's {side}x{side}"))
        fg_idx = [k for k, i in enumerate(idx) if masks[i] is not None]
        if fg_idx:
            sel = [idx[k] for k in fg_idx]
            fg = torch.stack([(masks[i] > 0) for i in sel]).unsqueeze(1).to(dev, torch.float32)
            xs, ys = x[fg_idx], y[fg_idx]
            self._put(rows, sel, {"psnr_fg": metrics.masked_psnr(xs, ys, fg)})
            if min(x.shape[-2:]) >= 11:
                self._put(rows, sel, {"ssim_fg": metrics.masked_ssim(xs, ys, fg)})

    def _segmentation(self, rows, idx, images, masks) -> torch.Tensor:
        K = self.s.num_classes
        pred = self.s.segmenter.labels(images).cpu()
        target = torch.stack([binary_labels(masks[i], K) for i in idx])
        conf = metrics.confusion_matrix(pred, target, K)
        iou = metrics.iou_per_class(conf)
        self._put(rows, idx, {"miou": metrics.mean_iou(conf), **{f"iou_{c}": iou[:, c] for c in range(K)}})
        return conf.sum(0)


def _hw(t: torch.Tensor) -> str:
    return f"{t.shape[-1]}x{t.shape[-2]}"


# ------------------------------------------------------------------------------------------------ summaries
# Why a metric can be non-finite, by metric and value ("+inf" or "nan"); iou_<c> by IOU_NAN.
NONFINITE_REASONS = {
    ("psnr", "+inf"): "the output equals its reference",
    ("psnr_fg", "+inf"): "the output equals its reference inside the mask",
    ("psnr_fg", "nan"): "the mask is empty",
    ("ssim_fg", "nan"): "the mask is empty",
    ("miou", "nan"): "no label of the label map is a class",
}
IOU_NAN = "the class is in neither the prediction nor the label map"


def _kind(v: float) -> str:
    return "nan" if math.isnan(v) else ("+inf" if v > 0 else "-inf")


def nonfinite_note(col: str, left_out: list[tuple[str, float]]) -> str:
    """What summary.json and summary.md say of the values of a metric left out of its mean: how many, which
    images, and why, e.g. "1 left out of the mean and std: +inf for a (the output equals its reference)"."""
    by_kind: dict[str, list[str]] = defaultdict(list)
    for image, v in left_out:
        by_kind[_kind(v)].append(image)
    parts = []
    for kind, images in by_kind.items():
        why = IOU_NAN if col.startswith("iou_") and kind == "nan" else NONFINITE_REASONS.get((col, kind))
        shown = ", ".join(images[:10]) + (f" and {len(images) - 10} more" if len(images) > 10 else "")
        parts.append(f"{kind} for {shown}" + (f" ({why})" if why else ""))
    return f"{len(left_out)} left out of the mean and std: " + "; ".join(parts)


def summarise(rows: list[dict], columns: list[str]) -> dict:
    """Per metric: mean and std (population, ddof 0) over the finite values (None without any), their count,
    how many were not finite (PSNR of an identical image is +inf; a foreground metric of an empty mask is NaN)
    and, when some were, a note saying which images and why."""
    out = {}
    for col in columns:
        values = [(r["image"], r[col]) for r in rows if r.get(col) is not None]
        finite = [v for _, v in values if math.isfinite(v)]
        mean = sum(finite) / len(finite) if finite else None
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite)) if finite else None
        out[col] = {"mean": mean, "std": std, "count": len(finite), "nonfinite": len(values) - len(finite)}
        left_out = [(i, v) for i, v in values if not math.isfinite(v)]
        if left_out:
            kinds = [_kind(v) for _, v in left_out]
            out[col]["nonfinite_by_kind"] = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
            out[col]["nonfinite_note"] = nonfinite_note(col, left_out)
    return out


def method_summary(method: Method, rows: list[dict], columns: list[str], pooled: torch.Tensor | None) -> dict:
    """summary.json's entry of a method: counts, per-metric statistics, unmatched files and, with a segmenter,
    the IoU of the confusion matrix pooled over its images."""
    entry = {"folder": str(method.folder), "images": len(method.items), "scored": len(rows),
             "metrics": summarise(rows, columns), "no_reference": method.no_reference, "missing": method.missing,
             "no_mask": method.no_mask}
    if pooled is not None:
        entry["iou_pooled"] = [None if math.isnan(v) else v for v in metrics.iou_per_class(pooled).tolist()]
        entry["miou_pooled"] = None if pooled.sum() == 0 else float(metrics.mean_iou(pooled))
    return entry


def _cell(stats: dict | None, digits: int) -> str:
    if not stats or stats["count"] == 0:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


DIGITS = {"psnr": 2, "psnr_fg": 2, "ssim": 4, "ssim_fg": 4, "lpips": 4, "miou": 4, "uiqm": 4, "uciqe": 4}


def _table_columns(summary: dict) -> list[tuple[str, str]]:
    return [(k, title) for k, title in TABLE if any(k in m["metrics"] for m in summary["methods"].values())]


def markdown_table(summary: dict) -> str:
    """summary.md's table: a row per method, mean ± std of each metric (the columns some method has)."""
    methods = summary["methods"]
    cols = _table_columns(summary)
    pooled = any(m.get("miou_pooled") is not None for m in methods.values())
    head = ["method", "images"] + [t for _, t in cols] + (["mIoU (pooled)"] if pooled else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        cells = [name, str(m["scored"])] + [_cell(m["metrics"].get(k), DIGITS[k]) for k, _ in cols]
        if pooled:
            cells.append("-" if m.get("miou_pooled") is None else f"{m['miou_pooled']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _count_cell(stats: dict | None) -> str:
    """n, and the values left out by kind: "2 (+1 inf)"."""
    if not stats:
        return "-"
    left = ", ".join(f"+{n} {kind.lstrip('+')}" for kind, n in stats.get("nonfinite_by_kind", {}).items())
    return f"{stats['count']}" + (f" ({left})" if left else "")


def counts_table(summary: dict) -> str:
    """summary.md's second table: per method and metric the number of images averaged (n: the finite values),
    with the values left out in brackets."""
    cols = _table_columns(summary)
    head = ["method", "images"] + [t for _, t in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in summary["methods"].items():
        lines.append("| " + " | ".join([name, str(m["scored"])] + [_count_cell(m["metrics"].get(k))
                                                                    for k, _ in cols]) + " |")
    return "\n".join(lines)


def write_reports(out, rows: list[dict], columns: list[str], summary: dict) -> list[str]:
    """metrics.csv (a row per method and image, full precision, empty where a metric does not apply),
    summary.json and summary.md into `out`; returns the file names."""
    import csv
    import io
    import json

    from ssattn.guidance.cache import atomic_write_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "image", *columns])
    for r in rows:
        writer.writerow([r["method"], r["image"], *("" if r.get(c) is None else repr(float(r[c])) for c in columns)])
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
    atomic_write_bytes(out / "summary.md",
                       (summary_markdown(summary) + "\n" + conventions_line(summary) + "\n").encode())
    return ["metrics.csv", "summary.json", "summary.md"]


def summary_markdown(summary: dict) -> str:
    lines = ["# Image metrics", "", markdown_table(summary), "",
             "Mean ± standard deviation over the images (population std, non-finite values left out: see the "
             "counts below); definitions: docs/metrics.md."]
    if any(m.get("miou_pooled") is not None for m in summary["methods"].values()):
        lines.append("mIoU (pooled): from one confusion matrix over all images of the method.")
    lines += ["", "## Images per metric", "",
              "n: the images each mean and std are over (their finite values); in brackets, the values left out "
              "(inf: PSNR of an image equal to its reference; nan: e.g. an empty mask).", "", counts_table(summary)]
    notes = []
    titles = dict(TABLE)
    for name, m in summary["methods"].items():
        for key, title in titles.items():
            note = (m["metrics"].get(key) or {}).get("nonfinite_note")
            if note:
                notes.append(f"- {name}, {title}: {note}")
        for key, what in (("no_reference", "without a reference"), ("missing", "references without an output"),
                          ("no_mask", "without a mask")):
            if m.get(key):
                notes.append(f"- {name}: {len(m[key])} {what}: {', '.join(m[key][:10])}"
                             f"{' ...' if len(m[key]) > 10 else ''}")
    if summary["problems"]:
        notes.append(f"- {len(summary['problems'])} problem(s), each in summary.json: "
                     + "; ".join(f"{p['file']}: {p['problem']}" for p in summary["problems"][:5])
                     + (" ..." if len(summary["problems"]) > 5 else ""))
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"
