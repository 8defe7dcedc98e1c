"""The public functional API: validation, backend dispatch, and agreement with the references."""

import warnings

import pytest
import torch

import ssattn
from ssattn import _backends, reference as ref
from tests._accuracy import assert_accurate, assert_grads_accurate

f64 = torch.float64


def _qkv(B=2, h=2, nq=5, nk=7, d=4, dtype=torch.float32):
    return [torch.randn(B, h, n, d, dtype=dtype) for n in (nq, nk, nk)]


def _level(B=2, C=3, H=5, W=6, dtype=torch.float32):
    return torch.randn(B, C, H, W, dtype=dtype), torch.rand(B, 1, H, W, dtype=dtype)


# --------------------------------------------------------------------------- errors
class TestPyramidErrors:
    def test_wrong_rank(self):
        with pytest.raises(ValueError, match=r"scores must have 3 dimensions"):
            ssattn.guidance_pyramid(torch.rand(4, 4), [(8, 8)])

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match=r"scores must have a floating dtype"):
            ssattn.guidance_pyramid(torch.ones(1, 4, 4, dtype=torch.int64), [(8, 8)])

    @pytest.mark.parametrize("gamma", [0.5, float("nan"), float("inf")])
    def test_gamma(self, gamma):
        with pytest.raises(ValueError, match=r"gamma must be a finite number >= 1"):
            ssattn.guidance_pyramid(torch.rand(1, 4, 4), [(8, 8)], gamma=gamma)

    @pytest.mark.parametrize("delta", [-0.1, 1.0, 1.5])
    def test_delta(self, delta):
        with pytest.raises(ValueError, match=r"delta must be in \[0, 1\)"):
            ssattn.guidance_pyramid(torch.rand(1, 4, 4), [(8, 8)], delta=delta)

    @pytest.mark.parametrize("sizes", [[], None, "88"])
    def test_empty_sizes(self, sizes):
        with pytest.raises(ValueError, match=r"sizes must be a non-empty list"):
            ssattn.guidance_pyramid(torch.rand(1, 4, 4), sizes)

    @pytest.mark.parametrize("bad", [(0, 4), (4,), (2.5, 3), "ab"])
    def test_bad_size_pair(self, bad):
        with pytest.raises(ValueError, match=r"sizes\[1\] must be a pair of positive integers"):
            ssattn.guidance_pyramid(torch.rand(1, 4, 4), [(8, 8), bad])

    def test_level_larger_than_image(self):
        with pytest.raises(ValueError, match=r"sizes\[1\] = \(9, 4\) is larger than the image size"):
            ssattn.guidance_pyramid(torch.rand(1, 4, 4), [(8, 8), (9, 4)])

    def test_features_need_grid_size_and_matching_shapes(self):
        feats, text = torch.randn(2, 12, 8), torch.randn(8)
        with pytest.raises(ValueError, match=r"grid_size=\(gh, gw\) is required"):
            ssattn.guidance_pyramid(feats, [(8, 8)], text=text)
        with pytest.raises(ValueError, match=r"scores has 12 patch features but grid_size 3x3 needs 9"):
            ssattn.guidance_pyramid(feats, [(8, 8)], text=text, grid_size=(3, 3))
        with pytest.raises(ValueError, match=r"text has 5 features"):
            ssattn.guidance_pyramid(feats, [(8, 8)], text=torch.randn(5), grid_size=(3, 4))
        with pytest.raises(ValueError, match=r"text has batch 3"):
            ssattn.guidance_pyramid(feats, [(8, 8)], text=torch.randn(3, 8), grid_size=(3, 4))
        with pytest.raises(ValueError, match=r"grid_size is only used with text"):
            ssattn.guidance_pyramid(torch.rand(1, 3, 4), [(8, 8)], grid_size=(3, 4))

    def test_devices(self):
        # a meta tensor stands in for a second device, so this runs without a GPU
        with pytest.raises(ValueError, match=r"text is on meta but scores is on cpu"):
            ssattn.guidance_pyramid(torch.randn(1, 4, 8), [(4, 4)], text=torch.randn(8, device="meta"), grid_size=(2, 2))


class TestAttentionErrors:
    def test_rank(self):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"q must have 4 dimensions"):
            ssattn.masked_cross_attention(q[0], k, v)

    def test_integer_dtype(self):
        q, k, v = _qkv()
        with pytest.raises(TypeError, match=r"k must have a floating dtype"):
            ssattn.masked_cross_attention(q, k.long(), v)

    def test_mixed_dtypes(self):
        q, k, v = _qkv()
        with pytest.raises(TypeError, match=r"q, k and v must share a dtype"):
            ssattn.masked_cross_attention(q, k.double(), v)

    def test_batch_and_heads(self):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"must agree in batch and heads"):
            ssattn.masked_cross_attention(q, k[:1], v[:1])

    def test_head_dim_and_key_count(self):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"k must have head dim 4"):
            ssattn.masked_cross_attention(q, k[..., :3], v)
        with pytest.raises(ValueError, match=r"v must have as many keys as k \(7\)"):
            ssattn.masked_cross_attention(q, k, v[:, :, :6])

    def test_weight_shape_and_range(self):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"weight must have shape \(B, Nk\) = \(2, 7\)"):
            ssattn.masked_cross_attention(q, k, v, torch.rand(2, 6))
        with pytest.raises(ValueError, match=r"weight must have values in \[0, 1\], got min 0 and max 255"):
            ssattn.masked_cross_attention(q, k, v, torch.tensor([[0.0] * 6 + [255.0]] * 2))
        with pytest.raises(TypeError, match=r"weight must have a floating dtype"):
            ssattn.masked_cross_attention(q, k, v, torch.ones(2, 7, dtype=torch.uint8))

    def test_range_check_can_be_disabled(self):
        q, k, v = _qkv()
        ssattn.set_value_checks(False)
        try:
            out = ssattn.masked_cross_attention(q, k, v, torch.full((2, 7), 2.0))
        finally:
            ssattn.set_value_checks(True)
        torch.testing.assert_close(out, ref.masked_cross_attention(q, k, v, torch.full((2, 7), 2.0)))

    def test_padding_mask(self):
        q, k, v = _qkv()
        with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor"):
            ssattn.masked_cross_attention(q, k, v, key_padding_mask=torch.zeros(2, 7))
        with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Nk\)"):
            ssattn.masked_cross_attention(q, k, v, key_padding_mask=torch.zeros(2, 8, dtype=torch.bool))

    def test_devices(self):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"v is on meta but q is on cpu"):
            ssattn.masked_cross_attention(q, k, v.to("meta"))
        with pytest.raises(ValueError, match=r"weight is on meta but q is on cpu"):
            ssattn.masked_cross_attention(q, k, v, torch.rand(2, 7, device="meta"))

    def test_scale(self):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"scale must be a finite number"):
            ssattn.masked_cross_attention(q, k, v, scale=float("nan"))

    def test_backend_names(self):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"backend must be one of"):
            ssattn.masked_cross_attention(q, k, v, backend="cuda")
        with pytest.raises(ValueError, match=r"has no 'native' backend"):
            ssattn.masked_cross_attention(q, k, v, backend="native")


class TestAlignmentErrors:
    def test_empty_and_not_lists(self):
        with pytest.raises(ValueError, match=r"features must not be empty"):
            ssattn.alignment_loss([], [])
        with pytest.raises(TypeError, match=r"features must be a list of tensors"):
            ssattn.alignment_loss(torch.randn(1, 1, 2, 2), [torch.rand(1, 1, 2, 2)])

    def test_level_counts(self):
        f, m = _level()
        with pytest.raises(ValueError, match=r"same number of levels, got 2 and 1"):
            ssattn.alignment_loss([f, f], [m])

    def test_rank_and_channels(self):
        f, m = _level()
        with pytest.raises(ValueError, match=r"maps\[0\] must have 4 dimensions"):
            ssattn.alignment_loss([f], [m[:, 0]])
        with pytest.raises(ValueError, match=r"maps\[0\] must have one channel"):
            ssattn.alignment_loss([f], [m.expand(2, 3, 5, 6)])

    def test_batch_and_size_mismatch(self):
        f, m = _level()
        with pytest.raises(ValueError, match=r"expected \(2, 1, 5, 6\)"):
            ssattn.alignment_loss([f], [m[:1]])
        with pytest.raises(ValueError, match=r"maps\[1\] has shape \(2, 1, 5, 5\) but features\[1\]"):
            ssattn.alignment_loss([f, f], [m, m[..., :5]])

    def test_integer_dtype(self):
        f, m = _level()
        with pytest.raises(TypeError, match=r"features\[0\] must have a floating dtype"):
            ssattn.alignment_loss([f.int()], [m])

    def test_map_range(self):
        f, m = _level()
        with pytest.raises(ValueError, match=r"maps\[0\] must have values in \[0, 1\]"):
            ssattn.alignment_loss([f], [m - 0.5])

    def test_scalars(self):
        f, m = _level()
        with pytest.raises(ValueError, match=r"eta must be a finite number >= 0"):
            ssattn.alignment_loss([f], [m], eta=-1.0)
        with pytest.raises(ValueError, match=r"weights must have one value per level \(1\), got 2"):
            ssattn.alignment_loss([f], [m], weights=[1.0, 2.0])
        with pytest.raises(ValueError, match=r"reduction must be one of \['mean', 'sum'\]"):
            ssattn.alignment_loss([f], [m], reduction="max")

    def test_devices(self):
        f, m = _level()
        with pytest.raises(ValueError, match=r"maps\[0\] is on meta but features\[0\] is on cpu"):
            ssattn.alignment_loss([f], [m.to("meta")])
        with pytest.raises(ValueError, match=r"features\[1\] is on meta but features\[0\] is on cpu"):
            ssattn.alignment_loss([f, f.to("meta")], [m, m.to("meta")])


# --------------------------------------------------------------------------- NaN propagates, never crashes
def test_nan_propagates_through_every_operation():
    grid = torch.rand(1, 4, 4)
    grid[0, 1, 2] = float("nan")
    maps = ssattn.guidance_pyramid(grid, [(8, 8), (2, 2)])
    assert all(torch.isnan(m).all() for m in maps)  # min/max of the image are NaN

    q, k, v = _qkv()
    q[0, 0, 0, 0] = float("nan")
    out = ssattn.masked_cross_attention(q, k, v, torch.rand(2, 7))
    assert torch.isnan(out[0, 0, 0]).all() and torch.isfinite(out[1]).all()
    w = torch.rand(2, 7)
    w[1, 3] = float("nan")  # passes the range check, propagates
    assert torch.isnan(ssattn.masked_cross_attention(*_qkv(), w)[1]).all()

    f, m = _level()
    m[0, 0, 0, 0] = float("nan")
    assert torch.isnan(ssattn.alignment_loss([f], [m], backend="reference"))


# --------------------------------------------------------------------------- dispatch
def test_auto_on_cpu_is_the_reference_for_attention_and_pyramid():
    q, k, v = _qkv()
    w = torch.rand(2, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fast path exists on CPU: nothing to warn about
        torch.testing.assert_close(ssattn.masked_cross_attention(q, k, v, w), ref.masked_cross_attention(q, k, v, w))
        grid = torch.rand(2, 3, 3)
        for a, b in zip(ssattn.guidance_pyramid(grid, [(6, 6), (2, 3)]), ref.guidance_pyramid(grid, [(6, 6), (2, 3)])):
            torch.testing.assert_close(a, b)


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backends, "native_module", lambda: None)
    monkeypatch.setattr(_backends, "_warned", set())
    f, m = _level()
    with pytest.warns(RuntimeWarning, match=r"native backend is not available.*falling back to the reference") as rec:
        a = ssattn.alignment_loss([f], [m])
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = ssattn.alignment_loss([f], [m])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, ref.alignment_loss([f], [m]))
    with pytest.raises(RuntimeError, match=r"backend 'native' cannot run on cpu .*not built"):
        ssattn.alignment_loss([f], [m], backend="native")


def test_missing_triton_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backends, "triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(_backends, "_warned", set())
    _backends.kernel_module.cache_clear()
    try:
        assert _backends.kernel_module("attention") is None
        # "auto" on a CUDA device would prefer Triton: emulate the resolution for cuda
        with pytest.warns(RuntimeWarning, match=r"triton backend is not available on cuda .*No module named 'triton'") as seen:
            chosen = _backends.resolve("masked_cross_attention", "auto", "cuda")
        assert chosen == "reference"
        assert len(seen) == 1, [str(w.message) for w in seen]  # one missing component, one warning
        q, k, v = _qkv()
        with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run on cpu .*not importable"):
            ssattn.masked_cross_attention(q, k, v, backend="triton")
    finally:
        _backends.kernel_module.cache_clear()


def test_import_does_not_need_triton_or_the_extension():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import warnings; warnings.simplefilter('error')\n"
        "import ssattn, torch\n"
        "q = torch.randn(1, 1, 3, 2)\n"
        "print(ssattn.masked_cross_attention(q, q, q).shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 1, 3, 2])" in res.stdout


# --------------------------------------------------------------------------- the registered op (Triton under the interpreter on CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nq,nk", [(1, 1), (7, 97), (33, 5)])
def test_attention_op_by_accuracy_rule(dtype, nq, nk):
    B, h, d = 2, 2, 8
    q64, k64, v64 = (torch.randn(B, h, n, d, dtype=f64) for n in (nq, nk, nk))
    w64 = torch.rand(B, nk, dtype=f64)
    pad = torch.rand(B, nk) < 0.3
    pad[:, 0] = False
    inputs64 = [t.requires_grad_() for t in (q64, k64, v64, w64)]
    lowp = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    lowp_ref = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    scale = d ** -0.5

    out64 = ref.masked_cross_attention(*inputs64, pad, scale)
    out_ref = ref.masked_cross_attention(*lowp_ref, pad, scale)
    out, lse = torch.ops.ssattn.masked_attention_fwd(*lowp, pad, scale, "triton", "ieee", False)
    assert lse.dtype == torch.float32 and lse.shape == (B, h, nq, 2)  # base-2 row max, log2 row sum
    assert_accurate(out, out_ref, out64, name="out")

    assert_grads_accurate(out, out_ref, out64, lowp, lowp_ref, inputs64)


def test_attention_op_handles_non_contiguous_and_channels_last_views():
    B, h, d, H, W = 2, 2, 4, 5, 3
    feats = torch.randn(B, h * d, H, W).to(memory_format=torch.channels_last)
    q = feats.view(B, h, d, H * W).transpose(-1, -2)  # a strided view, no copy
    k = torch.randn(B, H * W, h, d).transpose(1, 2)
    v = torch.randn(B, h, d, H * W).transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    w = torch.rand(B, H * W)
    out, _ = torch.ops.ssattn.masked_attention_fwd(q, k, v, w, None, 0.5, "triton", "ieee", False)
    torch.testing.assert_close(out, ref.masked_cross_attention(q.contiguous(), k.contiguous(), v.contiguous(), w, None, 0.5))


def test_attention_op_fully_padded_batch():
    q, k, v = (t.requires_grad_() for t in _qkv())
    w = torch.rand(2, 7, requires_grad=True)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0] = True
    out, lse = torch.ops.ssattn.masked_attention_fwd(q, k, v, w, pad, 0.5, "triton", "ieee", False)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[0]).all() and (lse[0] > 0).all()
    out.sum().backward()
    for t in (q, k, v, w):
        assert torch.isfinite(t.grad).all() and torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))


def test_attention_large_magnitude_inputs_stay_finite():
    q64, k64, v64 = (t * 100 for t in _qkv(dtype=f64))
    w64 = torch.rand(2, 7, dtype=f64)
    out, _ = torch.ops.ssattn.masked_attention_fwd(q64.float(), k64.float(), v64.float(), w64.float(), None, 0.5, "triton", "ieee", False)
    assert torch.isfinite(out).all()
    ref32 = ref.masked_cross_attention(q64.float(), k64.float(), v64.float(), w64.float(), None, 0.5)
    assert_accurate(out, ref32, ref.masked_cross_attention(q64, k64, v64, w64, None, 0.5))


@pytest.mark.parametrize("renormalize", [False, True])
def test_pyramid_op_matches_reference(renormalize):
    feats, text = torch.randn(2, 20, 6), torch.randn(2, 6)
    sizes = [(17, 13), (8, 7), (1, 1)]
    got = torch.ops.ssattn.guidance_pyramid(feats, text, [4, 5], [17, 13, 8, 7, 1, 1], 1.5, 0.3, renormalize, "triton")
    want = ref.guidance_pyramid(feats, sizes, gamma=1.5, delta=0.3, text=text, grid_size=(4, 5), renormalize=renormalize)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_pyramid_values_in_unit_interval_and_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, f64):
        maps = ssattn.guidance_pyramid(torch.randn(3, 6, 7).to(dtype), [(25, 23), (7, 7), (1, 2)], renormalize=True)
        for m in maps:
            assert m.dtype == dtype and m.min() >= 0 and m.max() <= 1


def test_alignment_reference_channels_last_and_non_contiguous():
    f = torch.randn(2, 4, 6, 5, dtype=f64)
    m = torch.rand(2, 1, 6, 5, dtype=f64)
    want = ref.alignment_loss([f], [m], eta=0.4)
    got_cl = ssattn.alignment_loss([f.to(memory_format=torch.channels_last)], [m], eta=0.4, backend="reference")
    got_nc = ssattn.alignment_loss([f.transpose(-1, -2).contiguous().transpose(-1, -2)], [m], eta=0.4,
                                   backend="reference")
    torch.testing.assert_close(got_cl, want)
    torch.testing.assert_close(got_nc, want)
