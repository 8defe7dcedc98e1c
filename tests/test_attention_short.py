"""The short-key kernels (ssattn.kernels.attention_short, backend "triton-short", Nk <= 128) against the reference.

Image-word cross-attention: queries from an image feature (Nq = H*W), keys and
values from L <= 77 word features. On CPU the kernels run under the Triton
interpreter (tests/conftest.py) on small shapes. Every case checks the output
and every gradient (dq, dk, dv, dweight) against the float64 reference by the
accuracy rule (tests/_accuracy.py), as tests/test_attention_triton.py does for
the general kernels, whose helpers this file reuses.
"""

from __future__ import annotations

import pytest
import torch

import ssattn
from ssattn import _backends, functional
from ssattn import reference as ref
from ssattn.ops import attention as attn_ops
from tests._poison import PoisonEmpty
from tests.test_attention_triton import _CopyRecorder, check_against_reference, fast_fn, make_inputs, run_attention

short = _backends.kernel_module("attention_short")
pytestmark = pytest.mark.skipif(
    short is None or not (torch.cuda.is_available() or _backends.triton_interpreting()),
    reason="Triton short-key attention kernels cannot run here",
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHORT = attn_ops.SHORT
FAST_OP = torch.ops.ssattn.masked_attention_fwd
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


def check(q, k, v, w, kpm, do, **kwargs):
    return check_against_reference(q, k, v, w, kpm, do, backend=SHORT, **kwargs)


def padding(B, nk, p=0.3):
    kpm = torch.rand(B, nk, device=DEV) < p
    kpm[:, -1] = False  # one key left per batch; fully padded batches have their own test
    return kpm


def text_views(B, h, d, H, W, L, dtype, fmt=torch.contiguous_format, dv=None):
    """The views the text module builds: q a head view of a 1x1-conv projection (B, h*d, H, W), k and v head
    views (B, L, h*d).view(B, L, h, d).transpose(1, 2) of Linear projections of the words."""
    dv = d if dv is None else dv
    x = torch.randn(B, h * d, H, W, device=DEV).to(dtype).contiguous(memory_format=fmt)
    q = x.view(B, h, d, H * W).transpose(-1, -2)
    k = torch.randn(B, L, h * d, device=DEV).to(dtype).view(B, L, h, d).transpose(1, 2)
    v = torch.randn(B, L, h * dv, device=DEV).to(dtype).view(B, L, h, dv).transpose(1, 2)
    return q, k, v


# --------------------------------------------------------------------------- accuracy
CASES = [  # B, h, nq, nk, d, dtype, weight, padded: odd Nq, L in 1, 7, 16, 77, 128, odd head dims
    (1, 1, 1, 1, 16, f32, True, False),
    (2, 1, 7, 7, 1, f32, True, True),
    (1, 2, 97, 16, 24, f32, False, True),
    (1, 1, 97, 128, 72, f32, True, False),
    (2, 1, 113, 77, 40, f16, True, True),
    (1, 1, 113, 7, 32, f16, False, False),
    (2, 1, 7, 77, 80, bf16, True, True),
]


@pytest.mark.parametrize("deterministic", [True, False], ids=["partials", "atomics"])
@pytest.mark.parametrize("B,h,nq,nk,d,dtype,weight,padded", CASES)
def test_matches_reference(B, h, nq, nk, d, dtype, weight, padded, deterministic):
    kpm = padding(B, nk) if padded else None
    check(*make_inputs(B, h, nq, nk, d, dtype, weight=weight, kpm=kpm), deterministic=deterministic)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_image_and_word_views_out_in_q_layout(fmt):
    """q from an NCHW / channels-last projection, k and v non-contiguous Linear head views, d != dv;
    out comes back in q's layout, so (B, h*d, H, W) is a view in the image's memory format."""
    B, h, d, H, W, L = 2, 2, 16, 9, 13, 77
    q, k, v = text_views(B, h, d, H, W, L, f32, fmt)
    assert not k.is_contiguous() and not q.is_contiguous()
    w, kpm = torch.rand(B, L, device=DEV), padding(B, L)
    out, _ = check(q, k, v, w, kpm, torch.randn(B, h, H * W, d, device=DEV))
    assert out.stride() == q.stride()
    assert out.transpose(-1, -2).reshape(B, h * d, H, W).is_contiguous(memory_format=fmt)
    q, k, v = text_views(1, 1, 24, 5, 7, 7, f32, fmt, dv=16)  # v's head dim differs: out contiguous
    check(q, k, v, None, None, torch.randn(1, 1, 35, 16, device=DEV))


def test_large_odd_image(monkeypatch):
    """A 255x257 image (Nq = 65535: the last query block partial) against 7 words, fwd + bwd. Under the
    interpreter the query blocks are raised to 1024 rows (64 programs, not 1024), to keep it affordable."""
    if short.INTERPRET:
        config = short._config
        monkeypatch.setattr(short, "_config", lambda *a: {**config(*a), "BLOCK_M": 1024})
    B, h, d, H, W, L = 1, 1, 8, 255, 257, 7
    q, k, v = text_views(B, h, d, H, W, L, f32, torch.channels_last)
    w, kpm = torch.rand(B, L, device=DEV), padding(B, L)
    check(q, k, v, w, kpm, torch.randn(B, h, H * W, d, device=DEV))


def test_large_inputs_float32():
    """x100 inputs: base-2 logits of ~1e4 (one-hot rows); the backward must get the forward's P exactly."""
    q, k, v, w, kpm, do = make_inputs(1, 2, 33, 77, 16, f32, gain=100.0)
    check(q, k, v, w, kpm, do, scale=0.25, precision="ieee")


@pytest.mark.parametrize("scale", [0.0, -0.0, -0.3])
def test_zero_and_negative_scales(scale):
    """Masks after scaling: scale 0 / -0.0 give uniform attention over the unpadded keys, no NaN."""
    kpm = padding(2, 20)
    q, k, v, w, _, do = make_inputs(2, 1, 20, 20, 16, f16, kpm=kpm)
    _, grads = check(q, k, v, w, kpm, do, scale=scale)
    if scale == 0:
        assert torch.equal(grads[0], torch.zeros_like(grads[0])) and torch.equal(grads[1], torch.zeros_like(grads[1]))


def test_single_key_gives_exactly_zero_dq_dk():
    q, k, v, w, kpm, do = make_inputs(2, 2, 97, 1, 16, f32)
    _, grads = check(q, k, v, w, kpm, do)
    assert torch.equal(grads[0], torch.zeros_like(grads[0])) and torch.equal(grads[1], torch.zeros_like(grads[1]))


def test_fully_padded_rows_give_zeros_and_the_stats_contract():
    """A batch whose words are all padded: out 0, zero gradients, +inf statistics; elsewhere the statistics
    equal the general kernels' (the op's contract: the same fake kernel and backward serve both)."""
    B, nk = 3, 77
    kpm = torch.zeros(B, nk, dtype=torch.bool, device=DEV)
    kpm[0] = True
    kpm[0, 70] = False  # one word left
    kpm[1] = True  # all padded
    q, k, v, w, _, do = make_inputs(B, 1, 9, nk, 16, f32, kpm=kpm)
    out, grads = check(q, k, v, w, kpm, do)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for g in grads:
        assert torch.isfinite(g).all() and torch.equal(g[1], torch.zeros_like(g[1]))
    torch.testing.assert_close(out[0, 0], (v[0, 0, 70] * w[0, 70]).expand(9, 16))
    _, stats = FAST_OP(q, k, v, w, kpm, 0.25, SHORT, "ieee", False)
    _, general = FAST_OP(q, k, v, w, kpm, 0.25, "triton", "ieee", False)
    assert torch.isinf(stats[1]).all() and (stats[1] > 0).all()
    torch.testing.assert_close(stats, general, rtol=0, atol=1e-5)


def test_every_output_element_is_written():
    """Poison every buffer the launchers allocate (dq, dk, dv, out, stats, the partial sums)."""
    q, k, v = text_views(2, 1, 24, 7, 11, 77, f32, torch.channels_last, dv=20)
    w, kpm = torch.rand(2, 77, device=DEV), padding(2, 77)
    for deterministic in (True, False):
        with PoisonEmpty() as mode:
            check(q, k, v, w, kpm, torch.randn(2, 1, 77, 20, device=DEV), deterministic=deterministic)
        assert mode.poisoned > 0


def test_deterministic_mode_gives_identical_bits():
    q, k, v, w, kpm, do = make_inputs(1, 1, 200, 77, 16, f32, kpm=padding(1, 77))
    runs = [run_attention(fast_fn("ieee", True, SHORT), q, k, v, w, kpm, do, 0.25) for _ in range(2)]
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert short.splits_for(1, 200, 64) > 1  # the sums over several splits, each of several blocks, are checked


# --------------------------------------------------------------------------- the module's path
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_text_module_path_makes_no_copies(monkeypatch, fmt):
    """A text cross-attention built as the module builds it (1x1-conv q, Linear k/v over words, the output seen
    as (B, h*d, H, W) for a 1x1-conv W_o): fwd + bwd copy none of q, k, v, out or their gradients."""
    recorder = _CopyRecorder()
    recorder.ignore_inside(monkeypatch, short, "forward", "backward")
    B, C, Ct, h, H, W, L = 2, 8, 12, 2, 9, 7, 7
    q_proj = torch.nn.Conv2d(C, C, 1, bias=False).to(DEV, memory_format=fmt)
    k_proj, v_proj = torch.nn.Linear(Ct, C, bias=False).to(DEV), torch.nn.Linear(Ct, C, bias=False).to(DEV)
    out_proj = torch.nn.Conv2d(C, C, 1).to(DEV, memory_format=fmt)
    x = torch.randn(B, C, H, W, device=DEV).contiguous(memory_format=fmt).requires_grad_()
    words = torch.randn(B, L, Ct, device=DEV, requires_grad=True)
    weight = torch.rand(B, L, device=DEV, requires_grad=True)
    kpm = padding(B, L)
    with recorder:
        q = q_proj(x).view(B, h, C // h, H * W).transpose(-1, -2)
        k = k_proj(words).view(B, L, h, C // h).transpose(1, 2)
        v = v_proj(words).view(B, L, h, C // h).transpose(1, 2)
        out = functional._attention(q, k, v, weight, kpm, (C // h) ** -0.5, SHORT)
        y = x + out_proj(out.transpose(-1, -2).reshape(B, C, H * W).view(B, C, H, W))
        y.backward(torch.randn_like(y))
    assert recorder.copies == []
    assert y.is_contiguous(memory_format=fmt)
    assert all(t.grad is not None for t in (x, words, weight))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_text_guided_cross_attention_module_on_the_short_kernels(monkeypatch, fmt):
    """ssattn.text's TextGuidedCrossAttention with backend="triton-short": no copies in fwd + bwd, and the
    output and every gradient as with the reference backend."""
    from ssattn.text.modules import TextGuidedCrossAttention

    recorder = _CopyRecorder()
    recorder.ignore_inside(monkeypatch, short, "forward", "backward")
    block = TextGuidedCrossAttention(8, 12, heads=2, backend=SHORT).to(DEV, memory_format=fmt)
    torch.nn.init.normal_(block.out_proj.weight, std=0.3)
    x = torch.randn(2, 8, 9, 7, device=DEV).contiguous(memory_format=fmt).requires_grad_()
    words = torch.randn(2, 7, 12, device=DEV, requires_grad=True)
    weight = torch.rand(2, 7, device=DEV, requires_grad=True)
    mask = padding(2, 7)
    go = torch.randn(2, 8, 9, 7, device=DEV).contiguous(memory_format=fmt)
    with recorder:
        y = block(x, words, mask, weight)
        grads = torch.autograd.grad(y, (x, words, weight, *block.parameters()), go)
    assert recorder.copies == []
    assert y.is_contiguous(memory_format=fmt)
    block.backend = "reference"
    y_ref = block(x, words, mask, weight)
    grads_ref = torch.autograd.grad(y_ref, (x, words, weight, *block.parameters()), go)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- registration and choice
def test_auto_picks_the_short_kernels_for_few_keys_on_cuda():
    for dtype in (f16, bf16, f32):
        for nk in (1, 77, 128):
            assert attn_ops.choose("auto", "cuda", dtype, nk) == SHORT
        assert attn_ops.choose("auto", "cuda", dtype, 129) == "triton"
        assert attn_ops.choose("triton", "cuda", dtype, 7) == "triton"  # a name is obeyed
        assert attn_ops.choose(SHORT, "cuda", dtype, 7) == SHORT
    assert attn_ops.choose("auto", "cuda", torch.float64, 7) == "reference"
    assert attn_ops.choose(SHORT, DEV, torch.float64, 7) == "reference"  # as "triton" by name does
    if DEV == "cpu":  # never the interpreter by "auto"
        assert attn_ops.choose("auto", "cpu", f32, 7) not in ("triton", SHORT)


def test_too_many_keys_are_refused_clearly():
    q, k, v, w, kpm, _ = make_inputs(1, 1, 4, 129, 16, f32)
    with pytest.raises(ValueError, match=r"backend 'triton-short' takes at most 128 keys, got k with Nk = 129"):
        ssattn.masked_cross_attention(q, k, v, w, backend=SHORT)
    with pytest.raises(ValueError, match=r"at most 128 keys, got k with Nk = 129"):
        short.forward(q, k, v, w, None, 0.25)
    with pytest.raises(ValueError, match=r"at most 128 keys"):
        FAST_OP(q, k, v, w, None, 0.25, SHORT, "ieee", False)
    with pytest.raises(TypeError, match=r"float16, bfloat16 or float32"):
        short.forward(q.double(), k[:, :, :7].double(), k[:, :, :7].double(), None, None, 0.25)


def test_public_api_runs_the_short_kernels():
    q, k, v = text_views(1, 2, 16, 4, 5, 77, f32)
    w = torch.rand(1, 77, device=DEV)
    out = ssattn.masked_cross_attention(q, k, v, w, backend=SHORT)
    torch.testing.assert_close(out, ref.masked_cross_attention(q, k, v, w))


def test_opcheck():
    q, k, v = text_views(1, 2, 16, 3, 3, 9, f32, torch.channels_last)
    w = torch.rand(1, 9, device=DEV)
    kpm = torch.zeros(1, 9, dtype=torch.bool, device=DEV)
    kpm[0, 3] = True
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, w)]
    torch.library.opcheck(FAST_OP, (*leaves, kpm, 0.25, SHORT, "ieee", False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, stats = FAST_OP(q, k, v, w, kpm, 0.25, SHORT, "ieee", False)
    torch.library.opcheck(torch.ops.ssattn.masked_attention_bwd,
                          (torch.randn_like(out), q, k, v, w, kpm, out, stats, 0.25, True, SHORT, "ieee", True),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_dynamic():
    """fullgraph compile with dynamic shapes (two sizes of image and sentence), fwd + bwd, equals eager."""
    torch._dynamo.reset()

    def f(q, k, v, w, kpm):
        return ssattn.masked_cross_attention(q, k, v, w, kpm, backend=SHORT) * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for nq, nk in ((20, 7), (33, 16)):
        q, k, v, w, _, do = make_inputs(1, 2, nq, nk, 16, f32)
        kpm = padding(1, nk)
        eager = run_attention(lambda q, k, v, w, kpm, s: f(q, k, v, w, kpm), q, k, v, w, kpm, do, 0.25)
        comp = run_attention(lambda q, k, v, w, kpm, s: compiled(q, k, v, w, kpm), q, k, v, w, kpm, do, 0.25)
        for a, b in zip([comp[0], *comp[1]], [eager[0], *eager[1]]):
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_the_choice_compiles_as_a_guard_on_the_key_count():
    """choose() under torch.compile(fullgraph=True, dynamic=True): the key count becomes a guard, so a
    compiled graph never keeps the short kernels for a sentence longer than 128 keys."""
    torch._dynamo.reset()

    def f(q, k):
        picked = attn_ops.choose("auto", "cuda", q.dtype, k.shape[-2]) == SHORT
        return q * (1.0 if picked else 2.0)

    compiled = torch.compile(f, backend="eager", fullgraph=True, dynamic=True)
    q = torch.ones(1, 1, 3, 4)
    for nk, factor in ((7, 1.0), (77, 1.0), (200, 2.0), (129, 2.0), (128, 1.0)):
        assert torch.equal(compiled(q, torch.ones(1, 1, nk, 4)), q * factor), nk
    torch._dynamo.reset()


# --------------------------------------------------------------------------- the benchmark script
def test_text_benchmark_script_runs_and_checks_before_timing(tmp_path):
    """benchmarks/bench_text_attention.py end to end on a tiny grid: every row checked, then timed."""
    import importlib.util
    import pathlib

    from ssattn import _checks

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_text_attention.py"
    spec = importlib.util.spec_from_file_location("bench_text_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    checks = _checks._VALUE_CHECKS
    out = tmp_path / "text.md"
    table = mod.main(["--quick", "--sides", "8", "--words", "7", "--head-dims", "16", "--dtypes", "fp32",
                      "--batch", "2", "--heads", "1", "--out", str(out)] + (["--no-general"] if DEV == "cuda" else []))
    for _, _, _, _, rows in table:
        names = {name for name, ms, note in rows if ms is not None and note.startswith("check")}
        assert {"sdpa-bool", "sdpa-float"} <= names and any(n.startswith("ssattn") for n in names), rows
    assert "| N | L | d | dtype | mode | impl | ms |" in out.read_text()
    assert _checks._VALUE_CHECKS == checks
    assert mod.roofline_bytes(1, 1, 32, 1024, 16, torch.bfloat16, "fwd") == 2 * 1024 * 32 * 2 + 2 * 16 * 32 * 2


# --------------------------------------------------------------------------- GPU sweep
GPU_CLASSES = [(bf16, d) for d in (16, 24, 32, 64, 72, 128)] + [(f16, 64), (f32, 32), (f32, 64)]
GPU_SIZES = [(1, 1), (7, 16), (97, 77), (113, 128), (4096, 77), (65535, 16), (1025, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d", GPU_CLASSES, ids=[f"{str(t).split('.')[-1]}-d{d}" for t, d in GPU_CLASSES])
def test_gpu_short_sweep(dtype, d):
    """Every size, both backward modes, text views (q channels-last or NCHW) with padding and weights; fp32
    with its default (TF32 off: ieee) dots. All failures reported together."""
    failures = []
    for i, (nq, nk) in enumerate(GPU_SIZES):
        B, h = 2, 1 + i % 2
        fmt = torch.channels_last if i % 2 else torch.contiguous_format
        q, k, v = text_views(B, h, d, nq, 1, nk, dtype, fmt)
        w, kpm = torch.rand(B, nk, device=DEV), padding(B, nk)
        try:
            check(q, k, v, w.to(dtype), kpm, torch.randn(B, h, nq, d, device=DEV).to(dtype), deterministic=i % 2 == 1,
                  precision="ieee")
        except AssertionError as exc:
            failures.append(f"nq={nq} nk={nk} h={h}: {str(exc).splitlines()[0]}")
    assert not failures, "\n".join(failures)
