"""The references pinned to hand-computed cases and checked with float64 gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from ssattn import reference as ref

f64 = torch.float64


# --------------------------------------------------------------------------- pyramid
def test_constant_grid_gives_zero_maps_at_every_level():
    maps = ref.guidance_pyramid(torch.full((2, 4, 5), 0.7, dtype=f64), [(9, 11), (4, 5), (1, 1)])
    assert [tuple(m.shape) for m in maps] == [(2, 1, 9, 11), (2, 1, 4, 5), (2, 1, 1, 1)]
    for m in maps:
        assert torch.equal(m, torch.zeros_like(m))


def test_sharpen_by_hand():
    grid = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]], dtype=f64)
    n = ref.normalize_minmax(grid * 4 - 3)  # affine change is undone by min-max
    torch.testing.assert_close(n, grid)
    s = ref.sharpen(n, gamma=2.0, delta=0.2)
    torch.testing.assert_close(s, torch.tensor([[[0.0, 0.64], [0.09, 0.0025]]], dtype=f64))


def test_renormalize_rescales_to_unit_peak_and_keeps_zero_maps():
    grid = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]], dtype=f64)
    s = ref.sharpen(grid, gamma=2.0, delta=0.2, renormalize=True)
    torch.testing.assert_close(s, torch.tensor([[[0.0, 1.0], [0.09 / 0.64, 0.0025 / 0.64]]], dtype=f64))
    zero = ref.sharpen(torch.zeros(1, 2, 2, dtype=f64), 2.0, 0.2, renormalize=True)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_bilinear_upsample_by_hand():
    # align_corners=False: output pixel centres at (x + 0.5) * 2 / 4 - 0.5 -> -0.25 (clamped), 0.25, 0.75, 1.25
    maps = ref.guidance_pyramid(torch.tensor([[[0.0, 1.0]]], dtype=f64), [(1, 4), (1, 2), (1, 1)], gamma=1.0, delta=0.0)
    torch.testing.assert_close(maps[0], torch.tensor([[[[0.0, 0.25, 0.75, 1.0]]]], dtype=f64))
    torch.testing.assert_close(maps[1], torch.tensor([[[[0.125, 0.875]]]], dtype=f64))
    torch.testing.assert_close(maps[2], torch.tensor([[[[0.5]]]], dtype=f64))


def test_area_levels_overlap_for_non_integer_ratios():
    m_sem, level = ref.guidance_pyramid(torch.rand(1, 3, 3, dtype=f64), [(5, 5), (3, 2)])
    assert level.shape == (1, 1, 3, 2)
    # adaptive windows, 5 -> 3 rows: [0,2), [1,4), [3,5); 5 -> 2 columns: [0,3), [2,5) (rows 1 and 3 shared)
    rows = torch.stack([m_sem[0, 0, 0:2].mean(0), m_sem[0, 0, 1:4].mean(0), m_sem[0, 0, 3:5].mean(0)])
    manual = torch.stack([rows[:, 0:3].mean(1), rows[:, 2:5].mean(1)], 1)
    torch.testing.assert_close(level[0, 0], manual)


def test_similarity_by_hand():
    text = torch.tensor([3.0, 0.0], dtype=f64)
    feats = torch.tensor([[[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [0.0, 0.0]]], dtype=f64)
    s = ref.similarity_grid(feats, text, (2, 2))
    torch.testing.assert_close(s, torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]], dtype=f64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_features_give_zero_similarity_in_every_dtype(dtype):
    feats = torch.randn(1, 4, 3).to(dtype)
    feats[0, 2] = 0.0
    maps = ref.guidance_pyramid(feats, [(4, 4)], text=torch.zeros(3, dtype=dtype), grid_size=(2, 2))
    assert torch.equal(maps[0], torch.zeros_like(maps[0]))  # all similarities 0: a constant grid
    maps = ref.guidance_pyramid(feats, [(4, 4)], text=torch.ones(3, dtype=dtype), grid_size=(2, 2))
    assert torch.isfinite(maps[0]).all() and maps[0].dtype == dtype


def test_pyramid_from_features_equals_pyramid_from_similarity():
    feats, text = torch.randn(3, 12, 8, dtype=f64), torch.randn(3, 8, dtype=f64)
    a = ref.guidance_pyramid(feats, [(7, 9), (3, 4)], text=text, grid_size=(3, 4))
    b = ref.guidance_pyramid(ref.similarity_grid(feats, text, (3, 4)), [(7, 9), (3, 4)])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_pyramid_gradcheck():
    grid = torch.rand(2, 3, 4, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda g: ref.guidance_pyramid(g, [(7, 5), (3, 2)], gamma=2.5, delta=0.1), (grid,)
    )
    feats = torch.randn(2, 6, 5, dtype=f64, requires_grad=True)
    text = torch.randn(5, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda f, t: ref.guidance_pyramid(f, [(5, 4), (2, 2)], text=t, grid_size=(2, 3), gamma=1.5, delta=0.0),
        (feats, text),
    )


# --------------------------------------------------------------------------- attention
def _qkv(B=2, h=2, nq=5, nk=7, d=4, dtype=f64, grad=False):
    return [torch.randn(B, h, n, d, dtype=dtype, requires_grad=grad) for n in (nq, nk, nk)]


def test_zero_weights_give_zero_output():
    q, k, v = _qkv()
    out = ref.masked_cross_attention(q, k, v, torch.zeros(2, 7, dtype=f64))
    assert torch.equal(out, torch.zeros_like(out))


def test_single_key_returns_weighted_value():
    q, k, v = _qkv(nk=1)
    w = torch.tensor([[0.3], [0.8]], dtype=f64)
    out = ref.masked_cross_attention(q, k, v, w)
    torch.testing.assert_close(out, (w[:, None, :, None] * v).expand_as(out))


def test_unit_weights_equal_sdpa():
    q, k, v = _qkv()
    out = ref.masked_cross_attention(q, k, v, torch.ones(2, 7, dtype=f64), scale=0.37)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.37))


def test_scores_are_weighted_inside_the_softmax():
    q, k, v = _qkv(B=1, h=1)
    w = torch.rand(1, 7, dtype=f64)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * 4 ** -0.5 * w[:, None, None, :]
    manual = torch.softmax(scores, -1) @ (w[:, None, :, None] * v)
    torch.testing.assert_close(ref.masked_cross_attention(q, k, v, w), manual)


def test_padding_equals_dropping_keys():
    q, k, v = _qkv(B=1)
    w = torch.rand(1, 7, dtype=f64)
    pad = torch.tensor([[False, True, False, False, True, True, False]])
    keep = ~pad[0]
    out = ref.masked_cross_attention(q, k, v, w, pad)
    torch.testing.assert_close(out, ref.masked_cross_attention(q, k[:, :, keep], v[:, :, keep], w[:, keep]))


def test_fully_padded_batch_is_zero_with_zero_gradients():
    q, k, v = _qkv(grad=True)
    w = torch.rand(2, 7, dtype=f64, requires_grad=True)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1] = True
    out = ref.masked_cross_attention(q, k, v, w, pad)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))
    assert w.grad[0].abs().sum() > 0


def test_attention_gradcheck_with_weight_and_padding():
    q, k, v = _qkv(B=2, h=2, nq=3, nk=4, d=3, grad=True)
    w = torch.rand(2, 4, dtype=f64, requires_grad=True)
    pad = torch.tensor([[False, False, True, False], [True, True, True, True]])
    assert torch.autograd.gradcheck(lambda *a: ref.masked_cross_attention(*a, pad, 0.9), (q, k, v, w))


def test_spec_weight_gradient_formula():
    """dm_j = sum_h sum_i dS_ij scale <q_i,k_j> + P_ij <do_i, v_j>, against autograd."""
    q, k, v = _qkv(B=1, h=3, nq=4, nk=5, d=3)
    w = torch.rand(1, 5, dtype=f64, requires_grad=True)
    scale = 0.6
    out = ref.masked_cross_attention(q, k, v, w, scale=scale)
    do = torch.randn_like(out)
    (auto,) = torch.autograd.grad(out, w, do)
    raw = scale * q @ k.transpose(-1, -2)
    p = torch.softmax(raw * w[:, None, None, :], -1)
    dp = do @ (w[:, None, :, None] * v).transpose(-1, -2)
    ds = p * (dp - (do * out).sum(-1, keepdim=True))
    manual = (ds * raw).sum((1, 2)) + (p * (do @ v.transpose(-1, -2))).sum((1, 2))
    torch.testing.assert_close(auto, manual.detach())


# --------------------------------------------------------------------------- alignment loss
def test_alignment_loss_by_hand():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=f64)
    m = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]], dtype=f64)
    # ||F(1-M)||^2 = 1 + 0 + 2.25 + 9 = 12.25 ; <F,M> = 0 + 2 + 1.5 + 1 = 4.5
    torch.testing.assert_close(ref.alignment_loss([f], [m], eta=1.0, reduction="sum"), torch.tensor(7.75, dtype=f64))
    torch.testing.assert_close(ref.alignment_loss([f], [m], eta=2.0, reduction="mean"), torch.tensor(3.25 / 4, dtype=f64))


def test_alignment_loss_extreme_maps():
    f = torch.randn(2, 3, 4, 5, dtype=f64)
    zeros, ones = torch.zeros(2, 1, 4, 5, dtype=f64), torch.ones(2, 1, 4, 5, dtype=f64)
    torch.testing.assert_close(ref.alignment_loss([f], [zeros], reduction="sum"), f.square().sum())
    torch.testing.assert_close(ref.alignment_loss([f], [ones], eta=0.5, reduction="sum"), -0.5 * f.sum())


def test_alignment_loss_levels_weights_and_mean():
    fs = [torch.randn(2, c, s, s + 1, dtype=f64) for c, s in ((3, 8), (5, 4))]
    ms = [torch.rand(2, 1, s, s + 1, dtype=f64) for s in (8, 4)]
    total = ref.alignment_loss(fs, ms, eta=0.3, weights=[0.5, 2.0], reduction="mean")
    parts = [ref.alignment_loss([f], [m], eta=0.3, reduction="sum") / f.numel() for f, m in zip(fs, ms)]
    torch.testing.assert_close(total, 0.5 * parts[0] + 2.0 * parts[1])


def test_alignment_gradient_formulas():
    f = torch.randn(2, 3, 4, 5, dtype=f64, requires_grad=True)
    m = torch.rand(2, 1, 4, 5, dtype=f64, requires_grad=True)
    w, eta = 0.7, 1.3
    loss = ref.alignment_loss([f], [m], eta=eta, weights=[w], reduction="sum")
    df, dm = torch.autograd.grad(loss, (f, m))
    f, m = f.detach(), m.detach()
    torch.testing.assert_close(df, w * (2 * f * (1 - m) ** 2 - eta * m))
    torch.testing.assert_close(dm, w * (-2 * f**2 * (1 - m) - eta * f).sum(1, keepdim=True))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_alignment_gradcheck(reduction):
    fs = [torch.randn(1, c, h, w, dtype=f64, requires_grad=True) for c, h, w in ((2, 3, 4), (3, 2, 1))]
    ms = [torch.rand(1, 1, h, w, dtype=f64, requires_grad=True) for h, w in ((3, 4), (2, 1))]
    assert torch.autograd.gradcheck(
        lambda f0, f1, m0, m1: ref.alignment_loss([f0, f1], [m0, m1], eta=0.8, weights=[1.0, 0.3], reduction=reduction),
        (*fs, *ms),
    )


def test_alignment_half_inputs_accumulate_in_float32():
    f = torch.full((1, 64, 64, 64), 4.0, dtype=torch.float16)  # sum of squares 4.2e6 overflows fp16
    m = torch.zeros(1, 1, 64, 64, dtype=torch.float16)
    loss = ref.alignment_loss([f], [m], reduction="sum")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(16.0 * f.numel()))
