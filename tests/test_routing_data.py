"""The randomised degradation generator the embedded classifier is fitted and tested on (routing_data)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")

from ssattn.apps.data import routing_data as rd  # noqa: E402
from ssattn.routing.classes import PAPER_CLASSES  # noqa: E402

SWEPT = ("blur", "noise", "quality", "alpha", "refl_blur", "ghost_shift", "ghost_weight", "length", "angle",
         "soft", "clean_quality")


def _overlap(a, b) -> bool:
    return any(max(a0, b0) < min(a1, b1) for a0, a1 in a for b0, b1 in b)


def test_photographs_are_split_and_the_motion_blurred_clock_is_no_content():
    assert not set(rd.TRAIN_PHOTOS) & set(rd.TEST_PHOTOS)
    assert sorted(sum(rd.FOLDS, ())) == sorted(rd.TRAIN_PHOTOS)
    assert "clock" not in rd.TRAIN_PHOTOS + rd.TEST_PHOTOS


@pytest.mark.parametrize("name", SWEPT)
def test_outside_ranges_do_not_overlap_the_training_ranges(name):
    assert not _overlap(getattr(rd.TRAIN, name), getattr(rd.OUTSIDE, name)), name


def test_draw_stays_in_its_intervals():
    rng = np.random.default_rng(0)
    iv = ((0.0, 1.0), (5.0, 6.0))
    xs = [rd.draw(rng, iv) for _ in range(400)]
    assert all(0 <= x <= 1 or 5 <= x <= 6 for x in xs)
    assert 0.3 < np.mean([x >= 5 for x in xs]) < 0.7  # equal lengths, equal shares


def test_items_are_deterministic_and_held_out_sets_use_only_held_out_photographs():
    a, pa = rd.item(3, 5, "reflection", rd.TEST_PHOTOS, rd.TRAIN, 0.0)
    b, pb = rd.item(3, 5, "reflection", rd.TEST_PHOTOS, rd.TRAIN, 0.0)
    assert torch.equal(a, b) and pa == pb
    images, y, params = rd.heldout_set(16, 11, rd.OUTSIDE)
    assert y.tolist() == [0, 1, 2, 3] * 4
    assert {p["content"] for p in params} <= set(rd.TEST_PHOTOS)
    for x in images:
        assert x.dim() == 3 and x.shape[0] == 3 and 0 <= x.min() and x.max() <= 1 and min(x.shape[-2:]) >= 32
        assert torch.equal(x, (x * 255).round() / 255)  # 8-bit, as a saved image
    for p, k in zip(params, y.tolist()):
        kind = PAPER_CLASSES[k]
        if kind == "motion_blur":
            assert any(lo <= p["angle"] <= hi for lo, hi in rd.UNSEEN_ANGLES)
            assert not any(lo <= p["length"] <= hi for lo, hi in rd.TRAIN.length)
        if kind == "reflection":
            assert not any(lo <= p["alpha"] <= hi for lo, hi in rd.TRAIN.alpha)


def test_training_set_draws_each_group_from_one_part_of_the_photographs():
    images, y, params, folds = rd.training_set(12, 4)
    assert folds.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for p, f in zip(params, folds.tolist()):
        assert p["content"] in rd.FOLDS[f] + ("procedural",)


def test_reflections_can_be_seen():
    # visible, or as strong as the ranges allow (a dull reflected image over a contrasty scene)
    for ranges in (rd.TRAIN, rd.OUTSIDE):
        _, y, params = rd.heldout_set(24, 5, ranges)
        top = max(hi for _, hi in ranges.alpha)
        for p in (p for p, k in zip(params, y.tolist()) if k == 1):
            assert p["visibility"] >= rd.VISIBLE - 1e-3 or p["alpha"] == top, p
            assert any(lo <= p["alpha"] <= hi for lo, hi in ranges.alpha), p


@pytest.mark.parametrize("style", ["line", "box", "shake"])
def test_motion_kernels_are_normalised_and_as_long_as_asked(style):
    k = rd.motion_kernel(np.random.default_rng(0), 15.0, math.radians(30), style)
    assert torch.isclose(k.sum(), torch.tensor(1.0)) and (k >= 0).all()
    ys, xs = torch.nonzero(k > 0.2 * k.max(), as_tuple=True)
    extent = math.hypot(float(xs.max() - xs.min()), float(ys.max() - ys.min()))
    assert 9 <= extent <= 19, extent


def test_noise_blur_jpeg_outside_is_never_weaker_than_training_in_all_three():
    rng = np.random.default_rng(1)
    x = torch.full((3, 64, 64), 0.5)
    for _ in range(40):
        _, p = rd.noise_blur_jpeg(rng, x, rd.OUTSIDE)
        assert not (p["noise"] < 0.01 and p["quality"] > 70 and p["blur"] < 0.6), p
    small = dataclasses.replace(rd.OUTSIDE, side=((32, 40),))
    assert all(32 <= rd.side_of(rng, small.side) <= 40 for _ in range(20))
