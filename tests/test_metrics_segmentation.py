"""Confusion matrices, per-class IoU and mIoU (ssattn.metrics.segmentation): hand cases and a brute-force count."""

import math

import pytest
import torch

from ssattn.metrics import confusion_matrix, iou_per_class, mean_iou, miou


def test_hand_case():
    target = torch.tensor([[0, 0, 1, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 2, 0]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[[1, 1, 0], [0, 2, 0], [1, 0, 1]]]
    # class 0: tp 1, union 1 + 2 + 1 - 1 = 3; class 1: 2 / 3; class 2: 1 / 2
    torch.testing.assert_close(iou_per_class(conf), torch.tensor([[1 / 3, 2 / 3, 1 / 2]], dtype=torch.float64))
    assert math.isclose(float(mean_iou(conf)), (1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_absent_classes_and_ignored_target_labels():
    target = torch.tensor([[0, 0, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[[1, 1, 0], [0, 1, 0], [0, 0, 0]]]   # the 255 pixel is not counted
    iou = iou_per_class(conf)[0]
    assert iou[0] == 0.5 and iou[1] == 0.5 and math.isnan(iou[2])   # class 2 absent from both
    assert math.isclose(float(mean_iou(conf)), 0.5)
    assert math.isnan(float(mean_iou(torch.zeros(3, 3, dtype=torch.int64))))
    with pytest.raises(ValueError, match=r"pred has labels outside 0..2"):
        confusion_matrix(torch.tensor([[0, 7, 1, 1]]), target, 3)


def test_against_a_brute_force_count():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (3, 9, 11), generator=g)
    target = torch.randint(0, 4, (3, 9, 11), generator=g)
    conf = confusion_matrix(pred, target, 4)
    for b in range(3):
        for t in range(4):
            for p in range(4):
                assert conf[b, t, p] == int(((target[b] == t) & (pred[b] == p)).sum())
    # miou pools every image's pixels (one matrix), as the old demo metric did
    ious = []
    for c in range(4):
        inter, union = int(((pred == c) & (target == c)).sum()), int(((pred == c) | (target == c)).sum())
        ious.append(inter / union)
    assert math.isclose(miou(pred, target, 4), sum(ious) / 4)


def test_bad_inputs():
    labels = torch.zeros(2, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="integer label maps"):
        confusion_matrix(labels.float(), labels, 2)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(labels, labels[:1], 2)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(labels, labels, 0)
