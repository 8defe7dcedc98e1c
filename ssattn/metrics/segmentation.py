"""Segmentation scores of integer label maps: confusion matrices, per-class IoU and mean IoU.

A pixel whose target label is outside 0..K-1 (for example 255, the usual "ignore" label) is not counted.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_labels(pred: Tensor, target: Tensor, num_classes: int) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.shape != target.shape:
        raise ValueError("pred and target must be label tensors of the same shape, got "
                         f"{tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__} and "
                         f"{tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__}")
    if pred.is_floating_point() or target.is_floating_point() or pred.dtype == torch.bool:
        raise ValueError("pred and target must be integer label maps (threshold or argmax scores first)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Per-image confusion matrices (B, K, K) int64: [b, t, p] counts pixels of image b with target t and
    prediction p. pred, target: (B, ...) integer label maps. Pixels whose target is outside 0..K-1 are left out;
    predictions must be in 0..K-1."""
    _check_labels(pred, target, num_classes)
    K = num_classes
    B = pred.shape[0] if pred.dim() else 1  # a 0-d label map is one image of one pixel
    p, t = pred.reshape(B, -1).long(), target.reshape(B, -1).long()
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= K):
        raise ValueError(f"pred has labels outside 0..{K - 1} (min {int(p.min())}, max {int(p.max())}): "
                         f"num_classes is {K}")
    keep = (t >= 0) & (t < K)
    index = (torch.arange(B, device=p.device).view(B, 1) * K + t) * K + p
    return torch.bincount(index[keep], minlength=B * K * K).view(B, K, K)


def iou_per_class(confusion: Tensor) -> Tensor:
    """IoU per class (..., K) float64 from confusion matrices (..., K, K): |pred = c and target = c| /
    |pred = c or target = c|; NaN for a class absent from both."""
    conf = confusion.double()
    tp = conf.diagonal(dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(confusion: Tensor) -> Tensor:
    """Mean over the classes present (in prediction or target) of iou_per_class; NaN when none is."""
    return iou_per_class(confusion).nanmean(-1)


def miou(pred: Tensor, target: Tensor, num_classes: int = 2) -> float:
    """Mean IoU over all pixels of all images together (one confusion matrix for the whole batch).

    pred, target: integer label maps of the same shape. Classes absent from both are left out of the mean.
    """
    conf = confusion_matrix(pred, target, num_classes).sum(0)
    return float(mean_iou(conf))
