"""ssattn.apps.data.scenes: deterministic scenes whose masks mark exactly the drawn objects."""

import numpy as np
import pytest
import torch

from ssattn.apps.data import scenes
from ssattn.apps.data.scenes import CLASSES, UnderwaterScenes, render_scene


def test_scenes_are_deterministic_and_seeded():
    a = UnderwaterScenes(size=32, n=3, seed=4)
    b = UnderwaterScenes(size=32, n=3, seed=4)
    c = UnderwaterScenes(size=32, n=3, seed=5)
    for ta, tb in zip(a.tensors() + (a.masks(), a.labels()), b.tensors() + (b.masks(), b.labels())):
        assert torch.equal(ta, tb)
    assert not torch.equal(a.tensors()[1], c.tensors()[1])
    test = UnderwaterScenes(size=32, n=3, seed=4, split="test")
    assert not torch.equal(a.tensors()[1], test.tensors()[1])
    assert a.params[0]["objects"] == b.params[0]["objects"]


def test_shapes_ranges_and_oracle_guidance():
    ds = UnderwaterScenes(size=40, n=5, seed=1)
    deg, ref, guide = ds.tensors()
    mask, labels = ds.masks(), ds.labels()
    assert deg.shape == ref.shape == (5, 3, 40, 40) and guide.shape == mask.shape == (5, 1, 40, 40)
    assert labels.shape == (5, 40, 40) and labels.dtype == torch.int64
    for t in (deg, ref, guide):
        assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.flatten(1).sum(1).min() > 0  # every scene has objects
    assert torch.equal(mask[:, 0] > 0, labels > 0) and labels.max() < len(CLASSES)
    oracle = UnderwaterScenes(size=40, n=5, seed=1, guidance="oracle")
    assert torch.equal(oracle.tensors()[2], mask) and torch.equal(oracle.tensors()[0], deg)
    assert len(ds[2]) == 4 and torch.equal(ds[2][3], mask[2])
    with pytest.raises(IndexError):
        ds[5]
    for bad in ({"split": "val"}, {"guidance": "blip"}, {"size": 4}, {"n": 0}):
        with pytest.raises(ValueError, match=list(bad)[0]):
            UnderwaterScenes(**bad)


def test_mask_marks_the_pixels_objects_changed():
    # Render the same draws twice: with the objects, and (same rng stream) without painting them.
    scene = render_scene(np.random.default_rng(7), 48)
    saved = dict(scenes.DRAW)
    try:
        def nothing(draw):
            def f(rng, u, v, mean):
                shape, colour = draw(rng, u, v, mean)
                return torch.zeros_like(shape), colour
            return f
        scenes.DRAW.update({k: nothing(v) for k, v in saved.items()})
        empty = render_scene(np.random.default_rng(7), 48)
    finally:
        scenes.DRAW.update(saved)
    assert empty["mask"].sum() == 0 and scene["mask"].sum() > 0
    changed = (scene["clean"] - empty["clean"]).abs().amax(0) > 1e-6
    inside = scene["mask"][0] > 0
    # Every mask pixel is at least half covered by an object, so it changed; a pixel outside the mask is at most
    # half covered (anti-aliased edges), so it changed only on an object's border.
    assert changed[inside].all()
    border = torch.nn.functional.max_pool2d(scene["mask"][None], 3, stride=1, padding=1)[0, 0] > 0
    assert not (changed & ~border).any()
    # Objects are in front of the seabed: nearer than the seabed depth there.
    assert (scene["depth"][inside] < empty["depth"][inside]).all()


def test_distant_objects_lose_contrast():
    # The same object, nearer and farther: the degraded copy of the far one is closer to the water colour.
    from ssattn.apps.data.synthetic import degrade

    clean = torch.zeros(3, 16, 16)
    clean[0] = 1.0  # a red object filling the view
    near = degrade(clean, np.random.default_rng(0), torch.full((16, 16), 1.0))[0]
    far = degrade(clean, np.random.default_rng(0), torch.full((16, 16), 6.0))[0]
    assert near[0].mean() > far[0].mean() + 0.2
    with pytest.raises(ValueError, match="depth"):
        degrade(clean, np.random.default_rng(0), torch.ones(8, 8))
