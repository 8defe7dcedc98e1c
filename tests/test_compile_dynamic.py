"""torch.compile (inductor) with a second input size: each module, the reference pyramid and the drop-in.

The second call at another size recompiles with dynamic shapes, where
inductor's own adaptive_avg_pool2d lowering fails ("cannot determine truth
value of Relational"); ssattn.reference.area_resize takes its place while
compiling. Also: area_resize's compiled form equals adaptive_avg_pool2d.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssattn
from ssattn.reference import area_resize

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------- the helper itself
@pytest.mark.parametrize("src,dst", [((255, 257), (113, 7)), ((97, 1), (7, 1)), ((16, 13), (64, 40)),
                                     ((8, 8), (8, 8)), ((7, 5), (1, 1)), ((12, 12), (4, 6))])
def test_area_resize_separable_form_equals_adaptive_avg_pool2d(src, dst):
    x = torch.rand(2, 3, *src, dtype=torch.float64)
    expected = F.adaptive_avg_pool2d(x, dst)
    torch.testing.assert_close(area_resize(x, dst, separable=True), expected, rtol=0, atol=1e-14)
    assert torch.equal(area_resize(x, dst), expected)  # eager: adaptive_avg_pool2d itself
    # float32 / float16 keep their dtype and stay within their own rounding of the float64 result
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
        got = area_resize(x.to(dtype), dst, separable=True)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol)


def test_area_resize_separable_gradient_equals_adaptive_avg_pool2d():
    x = torch.rand(1, 1, 11, 9, dtype=torch.float64, requires_grad=True)
    go = torch.randn(1, 1, 4, 5, dtype=torch.float64)
    (g1,) = torch.autograd.grad(area_resize(x, (4, 5), separable=True), x, go)
    (g2,) = torch.autograd.grad(F.adaptive_avg_pool2d(x, (4, 5)), x, go)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-14)


def _two_sizes(fn, compiled, make_inputs, sizes):
    """Run compiled and eager at each size; outputs (lists or tensors) must agree."""
    for size in sizes:
        args = make_inputs(*size)
        want, got = fn(*args), compiled(*args)
        want = want if isinstance(want, (list, tuple)) else [want]
        got = got if isinstance(got, (list, tuple)) else [got]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- modules under inductor
# Two sizes: the first call compiles for static shapes, the second recompiles with dynamic ones.
SIZES = [(8, 8), (12, 10)]


def test_inductor_cross_attention_second_size():
    block = ssattn.SemanticCrossAttention(8, 6, heads=2, backend="reference")
    nn.init.normal_(block.out_proj.weight)
    compiled = torch.compile(block, backend="inductor")
    _two_sizes(block, compiled, _attention_inputs, SIZES)


def _attention_inputs(H, W):  # the guidance at the image size, the encoder feature at half of it
    return torch.randn(2, 8, H, W), torch.randn(2, 6, H // 2, W // 2), torch.rand(2, 1, H, W)


def test_compiled_cross_attention_gradients():
    # The compiled forward projects the output with a matmul instead of the 1x1 conv (an inductor
    # workaround): its gradients, checked under aot_eager (the same graph, no code generation).
    block = ssattn.SemanticCrossAttention(8, 6, heads=2, backend="reference")
    nn.init.normal_(block.out_proj.weight)
    nn.init.normal_(block.out_proj.bias)
    compiled = torch.compile(block, backend="aot_eager")
    for H, W in SIZES[1:]:  # the compiled form is what is checked; one size is enough
        dec, enc, g = _attention_inputs(H, W)
        dec.requires_grad_(True)
        got = torch.autograd.grad(compiled(dec, enc, g).square().sum(), [dec, *block.parameters()])
        want = torch.autograd.grad(block(dec, enc, g).square().sum(), [dec, *block.parameters()])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inductor_reference_guidance_pyramid_second_size():
    fn = ssattn.GuidancePyramid([(16, 16), (8, 8), (5, 3)], backend="reference")

    def pyramid(grid):
        return fn(grid)

    compiled = torch.compile(pyramid, backend="inductor")
    _two_sizes(pyramid, compiled, lambda gh, gw: (torch.rand(2, gh, gw),), [(4, 4), (6, 5)])


def test_inductor_alignment_loss_module_second_size():
    loss = ssattn.SemanticAlignmentLoss(eta=0.5, backend="reference")

    def fn(f, m):
        return loss([f], [m])

    compiled = torch.compile(fn, backend="inductor")
    _two_sizes(fn, compiled, lambda H, W: (torch.randn(2, 4, H, W), torch.rand(2, 1, H, W)), SIZES)


class _TwoScales(nn.Module):
    """The smallest encoder-decoder with a skip at half the image size (few kernels to compile)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, 8, 1))
        self.dec = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        skip = self.enc(x)  # the encoder runs first, as in any encoder-decoder
        return self.dec(x).mean(1, keepdim=True) + skip.mean()


@pytest.mark.slow  # the hooks compile several frames: the slowest test of this file (see the issue 14 report)
def test_inductor_dropin_second_size():
    ss = ssattn.semantic_sensitive(_TwoScales(), {"dec": "enc"}, heads=2, backend="reference")
    for p in ss.blocks.parameters():
        nn.init.normal_(p, std=0.2)
    compiled = torch.compile(ss, backend="inductor")

    def fn_eager(x, g):
        return ss(x, guidance=g)

    def fn_compiled(x, g):
        return compiled(x, guidance=g)

    _two_sizes(fn_eager, fn_compiled, lambda H, W: (torch.randn(2, 3, H, W), torch.rand(2, 1, H, W)),
               SIZES)
