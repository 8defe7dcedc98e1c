"""ssattn.apps.data.synthetic: the underwater image formation model and the dataset."""

import numpy as np
import pytest
import torch

from ssattn.apps.data import synthetic
from ssattn.apps.data.synthetic import SyntheticUnderwater, degrade
from ssattn.guidance import embedded_guidance


def test_items_are_deterministic_and_seeded():
    a = SyntheticUnderwater(size=32, n=3, seed=5)
    b = SyntheticUnderwater(size=32, n=3, seed=5)
    c = SyntheticUnderwater(size=32, n=3, seed=6)
    for i in range(3):
        for ta, tb in zip(a[i], b[i]):
            assert torch.equal(ta, tb)
    assert not torch.equal(a[0][0], c[0][0])
    # Reading one item alone gives the same item as materialising the whole set.
    whole = SyntheticUnderwater(size=32, n=3, seed=5).tensors()
    assert torch.equal(whole[0][2], a[2][0])


def test_shapes_ranges_and_guidance():
    ds = SyntheticUnderwater(size=40, n=4, seed=0, split="test")
    deg, ref, guide = ds.tensors()
    assert deg.shape == ref.shape == (4, 3, 40, 40) and guide.shape == (4, 1, 40, 40)
    for t in (deg, ref, guide):
        assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
    expected = embedded_guidance(deg, backend="reference")[0]
    torch.testing.assert_close(guide, expected)
    assert guide.amax(dim=(1, 2, 3)).min() > 0  # every map marks something
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="split"):
        SyntheticUnderwater(split="val")


def test_physical_model_attenuates_red_first():
    # A white scene under water: red is absorbed most, blue least; backscatter is blue-green.
    rng = np.random.default_rng(0)
    deg, params = degrade(torch.ones(3, 48, 48), rng)
    r, g, b = deg.mean(dim=(1, 2)).tolist()
    assert r < g and r < b
    beta = params["beta"]
    assert beta[0] > beta[1] > beta[2]
    lo, hi = synthetic.RANGES["noise"]
    assert lo <= params["noise"] <= hi
    # Far rows (top) are closer to the veiling light than near rows (bottom) for the red channel.
    assert deg[0, :8].mean() < deg[0, -8:].mean()


def test_formation_model_without_blur_haze_noise():
    # With blur, haze and noise switched off the output is exactly J t + B (1 - t).
    clean = torch.rand(3, 16, 16)
    saved = dict(synthetic.RANGES)
    try:
        synthetic.RANGES.update(blur_per_m=(0.0, 0.0), haze=(1.0, 1.0), noise=(0.0, 0.0), depth_noise=(0.0, 0.0))
        deg, p = degrade(clean, np.random.default_rng(3))
    finally:
        synthetic.RANGES.update(saved)
    depth = torch.linspace(p["far"], p["near"], 16).view(1, 16, 1)
    t = torch.exp(-torch.tensor(p["beta"]).view(3, 1, 1) * depth)
    expected = clean * t + torch.tensor(p["backscatter"]).view(3, 1, 1) * (1 - t)
    torch.testing.assert_close(deg, expected.clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_train_and_test_crops_come_from_disjoint_regions():
    for split in ("train", "test"):
        ds = SyntheticUnderwater(size=32, n=6, seed=1, split=split)
        ds.materialize()
        for i in range(6):
            name, top, left, h, w = ds.params[i]["crop"]
            W = synthetic._photo(name).shape[-1]
            cut = int(round(W * (1 - synthetic.TEST_FRACTION)))
            if split == "train":
                assert left + w <= cut
            else:
                assert left >= cut
