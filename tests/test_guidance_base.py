"""The Guide interface: normalised grids + rendering through guidance_pyramid equal SPEC 1's reference."""

import pytest
import torch

from ssattn import reference
from ssattn.images import resize_image
from ssattn.guidance import Guide, SaliencyGuide, embedded_guidance, normalized_grid, render_maps
from ssattn.guidance.embedded import guidance_grid

SIZES = [(97, 255), (13, 7), (1, 1)]


def _ref_levels(raw64, sizes, gamma, delta):
    return reference.guidance_pyramid(raw64, sizes, gamma=gamma, delta=delta)


def test_normalized_grid_matches_reference():
    raw = torch.randn(3, 7, 5)
    n = normalized_grid(raw)
    expect = reference.normalize_minmax(raw.double())
    torch.testing.assert_close(n.double(), expect, atol=1e-6, rtol=0)
    assert n.min() >= 0 and n.max() <= 1
    feats, text = torch.randn(2, 35, 16), torch.randn(2, 16)
    n = normalized_grid(feats, text=text, grid_size=(7, 5))
    expect = reference.normalize_minmax(reference.similarity_grid(feats.double(), text.double(), (7, 5)))
    torch.testing.assert_close(n.double(), expect, atol=1e-6, rtol=0)
    assert torch.equal(normalized_grid(torch.full((1, 3, 4), 0.3)), torch.zeros(1, 3, 4))  # constant -> 0


@pytest.mark.parametrize("gamma, delta", [(2.0, 0.2), (1.0, 0.0), (3.5, 0.6)])
def test_two_step_rendering_equals_one_step_spec(gamma, delta):
    # What the cache stores (normalised grid), rendered later, must equal SPEC 1 applied to the raw scores.
    raw = torch.randn(1, 7, 5) * 3 + 1
    maps = render_maps(normalized_grid(raw)[0], SIZES, gamma=gamma, delta=delta)
    expect = _ref_levels(raw.double(), SIZES, gamma, delta)
    for m, e, s in zip(maps, expect, SIZES):
        assert m.shape == (1, *s)
        torch.testing.assert_close(m.double(), e[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize("combine", ["max", "mean"])
def test_render_combines_per_prompt_maps(combine):
    grids = torch.rand(3, 6, 9)
    maps = render_maps(grids, SIZES, gamma=2.0, delta=0.1, combine=combine)
    per_prompt = _ref_levels(grids.double(), SIZES, 2.0, 0.1)  # (3, 1, H, W) per level
    for m, e in zip(maps, per_prompt):
        want = e.amax(0) if combine == "max" else e.mean(0)
        torch.testing.assert_close(m.double(), want, atol=2e-6, rtol=0)
    single = render_maps(grids[1], SIZES, gamma=2.0, delta=0.1, combine=combine)  # (gh, gw) is one prompt
    for m, e in zip(single, per_prompt):
        torch.testing.assert_close(m.double(), e[1], atol=2e-6, rtol=0)
    # max is at least every prompt's map; mean lies between the smallest and the largest
    assert (maps[0].double() >= per_prompt[0].amin(0) - 1e-6).all()


def test_render_bad_args():
    with pytest.raises(ValueError, match="combine must be one of"):
        render_maps(torch.rand(1, 4, 4), [(8, 8)], combine="sum")
    with pytest.raises(ValueError, match="grids must have shape"):
        render_maps(torch.rand(1, 1, 4, 4), [(8, 8)])
    with pytest.raises(ValueError, match="gamma"):
        render_maps(torch.rand(1, 4, 4), [(8, 8)], gamma=0.5)
    with pytest.raises(ValueError, match="larger than the image size"):
        render_maps(torch.rand(1, 4, 4), [(8, 8), (9, 2)])


def test_saliency_guide_matches_saliency_guidance():
    g = SaliencyGuide()
    assert isinstance(g, Guide) and g.settings["method"] == "saliency"
    x = torch.rand(2, 3, 40, 70)
    maps = g(x, gamma=2.0, delta=0.2)
    assert maps.shape == (2, 1, 40, 70)
    small = resize_image(x, g.input_size)
    expect = embedded_guidance(small.double(), sizes=[(40, 70)], gamma=2.0, delta=0.2, backend="reference")[0]
    torch.testing.assert_close(maps.double(), expect.double(), atol=1e-5, rtol=0)
    grids, prompts = g.grids(x)
    assert [t.shape for t in grids] == [(1, 64, 64)] * 2 and prompts == [[], []]
    torch.testing.assert_close(grids[0][0].double(), reference.normalize_minmax(guidance_grid(small[:1]).double())[0],
                               atol=1e-5, rtol=0)
    # same result from the preprocessed batch (what DataLoader workers hand over)
    pre, _ = g.grids(preprocessed=torch.stack([g.preprocess(im) for im in x]))
    torch.testing.assert_close(pre[1], grids[1])


def test_guide_call_list_of_sizes_and_pil():
    from PIL import Image

    g = SaliencyGuide()
    pil = Image.fromarray((torch.rand(9, 4, 3) * 255).byte().numpy())
    out = g([torch.rand(3, 1, 1), torch.rand(3, 5, 3), pil, torch.rand(1, 30, 20)])
    assert [tuple(m.shape) for m in out] == [(1, 1, 1), (1, 5, 3), (1, 9, 4), (1, 30, 20)]
    for m in out:
        assert torch.isfinite(m).all() and m.min() >= 0 and m.max() <= 1


def test_guide_call_bad_input():
    g = SaliencyGuide()
    with pytest.raises(ValueError, match="wrap it in a list"):
        g(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        g([])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        g(torch.rand(2, 4, 8, 8))
    with pytest.raises(TypeError, match="PIL image"):
        g(["x.png"])
    with pytest.raises(ValueError, match="combine"):
        g(torch.rand(1, 3, 8, 8), combine="min")
