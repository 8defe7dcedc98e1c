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
