"""Text guidance modules (docs/operations.md sections 5-6): definitions written out, identity at construction,
gradients, layouts, compile, bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from ssattn.text import (ChannelAttention, CrossLayerAttentionFusion, InformationFusionAttention, IntraModalAttention,
                         PixelAttention, TextConditioning, TextGuidedCrossAttention, WordSelfAttention, pooled_words)


def _words(B=2, L=5, Ct=12, dtype=torch.float64, padded=((1, 3),)):
    words = torch.randn(B, L, Ct, dtype=dtype)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, start in padded:
        mask[b, start:] = True
    return words, mask


def _randomise(module):
    for name, p in module.named_parameters():
        if "out_proj" in name:
            torch.nn.init.normal_(p, std=0.3)
    return module


def _softmax_attention(q, k, v, mask=None, weight=None, scale=None):
    """SPEC 2 written out: scores scale * m_j <q_i, k_j>, padded keys excluded, values m_j v_j."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    m = torch.ones(k.shape[0], k.shape[2], dtype=q.dtype) if weight is None else weight.to(q.dtype)
    s = scale * (q @ k.transpose(-1, -2)) * m[:, None, None, :]
    if mask is not None:
        s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ (v * m[:, None, :, None])


def _manual_cross(block, x, words, mask, weight=None):
    B, _, H, W = x.shape
    h, d = block.heads, block.head_dim
    q = F.conv2d(x, block.q_proj.weight).flatten(2).view(B, h, d, -1).transpose(-1, -2)
    k = (words @ block.k_proj.weight.T).view(B, -1, h, d).transpose(1, 2)
    v = (words @ block.v_proj.weight.T).view(B, -1, h, d).transpose(1, 2)
    out = _softmax_attention(q, k, v, mask, weight)
    return x + F.conv2d(out.transpose(-1, -2).reshape(B, h * d, H, W), block.out_proj.weight)


def test_new_text_cross_attention_is_the_identity():
    block = TextGuidedCrossAttention(8, 12, heads=2)
    x = torch.randn(2, 8, 7, 9)
    words, mask = _words(dtype=torch.float32)
    assert torch.equal(block(x, words, mask), x)


@pytest.mark.parametrize("heads,head_dim", [(1, None), (2, None), (4, 3)])
@pytest.mark.parametrize("with_weight", [False, True])
def test_text_cross_attention_matches_its_definition(heads, head_dim, with_weight):
    block = _randomise(TextGuidedCrossAttention(8, 12, heads=heads, head_dim=head_dim)).double()
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    words, mask = _words()
    weight = torch.rand(2, 5, dtype=torch.float64) if with_weight else None
    torch.testing.assert_close(block(x, words, mask, weight), _manual_cross(block, x, words, mask, weight))


def test_all_padded_words_leave_the_image_unchanged():
    # W_o has no bias: an image with no words gets no update, however trained the block is.
    block = _randomise(TextGuidedCrossAttention(8, 12, heads=2)).double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    words, mask = _words(padded=((0, 0),))
    y = block(x, words, mask)
    assert torch.equal(y[0], x[0])
    assert not torch.allclose(y[1], x[1])


def test_text_cross_attention_gradients_and_gradcheck():
    block = _randomise(TextGuidedCrossAttention(4, 6, heads=2)).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    words, mask = _words(L=4, Ct=6, padded=((1, 2),))
    words.requires_grad_()
    weight = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    block(x, words, mask, weight).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.autograd.gradcheck(lambda a, w, m: block(a, w, mask, m), (x, words, weight))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_text_cross_attention_keeps_the_layout(fmt):
    block = _randomise(TextGuidedCrossAttention(8, 12, heads=2)).to(memory_format=fmt)
    x = torch.randn(2, 8, 7, 9).contiguous(memory_format=fmt)
    words, mask = _words(dtype=torch.float32)
    y = block(x, words, mask)
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y.double(), _manual_cross(block.double(), x.double(), words.double(), mask),
                               rtol=1e-4, atol=1e-5)


def test_text_cross_attention_bad_inputs():
    block = TextGuidedCrossAttention(8, 12, heads=2)
    x = torch.randn(2, 8, 4, 4)
    words, mask = _words(dtype=torch.float32)
    with pytest.raises(ValueError, match="words must have 12 features"):
        block(x, words[..., :10], mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        block(x, words, mask.float().bool()[:, :3])
    with pytest.raises(TypeError, match="mask must be"):
        block(x, words, mask.float())
    with pytest.raises(ValueError, match="batch"):
        block(x[:1], words, mask)
    with pytest.raises(ValueError, match="x must have 8 channels"):
        block(torch.randn(2, 7, 4, 4), words, mask)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        block(x, words, mask, torch.full((2, 5), 1.5))
    with pytest.raises(TypeError, match="dtype"):
        block(x.double(), words.double(), mask)
    with pytest.raises(ValueError, match="divisible"):
        TextGuidedCrossAttention(8, 12, heads=3)
    with pytest.raises(ValueError, match="text_channels"):
        TextGuidedCrossAttention(8, 0)


def test_intra_modal_attention_is_self_attention_of_the_image_tokens():
    block = IntraModalAttention(6, heads=2)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    assert torch.equal(block.double()(x), x)
    _randomise(block)
    B, _, H, W = x.shape
    q, k, v = (F.conv2d(x, p.weight).flatten(2).view(B, 2, 3, -1).transpose(-1, -2)
               for p in (block.q_proj, block.k_proj, block.v_proj))
    out = _softmax_attention(q, k, v)
    expect = x + F.conv2d(out.transpose(-1, -2).reshape(B, 6, H, W), block.out_proj.weight, block.out_proj.bias)
    torch.testing.assert_close(block(x), expect)


def test_word_self_attention_leaves_padded_words_alone():
    block = WordSelfAttention(12, heads=3).double()
    words, mask = _words()
    assert torch.equal(block(words, mask), words)
    _randomise(block)
    y = block(words, mask)
    assert torch.equal(y[mask], words[mask])
    qkv = words @ block.qkv.weight.T
    q, k, v = (t.view(2, 5, 3, 4).transpose(1, 2) for t in qkv.chunk(3, -1))
    out = _softmax_attention(q, k, v, mask).transpose(1, 2).reshape(2, 5, 12)
    expect = words + (out @ block.out_proj.weight.T + block.out_proj.bias).masked_fill(mask[..., None], 0.0)
    torch.testing.assert_close(y, expect)


def test_text_conditioning_composes_its_parts_and_starts_as_the_identity():
    block = TextConditioning(8, 12, heads=2, intra_text=True, intra_image=True).double()
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    words, mask = _words()
    assert torch.equal(block(x, words, mask), x)
    for part in (block.cross, block.word_attn, block.image_attn):
        _randomise(part)
    expect = block.cross(block.image_attn(x), block.word_attn(words, mask), mask)
    torch.testing.assert_close(block(x, words, mask), expect)
    assert TextConditioning(8, 12, intra_text=False).word_attn is None


# --------------------------------------------------------------------------- fusion (IFA)
def test_pooled_words_is_the_mean_of_the_unpadded_words():
    words, mask = _words(padded=((1, 3), (0, 0)))
    pooled = pooled_words(words, mask)
    assert torch.equal(pooled[0], torch.zeros(12, dtype=torch.float64))  # all padded
    torch.testing.assert_close(pooled[1], words[1, :3].mean(0))


@pytest.mark.parametrize("text", [False, True])
def test_channel_attention_matches_its_definition(text):
    ca = ChannelAttention(16, reduction=4, text_channels=12 if text else None).double()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    words, mask = _words()
    z = x.mean((2, 3))
    if text:
        z = torch.cat([z, pooled_words(words, mask) @ ca.text.text_proj.weight.T + ca.text.text_proj.bias], 1)
    gate = torch.sigmoid(F.linear(F.relu(F.linear(z, ca.fc1.weight, ca.fc1.bias)), ca.fc2.weight, ca.fc2.bias))
    y = ca(x, words, mask) if text else ca(x)
    torch.testing.assert_close(y, x * gate[:, :, None, None])


def test_pixel_attention_matches_its_definition():
    pa = PixelAttention(16, reduction=4).double()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    gate = torch.sigmoid(F.conv2d(F.relu(F.conv2d(x, pa.conv1.weight, pa.conv1.bias)), pa.conv2.weight, pa.conv2.bias))
    assert gate.shape == (2, 1, 5, 6)
    torch.testing.assert_close(pa(x), x * gate)


@pytest.mark.parametrize("text", [False, True])
def test_cross_layer_fusion_matches_its_definition(text):
    cafb = CrossLayerAttentionFusion([8, 16, 32], 8, text_channels=12 if text else None).double()
    feats = [torch.randn(2, 8, 16, 14, dtype=torch.float64), torch.randn(2, 16, 8, 7, dtype=torch.float64),
             torch.randn(2, 32, 4, 3, dtype=torch.float64)]
    words, mask = _words()
    levels = [F.interpolate(F.conv2d(f, p.weight, p.bias), size=(16, 14), mode="bilinear", align_corners=False)
              for f, p in zip(feats, cafb.proj)]
    z = sum(g.mean((2, 3)) for g in levels)
    if text:
        z = torch.cat([z, F.linear(pooled_words(words, mask), cafb.text.text_proj.weight, cafb.text.text_proj.bias)], 1)
    z = F.relu(F.linear(z, cafb.squeeze.weight, cafb.squeeze.bias))
    a = F.linear(z, cafb.select.weight, cafb.select.bias).view(2, 3, 8).softmax(1)
    expect = sum(a[:, i, :, None, None] * levels[i] for i in range(3))
    got = cafb(feats, words, mask) if text else cafb(feats)
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(a.sum(1), torch.ones(2, 8, dtype=torch.float64))
    assert cafb(feats, words, mask, size=(5, 4)).shape == (2, 8, 5, 4) if text else True


def test_information_fusion_attention_runs_and_trains():
    ifa = InformationFusionAttention([8, 16], 8, text_channels=12)
    feats = [torch.randn(2, 8, 8, 8, requires_grad=True), torch.randn(2, 16, 4, 4, requires_grad=True)]
    words, mask = _words(dtype=torch.float32)
    y = ifa(feats, words, mask)
    assert y.shape == (2, 8, 8, 8)
    fused = ifa.fusion(feats, words, mask)
    torch.testing.assert_close(y, fused + ifa.pixel(ifa.channel(fused, words, mask)))
    y.square().mean().backward()
    assert all(p.grad is not None for p in ifa.parameters())
    assert all(f.grad is not None for f in feats)


def test_fusion_bad_inputs():
    with pytest.raises(ValueError, match="at least two levels"):
        CrossLayerAttentionFusion([8], 8)
    cafb = CrossLayerAttentionFusion([8, 16], 8, text_channels=12)
    with pytest.raises(ValueError, match="list of 2 tensors"):
        cafb([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match=r"features\[1\] must be"):
        cafb([torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match="pass words"):
        cafb([torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2)])
    with pytest.raises(ValueError, match="without text_channels"):
        ChannelAttention(8)(torch.randn(1, 8, 2, 2), torch.randn(1, 3, 12))
    with pytest.raises(ValueError, match="reduction"):
        PixelAttention(8, reduction=0)


@pytest.mark.parametrize("which", ["cross", "intra", "ifa"])
def test_text_modules_compile_fullgraph(which):
    torch._dynamo.reset()
    words, mask = _words(dtype=torch.float32)
    if which == "cross":
        block = _randomise(TextConditioning(8, 12, heads=2))
        args = (torch.randn(2, 8, 6, 5), words, mask)
    elif which == "intra":
        block = _randomise(IntraModalAttention(8, heads=2))
        args = (torch.randn(2, 8, 6, 5),)
    else:
        block = InformationFusionAttention([8, 16], 8, text_channels=12)
        args = ([torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)], words, mask)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), block(*args))
