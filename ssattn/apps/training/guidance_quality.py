"""How well a guidance map finds the objects: ROC-AUC and the IoU at the best threshold, against a mask.

Both are computed per image, exactly (no threshold grid): AUC as the
Mann-Whitney statistic with tied scores counted half, the best IoU over every
cut between distinct score values. An image whose mask is empty or full has
no AUC (NaN) and is left out of the means.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _flat(scores, mask) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores.detach().double().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).ravel()
    y = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask).ravel() > 0.5
    if s.shape != y.shape:
        raise ValueError(f"scores and mask must have the same number of pixels, got {s.size} and {y.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, y


def roc_auc(scores, mask) -> float:
    """P(score of a random object pixel > score of a random background pixel), ties counting 1/2."""
    s, y = _flat(scores, mask)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    rank_sum = mean_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def best_iou(scores, mask) -> tuple[float, float]:
    """Highest IoU of (scores >= t) with the mask over all thresholds t, and that t."""
    s, y = _flat(scores, mask)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan"), float("nan")
    values, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=y.astype(np.float64), minlength=values.size)[::-1]
    tot = np.bincount(inverse, minlength=values.size)[::-1].astype(np.float64)
    tp, k = np.cumsum(pos), np.cumsum(tot)  # predicting the top distinct values, highest first
    iou = tp / (n_pos + k - tp)
    i = int(np.argmax(iou))
    return float(iou[i]), float(values[::-1][i])


def guidance_quality(maps: Tensor, masks: Tensor) -> dict:
    """Per image and mean AUC and best-threshold IoU of maps (B, 1, H, W) against masks (B, 1, H, W)."""
    if maps.shape != masks.shape:
        raise ValueError(f"maps and masks must have the same shape, got {tuple(maps.shape)} and {tuple(masks.shape)}")
    aucs = [roc_auc(m, t) for m, t in zip(maps, masks)]
    ious = [best_iou(m, t)[0] for m, t in zip(maps, masks)]

    def mean(v):
        v = [x for x in v if not math.isnan(x)]
        return float(np.mean(v)) if v else float("nan")

    return {"auc": mean(aucs), "iou": mean(ious), "auc_per_image": aucs, "iou_per_image": ious}


__all__ = ["best_iou", "guidance_quality", "roc_auc"]
