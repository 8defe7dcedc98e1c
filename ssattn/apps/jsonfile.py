"""The JSON files the applications write (run.json, results.json, history.json, eval's --json): strict JSON.

Python's json module writes Infinity and NaN, which strict parsers (JavaScript, jq, most languages'
standard readers) reject. Here every non-finite number becomes null, and a key `<name>_note` next to it
says what the value was and, where the writer knows, why (e.g. the PSNR of an image with itself).
"""

from __future__ import annotations

import json
import math
import os


# Why a metric the commands write can be non-finite (the notes' reasons, by key).
METRIC_NOTES = {
    "psnr": "PSNR is unbounded where the images equal their references",
    "input_psnr": "PSNR is unbounded where the images equal their references",
    "psnr_fg": "PSNR is unbounded where the images equal their references inside the masks; NaN: no mask pixels",
    "ssim_fg": "NaN: no mask pixels",
    "step_time_s": "NaN: no step ran in this call",
    "images_per_s": "NaN: no step ran in this call",
}


def _word(x: float) -> str:
    return "NaN" if math.isnan(x) else ("+Infinity" if x > 0 else "-Infinity")


def _finite(x) -> bool:
    return not isinstance(x, float) or math.isfinite(x)


def strict(obj, reasons: dict | None = None):
    """A copy of `obj` that json.dumps(..., allow_nan=False) accepts (see the module docstring).

    reasons: {key: why its value can be non-finite}, used in the notes of that key wherever it occurs.
    """
    reasons = reasons or {}
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            why = f": {reasons[key]}" if key in reasons else ""
            if not _finite(value):
                out[key], out[f"{key}_note"] = None, f"{_word(value)}, written as null{why}"
            elif isinstance(value, (list, tuple)) and not all(map(_finite, value)):
                bad = {i: _word(v) for i, v in enumerate(value) if not _finite(v)}
                out[key] = [None if i in bad else strict(v, reasons) for i, v in enumerate(value)]
                out[f"{key}_note"] = ", ".join(f"[{i}] {w}" for i, w in bad.items()) + f", written as null{why}"
            else:
                out[key] = strict(value, reasons)
        return out
    if isinstance(obj, (list, tuple)):
        return [None if not _finite(v) else strict(v, reasons) for v in obj]
    if not _finite(obj):
        return None
    return obj


def dumps(obj, reasons: dict | None = None, **kwargs) -> str:
    return json.dumps(strict(obj, reasons), allow_nan=False, **kwargs)


def write_json(path, obj, reasons: dict | None = None, indent: int | None = 2) -> None:
    """Write `obj` to `path` as strict JSON (non-finite numbers as null with a note)."""
    with open(os.fspath(path), "w") as f:
        f.write(dumps(obj, reasons, indent=indent))
        f.write("\n")
