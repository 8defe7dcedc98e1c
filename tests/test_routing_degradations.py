"""The degradation generator: each kind does what its model says, deterministically, and bad input is named."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")

from ssattn.apps.data.degradations import (KINDS, TEST_SOURCES, TRAIN_SOURCES, DegradationSet, apply,  # noqa: E402
                                           clean_crop, line_kernel)
from ssattn.routing.features import FEATURES, features  # noqa: E402


@pytest.fixture(scope="module")
def clean():
    return clean_crop(np.random.default_rng(3), 96)


def _feat(x, name):
    return float(features(x[None])[0, FEATURES.index(name)])


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_deterministic_in_range_and_seeded(clean, kind):
    a, pa = apply(clean, kind, 3, seed=5)
    b, pb = apply(clean, kind, 3, seed=5)
    assert torch.equal(a, b) and pa == pb
    assert a.shape == clean.shape and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    if kind == "none":
        assert torch.equal(a, clean)
    else:
        assert (a - clean).abs().mean() > 1e-3
        c, _ = apply(clean, kind, 3, seed=6)
        assert not torch.equal(a, c)  # the seed draws the parameters


def test_noise_blur_jpeg_adds_noise_and_blocks_and_grows_with_severity(clean):
    mild, p1 = apply(clean, "noise_blur_jpeg", 1, seed=0)
    strong, p5 = apply(clean, "noise_blur_jpeg", 5, seed=0)
    assert p1["blur_sigma"] < p5["blur_sigma"] and p1["noise"] < p5["noise"] and p1["quality"] > p5["quality"]
    flat, p = apply(torch.full((3, 64, 64), 0.5), "noise_blur_jpeg", 1, seed=0)
    assert 0.1 * p["noise"] < float(flat.std()) < p["noise"]  # JPEG keeps part of the noise of a flat image
    assert _feat(strong, "block_x") > _feat(clean, "block_x") + 0.2 and _feat(strong, "block_y") > _feat(clean, "block_y") + 0.2
    assert (strong - clean).abs().mean() > (mild - clean).abs().mean()


def test_reflection_adds_an_attenuated_second_image(clean):
    black = torch.zeros_like(clean)
    out, p = apply(clean, "reflection", 4, seed=1, second=black)
    torch.testing.assert_close(out, (1 - p["alpha"]) * clean)  # nothing reflected: only the attenuation
    white = torch.ones_like(clean)
    out, p = apply(clean, "reflection", 4, seed=1, second=white)
    torch.testing.assert_close(out, ((1 - p["alpha"]) * clean + p["alpha"]).clamp(0, 1))
    assert 0.2 <= apply(clean, "reflection", 1, seed=1)[1]["alpha"] < apply(clean, "reflection", 5, seed=1)[1]["alpha"]
    with pytest.raises(ValueError, match="second must have"):
        apply(clean, "reflection", 1, second=torch.zeros(3, 5, 5))


@pytest.mark.parametrize("length,angle", [(9.0, 0.0), (13.0, math.pi / 4), (7.5, 2.0)])
def test_line_kernel_is_a_segment_of_that_length_and_angle(length, angle):
    k = line_kernel(length, angle)
    assert torch.isclose(k.sum(), torch.tensor(1.0)) and (k >= 0).all()
    r = k.shape[0] // 2
    ys, xs = torch.meshgrid(torch.arange(k.shape[0]) - r, torch.arange(k.shape[1]) - r, indexing="ij")
    x, y = xs.float(), -ys.float()  # y up, as the angle is measured
    cxx, cyy, cxy = (k * x * x).sum(), (k * y * y).sum(), (k * x * y).sum()
    found = 0.5 * math.atan2(2 * cxy, cxx - cyy)
    assert abs(math.remainder(found - angle, math.pi)) < 0.05
    # a uniform segment of length L has variance L^2 / 12 along it
    assert abs(math.sqrt(12 * float(cxx + cyy)) - length) < 1.0


def test_motion_blur_of_a_dot_is_its_kernel():
    dot = torch.zeros(3, 41, 41)
    dot[:, 20, 20] = 1.0
    out, p = apply(dot, "motion_blur", 3, seed=2)
    k = line_kernel(p["length"], p["angle"])
    r = k.shape[0] // 2
    torch.testing.assert_close(out[0, 20 - r:21 + r, 20 - r:21 + r], k)


def test_underwater_casts_blue_green_and_low_light_darkens(clean):
    mild, _ = apply(clean, "underwater", 1, seed=0)
    strong, _ = apply(clean, "underwater", 5, seed=0)
    red_drop = lambda x: float(x[0].mean() - (x[1].mean() + x[2].mean()) / 2)  # noqa: E731
    assert red_drop(strong) < red_drop(mild) < red_drop(clean)
    dark = [apply(clean, "low_light", s, seed=0)[0].mean() for s in (1, 3, 5)]
    assert clean.mean() > dark[0] > dark[1] > dark[2]


def test_bad_arguments_are_named(clean):
    with pytest.raises(ValueError, match="kind must be one of"):
        apply(clean, "fog")
    for s in (0, 6, 2.5):
        with pytest.raises(ValueError, match="severity must be an integer 1-5"):
            apply(clean, "none", s)
    with pytest.raises(ValueError, match="clean must be an image tensor"):
        apply(clean[0], "none")
    with pytest.raises(ValueError, match="kinds must be"):
        DegradationSet(kinds=("fog",))
    with pytest.raises(ValueError, match="split must be"):
        DegradationSet(split="val")


def test_dataset_cycles_kinds_and_severities_and_splits_photographs():
    ds = DegradationSet(n=10, size=32, seed=4, kinds=("none", "motion_blur"))
    x, y, s = ds.tensors()
    assert x.shape == (10, 3, 32, 32) and y.tolist() == [0, 1] * 5 and s.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    again, _, _ = DegradationSet(n=10, size=32, seed=4, kinds=("none", "motion_blur")).tensors()
    assert torch.equal(x, again)
    other, _, _ = DegradationSet(n=10, size=32, seed=5, kinds=("none", "motion_blur")).tensors()
    assert not torch.equal(x, other)
    assert not set(TRAIN_SOURCES) & set(TEST_SOURCES)
