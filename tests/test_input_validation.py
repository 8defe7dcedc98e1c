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
