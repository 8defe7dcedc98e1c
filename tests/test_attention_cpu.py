"""The memory-linear CPU path of masked_cross_attention (ssattn.ops.attention_cpu): accuracy, memory, dispatch."""

import warnings

import pytest
import torch

import ssattn
from ssattn import reference as ref
from ssattn.ops import attention_cpu
from tests._accuracy import assert_accurate, assert_grads_accurate

f64 = torch.float64


def _case(B, h, nq, nk, d, dtype, pad_fraction=0.3):
    q64, k64, v64 = (torch.randn(B, h, n, d, dtype=f64) for n in (nq, nk, nk))
    w64 = torch.rand(B, nk, dtype=f64)
    pad = torch.rand(B, nk) < pad_fraction if pad_fraction else None
    if pad is not None:
        pad[:, 0] = False
    inputs64 = [t.requires_grad_() for t in (q64, k64, v64, w64)]
    lowp = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    lowp_ref = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    return inputs64, lowp, lowp_ref, pad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nq,nk", [(1, 1), (7, 97), (113, 33), (5, 255 * 257)])
@pytest.mark.parametrize("scale", [None, 0.0, -0.7])
def test_cpu_path_by_accuracy_rule_with_gradients(dtype, nq, nk, scale):
    B, h, d = 2, 2, 8
    inputs64, lowp, lowp_ref, pad = _case(B, h, nq, nk, d, dtype)
    scale = d ** -0.5 if scale is None else scale
    out64 = ref.masked_cross_attention(*inputs64, pad, scale)
    out_ref = ref.masked_cross_attention(*lowp_ref, pad, scale)
    out = attention_cpu.masked_attention_cpu(*lowp, pad, scale)
    assert out.dtype == dtype
    assert_accurate(out, out_ref, out64, name="out")
    assert_grads_accurate(out, out_ref, out64, lowp, lowp_ref, inputs64)


def test_cpu_path_without_weight_or_mask_and_in_float64():
    inputs64, *_ = _case(1, 3, 17, 29, 5, f64, pad_fraction=0)
    q, k, v, _ = inputs64
    out = attention_cpu.masked_attention_cpu(q, k, v, None, None, 0.4)
    expected = ref.masked_cross_attention(q, k, v, None, None, 0.4)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cpu_path_takes_the_modules_strided_views():
    B, h, d, H, W = 2, 2, 4, 5, 3
    feats = torch.randn(B, h * d, H, W)
    q = feats.view(B, h, d, H * W).transpose(-1, -2)  # the head view SemanticCrossAttention makes: no copy
    k = torch.randn(B, H * W, h, d).transpose(1, 2)
    v = torch.randn(B, h, d, H * W).transpose(-1, -2).to(memory_format=torch.contiguous_format)
    w = torch.rand(B, H * W)
    out = attention_cpu.masked_attention_cpu(q, k, v, w, None, 0.5)
    torch.testing.assert_close(out, ref.masked_cross_attention(q, k, v, w, None, 0.5))


def test_cpu_path_fully_padded_batch_gives_zeros_and_zero_gradients():
    q, k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))
    w = torch.rand(2, 5, requires_grad=True)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0] = True
    pad[1, 2] = True
    out = attention_cpu.masked_attention_cpu(q, k, v, w, pad, 0.5)
    torch.testing.assert_close(out, ref.masked_cross_attention(q, k, v, w, pad, 0.5))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    for t in (q, k, v, w):
        assert torch.isfinite(t.grad).all() and torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))


def _largest_allocation(fn) -> int:
    """The largest single allocation (bytes) any op makes while fn runs, from torch's profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_cpu_path_memory_is_linear_in_n_forward_and_backward():
    """No op of forward or backward allocates a score-sized buffer, and the largest allocation grows at most
    linearly in N (4x N: at most 4x, where a score matrix grows 16x)."""
    def step(f, n, d=16):
        q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
        w = torch.rand(1, n, requires_grad=True)
        pad = torch.rand(1, n) < 0.2
        out = f(q, k, v, w, pad, 0.3)
        torch.autograd.grad(out.square().sum(), (q, k, v, w))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the profiler's own notices
        assert _largest_allocation(lambda: step(ref.masked_cross_attention, 1024)) >= 1024 * 1024 * 4  # seen
        small = _largest_allocation(lambda: step(attention_cpu.masked_attention_cpu, 1024))
        large = _largest_allocation(lambda: step(attention_cpu.masked_attention_cpu, 4096))
    assert large < 4096 * 4096 * 4 // 16
    assert large <= 4 * small


def test_auto_on_cpu_takes_the_linear_path_above_the_threshold(monkeypatch):
    q, k, v = (torch.randn(2, 2, 9, 4) for _ in range(3))
    w = torch.rand(2, 9)
    calls = []
    real = attention_cpu.masked_attention_cpu
    monkeypatch.setattr(attention_cpu, "masked_attention_cpu", lambda *a: (calls.append(1), real(*a))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = ssattn.masked_cross_attention(q, k, v, w)  # 2*2*9*9 scores: below the threshold
        assert not calls
        monkeypatch.setattr(attention_cpu, "AUTO_MIN_SCORE_BYTES", 2 * 2 * 9 * 9 * 4 - 1)
        large = ssattn.masked_cross_attention(q, k, v, w)
        assert len(calls) == 1
        ssattn.masked_cross_attention(q, k, v, w, backend=attention_cpu.BACKEND)  # by name: at any size
        assert len(calls) == 2
        ssattn.masked_cross_attention(q, k, v, w, backend="reference")
        assert len(calls) == 2
    torch.testing.assert_close(large, small)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_on_cpu_takes_the_linear_path_for_half_precision_at_any_size(monkeypatch, dtype):
    q, k, v = (torch.randn(2, 2, 9, 4, dtype=dtype) for _ in range(3))
    calls = []
    real = attention_cpu.masked_attention_cpu
    monkeypatch.setattr(attention_cpu, "masked_attention_cpu", lambda *a: (calls.append(1), real(*a))[1])
    out = ssattn.masked_cross_attention(q, k, v, torch.rand(2, 9))  # far below the fp32 threshold
    assert len(calls) == 1 and out.dtype == dtype


def test_module_and_compile_use_the_cpu_path(monkeypatch):
    monkeypatch.setattr(attention_cpu, "AUTO_MIN_SCORE_BYTES", 0)
    torch._dynamo.reset()
    block = ssattn.SemanticCrossAttention(8, 6, heads=2)
    with torch.no_grad():
        block.out_proj.weight.normal_()
    dec, enc, g = torch.randn(2, 8, 5, 7), torch.randn(2, 6, 3, 4), torch.rand(2, 1, 5, 7)
    expected = ssattn.SemanticCrossAttention(8, 6, heads=2, backend="reference")
    expected.load_state_dict(block.state_dict())
    torch.testing.assert_close(block(dec, enc, g), expected(dec, enc, g))
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(dec, enc, g)
    torch.testing.assert_close(out, expected(dec, enc, g))
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())
