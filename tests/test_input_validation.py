"""Bad input gets a clear error naming the argument; inputs that used to give silent wrong answers.

Each case here was found by fuzzing against an independent float64
implementation of docs/operations.md (issue 14): before the fix it either
failed deep inside torch with a message that named no argument of ours, or
returned a wrong result without a word.
"""

import warnings

import pytest
import torch

import ssattn
from ssattn import reference

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")


# --------------------------------------------------------------------------- pyramid
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.float16])
def test_reference_pyramid_normalises_half_text_in_float32(scores_dtype):
    feats = torch.randn(2, 6 * 5, 8).to(scores_dtype)
    zero = torch.zeros(8, dtype=torch.float16)
    (m,) = reference.guidance_pyramid(feats, [(12, 10)], text=zero, grid_size=(6, 5))
    assert m.dtype == scores_dtype and not m.isnan().any() and (m == 0).all()  # a zero text: no similarity
    text = torch.randn(2, 8).to(torch.float16)
    (got,) = reference.guidance_pyramid(feats, [(12, 10)], text=text, grid_size=(6, 5))
    (want,) = reference.guidance_pyramid(feats.double(), [(12, 10)], text=text.double(), grid_size=(6, 5))
    # float32 rounding of the same text, not fp16's (7e-5 before)
    tol = 2e-6 if scores_dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


def test_guidance_pyramid_module_validates_sizes_at_construction():
    with pytest.raises(ValueError, match=r"sizes\[1\] = \(64, 64\) is larger than the image size sizes\[0\] = \(32, 32\)"):
        ssattn.GuidancePyramid([(32, 32), (64, 64)])
    with pytest.raises(ValueError, match=r"sizes\[0\] must be a pair"):
        ssattn.GuidancePyramid([(32,)])
    with pytest.raises(ValueError, match="non-empty list"):
        ssattn.GuidancePyramid([])
    assert ssattn.GuidancePyramid([(32, 32), (16, 8)]).sizes == [(32, 32), (16, 8)]


# --------------------------------------------------------------------------- cross-attention module
def test_cross_attention_input_dtype_must_match_the_parameters():
    block = ssattn.SemanticCrossAttention(4, 6)
    dec, enc, g = torch.randn(1, 4, 5, 5), torch.randn(1, 6, 3, 3), torch.rand(1, 1, 5, 5)
    with pytest.raises(TypeError, match=r"dec has dtype torch.float64 but the module's parameters are torch.float32"):
        block(dec.double(), enc, g)
    with pytest.raises(TypeError, match=r"enc has dtype torch.float64"):
        block(dec, enc.double(), g)
    block.double()
    assert block(dec.double(), enc.double(), g).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast converts by itself: not an error
        block.float()(dec, enc, g)


@pytest.mark.parametrize("which,shape", [("enc", (1, 6, 0, 3)), ("enc", (1, 6, 3, 0)), ("dec", (1, 4, 0, 5)),
                                         ("guidance", (1, 1, 0, 5))])
def test_cross_attention_empty_spatial_sizes(which, shape):
    block = ssattn.SemanticCrossAttention(4, 6)
    args = {"dec": torch.randn(1, 4, 5, 5), "enc": torch.randn(1, 6, 3, 3), "guidance": torch.rand(1, 1, 5, 5)}
    args[which] = torch.rand(shape)
    with pytest.raises(ValueError, match=rf"{which} must have a non-empty spatial size.*{tuple(shape)}".replace("(", r"\(").replace(")", r"\)")):
        block(**args)


def test_cross_attention_empty_batch_is_fine():
    block = ssattn.SemanticCrossAttention(4, 6)
    out = block(torch.randn(0, 4, 5, 5), torch.randn(0, 6, 3, 3), torch.rand(0, 1, 5, 5))
    assert out.shape == (0, 4, 5, 5)


@pytest.mark.parametrize("bad", [True, False, float("inf"), float("nan"), "0.5"])
def test_cross_attention_scale_must_be_a_number(bad):
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ssattn.SemanticCrossAttention(4, 4, scale=bad)
    assert ssattn.SemanticCrossAttention(4, 4, scale=1).scale == 1.0


# --------------------------------------------------------------------------- masked_cross_attention
def _qkv(B=1, h=2, nq=5, nk=7, d=4):
    return torch.randn(B, h, nq, d), torch.randn(B, h, nk, d), torch.randn(B, h, nk, d)


def test_weight_and_mask_must_be_tensors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="weight must be a torch.Tensor or None, got list"):
        ssattn.masked_cross_attention(q, k, v, weight=[1.0] * 7)
    with pytest.raises(TypeError, match="key_padding_mask must be a torch.Tensor or None, got list"):
        ssattn.masked_cross_attention(q, k, v, key_padding_mask=[False] * 7)


@pytest.mark.parametrize("bad", [True, False, float("inf"), "0.5"])
def test_attention_scale_rejects_bools_and_non_numbers(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ssattn.masked_cross_attention(q, k, v, scale=bad)
    torch.testing.assert_close(ssattn.masked_cross_attention(q, k, v, scale=1, backend="reference"),
                               reference.masked_cross_attention(q, k, v, scale=1.0))


# --------------------------------------------------------------------------- the registered ops, called directly
def _fwd(q, k, v, weight=None, kpm=None):
    return torch.ops.ssattn.masked_attention_fwd(q, k, v, weight, kpm, 0.5, "triton", "ieee", False)


@pytest.mark.parametrize("case", ["heads", "batch", "head_dim", "keys", "weight", "mask_shape", "mask_dtype", "dtype"])
def test_attention_op_checks_shapes_itself(case):
    q, k, v = _qkv(B=2, h=2, nq=5, nk=7, d=4)
    w, kpm = torch.rand(2, 7), torch.zeros(2, 7, dtype=torch.bool)
    if case == "heads":  # read out of bounds on the Triton path before: different garbage each run
        k, v = k[:, :1], v[:, :1]
    elif case == "batch":
        k = k[:1]
    elif case == "head_dim":
        k = torch.randn(2, 2, 7, 8)
    elif case == "keys":
        v = v[:, :, :6]
    elif case == "weight":
        w = torch.rand(2, 6)
    elif case == "mask_shape":
        kpm = kpm[:1]
    elif case == "mask_dtype":
        kpm = kpm.float()
    elif case == "dtype":
        v = v.double()
    with pytest.raises((ValueError, TypeError)):
        _fwd(q, k, v, w, kpm)
    # the fake kernel says the same while tracing, from shapes alone (meta tensors hold no data: no sync)
    meta = [None if t is None else t.to("meta") for t in (q, k, v, w, kpm)]
    with pytest.raises((ValueError, TypeError)):
        _fwd(*meta)


def test_attention_backward_op_checks_shapes_itself():
    q, k, v = _qkv(B=1, h=2, nq=5, nk=7, d=4)
    out, lse = _fwd(q, k, v)
    bwd = torch.ops.ssattn.masked_attention_bwd
    with pytest.raises(ValueError, match="grad_out must have shape"):
        bwd(torch.randn(1, 2, 4, 4), q, k, v, None, None, out, lse, 0.5, False, "triton", "ieee", False)
    with pytest.raises(ValueError, match="lse must be"):
        bwd(torch.randn_like(out), q, k, v, None, None, out, lse[:, :1], 0.5, False, "triton", "ieee", False)
    dq, dk, dv, _ = bwd(torch.randn_like(out), q, k, v, None, None, out, lse, 0.5, False, "triton", "ieee", False)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_pyramid_op_checks_shapes_itself():
    op = torch.ops.ssattn.guidance_pyramid
    grid = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="scores must be a"):
        op(grid, None, [4, 5], [8, 8], 2.0, 0.2, False, "triton")
    with pytest.raises(ValueError, match="sizes must be a flat list"):
        op(grid, None, [4, 4], [8, 8, 4], 2.0, 0.2, False, "triton")
    with pytest.raises(ValueError, match="larger than the image"):
        op(grid, None, [4, 4], [8, 8, 16, 4], 2.0, 0.2, False, "triton")
    feats = torch.randn(2, 16, 6)
    with pytest.raises(ValueError, match="text must have shape"):
        op(feats, torch.randn(5), [4, 4], [8, 8], 2.0, 0.2, False, "triton")
    with pytest.raises(ValueError, match="text must have shape"):
        op(feats, torch.randn(3, 6), [4, 4], [8, 8], 2.0, 0.2, False, "triton")
    (m,) = op(grid, None, [4, 4], [8, 8], 2.0, 0.2, False, "triton")
    assert m.shape == (2, 1, 8, 8)
