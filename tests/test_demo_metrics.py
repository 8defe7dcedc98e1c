"""The demo's metrics: foreground PSNR / SSIM, mIoU, guidance AUC and best IoU, on hand-checked cases."""

import math

import numpy as np
import pytest
import torch

from ssattn.apps.training.guidance_quality import best_iou, guidance_quality, roc_auc
from ssattn.metrics import masked_psnr, masked_ssim, miou, psnr, ssim


def _mask(b, h, w, box):
    m = torch.zeros(b, 1, h, w)
    m[..., box[0]:box[1], box[2]:box[3]] = 1
    return m


def test_masked_psnr_hand_case_and_perfect_output():
    ref = torch.rand(2, 3, 16, 16)
    mask = _mask(2, 16, 16, (4, 10, 3, 12))
    out = ref.clone()
    out[mask.expand_as(out) > 0] += 0.1            # error 0.1 everywhere inside: MSE 0.01 -> 20 dB
    out[mask.expand_as(out) == 0] = 0.5            # anything outside the mask does not count
    torch.testing.assert_close(masked_psnr(out, ref, mask), torch.full((2,), 20.0), atol=1e-4, rtol=0)
    assert torch.isinf(masked_psnr(ref, ref, mask)).all()
    # A full mask is the whole-image PSNR; an empty one has no foreground.
    full = torch.ones(2, 1, 16, 16)
    torch.testing.assert_close(masked_psnr(out, ref, full), psnr(out, ref))
    assert torch.isnan(masked_psnr(out, ref, torch.zeros(2, 1, 16, 16))).all()
    with pytest.raises(ValueError, match="mask"):
        masked_psnr(out, ref, torch.ones(2, 3, 16, 16))


def test_masked_ssim_matches_ssim_on_a_full_mask_and_is_local():
    ref, out = torch.rand(2, 3, 24, 24), torch.rand(2, 3, 24, 24)
    torch.testing.assert_close(masked_ssim(out, ref, torch.ones(2, 1, 24, 24)), ssim(out, ref))
    torch.testing.assert_close(masked_ssim(ref, ref, _mask(2, 24, 24, (6, 18, 6, 18))), torch.ones(2))
    # Damage far from the mask (more than a window radius away) leaves the foreground SSIM at 1.
    damaged = ref.clone()
    damaged[..., :, 20:] = 0
    mask = _mask(2, 24, 24, (8, 12, 6, 9))
    torch.testing.assert_close(masked_ssim(damaged, ref, mask), torch.ones(2))
    assert (ssim(damaged, ref) < 0.99).all()


def test_miou_hand_case_and_perfect_prediction():
    target = torch.tensor([[1, 0, 0, 0]])
    pred = torch.tensor([[1, 1, 0, 0]])
    assert math.isclose(miou(pred, target), (1 / 2 + 2 / 3) / 2)  # object 1/2, background 2/3
    labels = (torch.rand(3, 8, 8) > 0.7).long()
    assert miou(labels, labels) == 1.0
    assert miou(1 - labels, labels) == 0.0
    with pytest.raises(ValueError, match="integer"):
        miou(labels.float(), labels)


class _Fixed(torch.nn.Module):
    """A "segmenter" that predicts the given label maps (one-hot logits), whatever the images."""

    def __init__(self, labels, num_classes):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float())

    def forward(self, x):
        return self.logits[: x.shape[0]]


def test_segmenter_per_class_iou_on_hand_made_label_maps():
    from ssattn.apps.training.segmentation import segmentation_scores

    # Two 2x4 images, classes 0..3, counted over all pixels of both images (dataset-level IoU).
    target = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 1]],
                           [[0, 0, 0, 0], [3, 3, 0, 0]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 1]],
                         [[0, 0, 0, 2], [3, 0, 0, 0]]])
    images = torch.zeros(2, 3, 2, 4)
    # class 0: 7 pixels in both of 11 in either (9 true, 9 predicted); 1: 3 of 4; 2: 1 of 3; 3: 1 of 2
    scores = segmentation_scores(_Fixed(pred, 4), images, target, 4)
    assert scores["iou"] == pytest.approx([7 / 11, 3 / 4, 1 / 3, 1 / 2])
    assert scores["miou"] == pytest.approx((7 / 11 + 3 / 4 + 1 / 3 + 1 / 2) / 4)
    assert scores["miou"] == pytest.approx(miou(pred, target, 4))
    # A class in neither map is NaN and left out of the mean; a class predicted where it is absent scores 0.
    five = segmentation_scores(_Fixed(pred, 5), images, target, 5)
    assert math.isnan(five["iou"][4]) and five["miou"] == pytest.approx(scores["miou"])
    wrong = segmentation_scores(_Fixed(torch.full((1, 2, 2), 4), 5), torch.zeros(1, 3, 2, 2),
                                torch.zeros(1, 2, 2, dtype=torch.long), 5)
    assert wrong["iou"] == pytest.approx([0.0, math.nan, math.nan, math.nan, 0.0], nan_ok=True)


def test_segmenter_stops_when_validation_stops_rising_and_keeps_the_best():
    from ssattn.apps.training import segmentation as seg

    # Scenes whose class is the colour of a square: learnable in a few hundred steps at 16 px.
    g = torch.Generator().manual_seed(0)
    n, size = 24, 16
    labels = torch.zeros(n, size, size, dtype=torch.long)
    images = torch.rand(n, 3, size, size, generator=g) * 0.2
    for i in range(n):
        c = 1 + i % 2
        y, x = (int(v) for v in torch.randint(0, 8, (2,), generator=g))
        labels[i, y:y + 6, x:x + 6] = c
        images[i, c - 1, y:y + 6, x:x + 6] += 0.8
    net, fit = seg.train_segmenter(images[:16], labels[:16], num_classes=3, val=(images[16:], labels[16:]),
                                   max_steps=2000, eval_every=20, patience=3, batch_size=8, width=4, seed=0)
    assert fit.stopped_early and fit.steps_run < 2000
    steps, scores = zip(*fit.val_miou)
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))  # the first evaluation with the top score
    assert fit.best_step == steps[best] and fit.best_miou == scores[best]
    assert all(s <= fit.best_miou for s in scores[best + 1:]) and len(scores) - 1 - best == 3  # patience 3
    # The kept weights are those of the best evaluation: they score its mIoU again.
    assert seg.segmentation_scores(net, images[16:], labels[16:], 3)["miou"] == pytest.approx(fit.best_miou)
    assert fit.best_miou > 0.6 and not net.training


def _auc_brute(s, y):
    pos, neg = s[y], s[~y]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_roc_auc_against_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.integers(0, 6, 200).astype(float)  # many ties
        y = rng.random(200) < 0.3
        assert math.isclose(roc_auc(s, y), _auc_brute(s, y), abs_tol=1e-12)
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0 and roc_auc([1, 1, 0, 0], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.3] * 4, [0, 1, 0, 1]) == 0.5
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_shuffled_masks_give_auc_about_half():
    from ssattn.apps.data.scenes import UnderwaterScenes

    ds = UnderwaterScenes(size=32, n=12, seed=0)
    _, _, guide = ds.tensors()
    masks = ds.masks()
    true = guidance_quality(guide, masks)["auc"]
    shuffled = guidance_quality(guide, masks.roll(1, dims=0))["auc"]  # each map against another scene's mask
    assert abs(shuffled - 0.5) < 0.1 < true - 0.5
    # Pixel labels drawn independently of the scores: AUC 0.5 up to sampling noise.
    s = torch.rand(1, 1, 100, 100)
    y = (torch.rand(1, 1, 100, 100) < 0.2).float()
    assert abs(guidance_quality(s, y)["auc"] - 0.5) < 0.02


def test_best_iou_against_every_threshold():
    rng = np.random.default_rng(1)
    for _ in range(5):
        s = rng.integers(0, 8, 60).astype(float)
        y = rng.random(60) < 0.4
        brute = max(((s >= t) & y).sum() / ((s >= t) | y).sum() for t in np.unique(s))
        iou, t = best_iou(s, y)
        assert math.isclose(iou, brute) and math.isclose(((s >= t) & y).sum() / ((s >= t) | y).sum(), brute)
    assert best_iou([0, 0.2, 0.9, 1.0], [0, 0, 1, 1]) == (1.0, 0.9)
