"""nn.Module wrappers: identity at construction, agreement with the functional API, dtypes, layouts, devices."""

import copy

import pytest
import torch
import torch.nn.functional as F

import ssattn
from ssattn import reference as ref


def _inputs(B=2, Cd=8, Ce=6, H=8, W=7, He=4, We=5, dtype=torch.float32):
    return (torch.randn(B, Cd, H, W, dtype=dtype), torch.randn(B, Ce, He, We, dtype=dtype),
            torch.rand(B, 1, 16, 13, dtype=dtype))


def _randomise(block):
    torch.nn.init.normal_(block.out_proj.weight, std=0.3)
    torch.nn.init.normal_(block.out_proj.bias, std=0.3)
    return block


def _manual(block, dec, enc, guidance):
    """SPEC 2 written out: projections, map-weighted K and V, per-head softmax, residual."""
    B, _, H, W = dec.shape
    h, d = block.heads, block.head_dim
    m = F.adaptive_avg_pool2d(guidance, enc.shape[-2:]).flatten(1)
    q = F.conv2d(dec, block.q_proj.weight).flatten(2).view(B, h, d, -1).transpose(-1, -2)
    k = F.conv2d(enc * m.view(B, 1, *enc.shape[-2:]), block.k_proj.weight).flatten(2).view(B, h, d, -1).transpose(-1, -2)
    v = F.conv2d(enc * m.view(B, 1, *enc.shape[-2:]), block.v_proj.weight).flatten(2).view(B, h, d, -1).transpose(-1, -2)
    out = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, -1) @ v
    return dec + block.out_proj(out.transpose(-1, -2).reshape(B, h * d, H, W))


def test_new_cross_attention_is_the_identity():
    block = ssattn.SemanticCrossAttention(8, 6, heads=2)
    dec, enc, g = _inputs()
    assert torch.equal(block(dec, enc, g), dec)


@pytest.mark.parametrize("heads,head_dim", [(1, None), (2, None), (4, 3)])
def test_cross_attention_matches_spec(heads, head_dim):
    block = _randomise(ssattn.SemanticCrossAttention(8, 6, heads=heads, head_dim=head_dim)).double()
    dec, enc, g = _inputs(dtype=torch.float64)
    torch.testing.assert_close(block(dec, enc, g), _manual(block, dec, enc, g))


def test_cross_attention_gradients_reach_every_parameter_and_input():
    block = _randomise(ssattn.SemanticCrossAttention(8, 6, heads=2)).double()
    dec, enc, g = (t.requires_grad_() for t in _inputs(dtype=torch.float64))
    block(dec, enc, g).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for t in (dec, enc, g):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_cross_attention_gradcheck():
    block = _randomise(ssattn.SemanticCrossAttention(4, 3, heads=2)).double()
    dec, enc, g = (t.requires_grad_() for t in _inputs(B=1, Cd=4, Ce=3, H=3, W=2, He=2, We=3, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: block(a, b, c), (dec, enc, g))


@pytest.mark.parametrize("B", [1, 3])
def test_cross_attention_channels_last_equals_nchw(B):
    block = _randomise(ssattn.SemanticCrossAttention(8, 6, heads=2))
    dec, enc, g = _inputs(B=B)
    want = block(dec, enc, g)
    cl = block.to(memory_format=torch.channels_last)
    got = cl(dec.to(memory_format=torch.channels_last), enc.to(memory_format=torch.channels_last), g)
    torch.testing.assert_close(got, want)


def test_cross_attention_to_dtype_and_float64():
    block = _randomise(ssattn.SemanticCrossAttention(8, 6))
    dec, enc, g = _inputs()
    y32 = block(dec, enc, g)
    b64 = copy.deepcopy(block).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in b64.parameters())
    y64 = b64(dec.double(), enc.double(), g.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y32.double(), y64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_attention_under_autocast(dtype):
    block = _randomise(ssattn.SemanticCrossAttention(8, 6, heads=2))
    dec, enc, g = _inputs()
    with torch.autocast("cpu", dtype=dtype):
        y = block(dec, enc, g)
    assert y.dtype == torch.float32  # residual keeps the decoder's dtype
    torch.testing.assert_close(y, block(dec, enc, g), atol=0.05, rtol=0.05)
    y.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_cross_attention_errors():
    block = ssattn.SemanticCrossAttention(8, 6)
    dec, enc, g = _inputs()
    with pytest.raises(ValueError, match=r"dec must have 8 channels"):
        block(dec[:, :4], enc, g)
    with pytest.raises(ValueError, match=r"enc must have 6 channels"):
        block(dec, enc[:, :5], g)
    with pytest.raises(ValueError, match=r"must share the batch size"):
        block(dec, enc[:1], g)
    with pytest.raises(ValueError, match=r"guidance must have one channel"):
        block(dec, enc, g.expand(2, 3, 16, 13))
    with pytest.raises(ValueError, match=r"guidance must have 4 dimensions"):
        block(dec, enc, g[:, 0])
    with pytest.raises(ValueError, match=r"guidance must have values in \[0, 1\]"):
        block(dec, enc, g * 255)
    with pytest.raises(ValueError, match=r"guidance is on meta but dec is on cpu"):
        block(dec, enc, g.to("meta"))
    with pytest.raises(TypeError, match=r"dec must have a floating dtype"):
        block(dec.long(), enc, g)
    with pytest.raises(ValueError, match=r"dec_channels \(8\) must be divisible by heads \(3\)"):
        ssattn.SemanticCrossAttention(8, 6, heads=3)
    with pytest.raises(ValueError, match=r"heads must be a positive integer"):
        ssattn.SemanticCrossAttention(8, 6, heads=0)


def test_guidance_pyramid_module():
    mod = ssattn.GuidancePyramid([(20, 18), (10, 9), (5, 4)], gamma=3.0, delta=0.1, renormalize=True)
    grid = torch.rand(2, 6, 6)
    for a, b in zip(mod(grid), ref.guidance_pyramid(grid, [(20, 18), (10, 9), (5, 4)], gamma=3.0, delta=0.1,
                                                    renormalize=True)):
        torch.testing.assert_close(a, b)
    feats, text = torch.randn(2, 36, 5), torch.randn(5)
    got = mod(feats, text=text, grid_size=(6, 6))
    want = ref.guidance_pyramid(feats, mod.sizes, gamma=3.0, delta=0.1, text=text, grid_size=(6, 6), renormalize=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"gamma must be a finite number >= 1"):
        ssattn.GuidancePyramid([(4, 4)], gamma=0.5)
    with pytest.raises(ValueError, match=r"sizes\[0\] must be a pair"):
        ssattn.GuidancePyramid([(4, -1)])


def test_alignment_loss_module_applies_lambda():
    fs = [torch.randn(2, c, s, s, requires_grad=True) for c, s in ((4, 8), (8, 4))]
    ms = [torch.rand(2, 1, s, s) for s in (8, 4)]
    mod = ssattn.SemanticAlignmentLoss(eta=0.5, level_weights=[1.0, 0.5], reduction="sum", backend="reference")
    assert mod.weight == 0.1
    torch.testing.assert_close(mod(fs, ms), 0.1 * ref.alignment_loss(fs, ms, eta=0.5, weights=[1.0, 0.5], reduction="sum"))
    mod(fs, ms).backward()
    assert all(f.grad is not None for f in fs)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        ssattn.SemanticAlignmentLoss(reduction="none")
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0"):
        ssattn.SemanticAlignmentLoss(eta=-0.1)


def test_alignment_loss_module_backward_has_no_rescaling_pass():
    """lambda is folded into the level weights: the fused op's saved dF goes to autograd unscaled."""
    from ssattn.ops import alignment as align_ops

    if not align_ops.available("cpu"):
        pytest.skip("ssattn._C is not built")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Muls(TorchDispatchMode):
        shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name == "aten::mul":
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    fs = [torch.randn(2, c, s, s, requires_grad=True) for c, s in ((4, 8), (8, 4))]
    ms = [torch.rand(2, 1, s, s) for s in (8, 4)]
    mod = ssattn.SemanticAlignmentLoss(eta=0.5, level_weights=[1.0, 0.5], backend="native")
    loss = mod(fs, ms) + 0.0 * fs[0].sum()  # a training loss: a sum containing the term
    with Muls() as muls:
        loss.backward()
    assert not any(shape in [tuple(f.shape) for f in fs] for shape in muls.shapes), muls.shapes
    truth = [f.detach().double().requires_grad_() for f in fs]
    (0.1 * ref.alignment_loss(truth, [m.double() for m in ms], eta=0.5, weights=[1.0, 0.5])).backward()
    for f, t in zip(fs, truth):
        torch.testing.assert_close(f.grad.double(), t.grad)
    with pytest.raises(ValueError, match=r"level_weights has 2 values but 1 levels"):
        mod(fs[:1], ms[:1])


def test_modules_move_with_to_and_keep_working_in_float64():
    block = ssattn.SemanticCrossAttention(8, 6, heads=2).to(torch.float64)
    dec, enc, g = _inputs(dtype=torch.float64)
    assert torch.equal(block(dec, enc, g), dec)
    sd = block.state_dict()
    assert set(sd) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "out_proj.bias"}
