"""The compiled alignment loss ssattn::alignment_loss_fused (ssattn._C) against the reference.

Both forms (docs/operations.md section 3: "paper" and "normalized"). Loss and
both gradients are checked by the accuracy rule (float64 truth), over several
levels of different shapes, awkward sizes, layouts, dtypes, weights, eta and
reductions; plus gradcheck, double backward, determinism, opcheck,
torch.compile, empty levels, meta tensors, the normalized form's scale
invariance and lower bound, and the one-warning fallback when the extension
is missing. The paper form's single pass over F (loss, dF and dM together)
is checked by the kernel's own count of passes and by the ops a forward and
backward dispatch, never by timing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ssattn
from ssattn import _backends
from ssattn import reference as ref
from tests._accuracy import assert_accurate

NATIVE = _backends.native_module()
needs_native = pytest.mark.skipif(NATIVE is None, reason="ssattn._C is not built")
HAS_CUDA = torch.cuda.is_available()
f64 = torch.float64

FORMS = ["paper", "normalized"]
# (B, C, H, W) per level: different shapes and channel counts, awkward sizes.
LEVELS = [(2, 7, 9, 11), (2, 1, 1, 1), (2, 3, 97, 5), (2, 16, 4, 4)]
BIG = [(1, 2, 255, 257), (1, 9, 7, 1)]
# NCHW rows are walked kBlock = 256 pixels at a time (after short rows are folded together, up to
# 1024) and kGroup = 4 channels at a time (csrc/alignment_cpu.cpp): rows of several blocks with a
# partial last one, channel counts on and off a multiple of 4.
WIDE = [(2, 8, 3, 300), (1, 6, 7, 700), (2, 4, 1, 513), (1, 13, 2, 1030)]
# The CPU benchmark's problem (benchmarks/bench_alignment.py, issue 24): four decoder levels at B = 4.
DECODER = [(4, 32, 64, 64), (4, 64, 32, 32), (4, 128, 16, 16), (4, 256, 8, 8)]


def _make(shapes, dtype, device="cpu", layout="nchw", map_dtype=None):
    """Features and maps in the given layout: "nchw", "channels_last" or "noncontig" (strided views)."""
    feats, maps = [], []
    for B, C, H, W in shapes:
        if layout == "noncontig":
            # Every other element along W, channels permuted in memory: no unit stride anywhere useful.
            f = torch.randn(B, H, C, 2 * W, dtype=f64, device=device)[..., ::2].permute(0, 2, 1, 3)
            m = torch.rand(B, 1, H, 3 * W, dtype=f64, device=device)[..., ::3]
        else:
            f = torch.randn(B, C, H, W, dtype=f64, device=device)
            m = torch.rand(B, 1, H, W, dtype=f64, device=device)
            if layout == "channels_last":
                f = f.contiguous(memory_format=torch.channels_last)
                m = m.contiguous(memory_format=torch.channels_last)
        feats.append(f.to(dtype))
        maps.append(m.to(map_dtype or dtype))
    return feats, maps


def _leaf(xs, dtype=None, grad=True):
    # .to() keeps strides (preserve_format) so layouts survive the dtype change.
    return [x.detach().to(dtype or x.dtype).requires_grad_(grad) for x in xs]


def _run(fn, feats, maps, grad_out=1.0, **kw):
    F, M = _leaf(feats), _leaf(maps)
    loss = fn(F, M, **kw)
    (loss * grad_out).backward() if grad_out != 1.0 else loss.backward()
    return loss.detach(), [f.grad for f in F], [m.grad for m in M]


def _native(F, M, **kw):
    return ssattn.alignment_loss(F, M, backend="native", **kw)


def _check_against_reference(feats, maps, grad_out=1.0, **kw):
    """Native vs reference in the same dtype vs reference in float64: loss, every dF, every dM."""
    loss, gf, gm = _run(_native, feats, maps, grad_out, **kw)
    rloss, rgf, rgm = _run(ref.alignment_loss, feats, maps, grad_out, **kw)
    tloss, tgf, tgm = _run(ref.alignment_loss, _leaf(feats, f64), _leaf(maps, f64), grad_out, **kw)
    half = feats[0].dtype in (torch.float16, torch.bfloat16)
    assert loss.dtype == (torch.float32 if half else rloss.dtype)
    assert_accurate(loss, rloss, tloss, name="loss")
    for i, (a, r, t, f) in enumerate(zip(gf, rgf, tgf, feats)):
        assert a.dtype == f.dtype and a.shape == f.shape
        assert_accurate(a, r, t, name=f"dF[{i}]")
    for i, (a, r, t, m) in enumerate(zip(gm, rgm, tgm, maps)):
        assert a.dtype == m.dtype and a.shape == m.shape
        assert_accurate(a, r, t, name=f"dM[{i}]")


# --------------------------------------------------------------------------- accuracy
@needs_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference(dtype, layout, reduction, form):
    feats, maps = _make(LEVELS, dtype, layout=layout)
    _check_against_reference(feats, maps, eta=0.7, weights=[1.0, 0.5, 2.0, 0.25], reduction=reduction, form=form)


@needs_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_awkward_levels(dtype, form):
    feats, maps = _make(BIG, dtype)
    _check_against_reference(feats, maps, eta=1.0, reduction="sum", form=form)


@needs_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_rows_in_channel_groups(dtype, form):
    feats, maps = _make(WIDE, dtype)
    _check_against_reference(feats, maps, eta=0.9, weights=[1.0, 2.0, 0.5, 1.5], reduction="sum", form=form)


@needs_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_decoder_levels_of_the_benchmark(layout, form):
    feats, maps = _make(DECODER, torch.float32, layout=layout)
    _check_against_reference(feats, maps, eta=1.0, reduction="mean", form=form)


@needs_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("eta", [0.0, 1.0, 3.5])
def test_eta_and_default_weights(eta, form):
    feats, maps = _make(LEVELS[:2], torch.float32, layout="channels_last")
    _check_against_reference(feats, maps, eta=eta, form=form)


@needs_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features_float32_maps(dtype, form):
    feats, maps = _make(LEVELS, dtype, map_dtype=torch.float32)
    _check_against_reference(feats, maps, eta=0.5, reduction="mean", form=form)


@needs_native
@pytest.mark.parametrize("form", FORMS)
def test_mixed_layouts_across_levels(form):
    a, am = _make(LEVELS[:2], torch.float32, layout="channels_last")
    b, bm = _make(LEVELS[2:], torch.float32, layout="noncontig")
    _check_against_reference(a + b, am + bm, eta=0.3, weights=[1, 2, 3, 4], form=form)


@needs_native
@pytest.mark.parametrize("form", FORMS)
def test_many_levels(form):
    # More levels than one CUDA launch takes (16): the CPU path must not care either.
    shapes = [(1 + i % 2, 1 + i % 5, 2 + i % 3, 3 + i % 4) for i in range(19)]
    feats, maps = _make(shapes, torch.float32)
    _check_against_reference(feats, maps, eta=0.9, weights=[0.1 * (i + 1) for i in range(19)], reduction="sum",
                             form=form)


@needs_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_output_not_one(reduction, form):
    feats, maps = _make(LEVELS, torch.float32)
    _check_against_reference(feats, maps, grad_out=3.0, eta=0.7, reduction=reduction, form=form)
    _check_against_reference(feats, maps, grad_out=-0.25, eta=0.7, reduction=reduction, form=form)


@needs_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scales", [(1.0, 1e3), (1e-3, 1.0), (7.0, 0.0)])
def test_samples_of_very_different_scales(scales, form):
    # Each sample has its own norm (normalized form): one large and one small (or all-zero) sample.
    feats, maps = _make([(2, 5, 13, 7), (2, 3, 4, 97)], torch.float32)
    feats = [f * torch.tensor(scales).view(2, 1, 1, 1) for f in feats]
    _check_against_reference(feats, maps, eta=0.8, form=form)


@needs_native
def test_backward_twice_with_retain_graph():
    feats, maps = _make(LEVELS[:2], torch.float32)
    F, M = _leaf(feats), _leaf(maps)
    loss = _native(F, M, eta=0.7)
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in F + M]
    (2 * loss).backward()  # saved gradients must not have been scaled in place
    for x, g in zip(F + M, first):
        torch.testing.assert_close(x.grad, 3 * g)


@needs_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("which", ["features", "maps", "none"])
def test_partial_requires_grad(which, form):
    feats, maps = _make(LEVELS, torch.float64)
    F, M = _leaf(feats, grad=which == "features"), _leaf(maps, grad=which == "maps")
    loss = _native(F, M, eta=0.7, form=form)
    rF, rM = _leaf(feats, grad=which == "features"), _leaf(maps, grad=which == "maps")
    rloss = ref.alignment_loss(rF, rM, eta=0.7, form=form)
    torch.testing.assert_close(loss, rloss)
    if which == "none":
        assert not loss.requires_grad
        return
    loss.backward()
    rloss.backward()
    for x, r in zip(F + M, rF + rM):
        assert (x.grad is None) == (r.grad is None)
        if r.grad is not None:
            torch.testing.assert_close(x.grad, r.grad)


@needs_native
def test_no_grad_mode():
    feats, maps = _make(LEVELS, torch.float32)
    with torch.no_grad():
        loss = _native(_leaf(feats), _leaf(maps), eta=0.7)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref.alignment_loss(feats, maps, eta=0.7), rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
def test_gradcheck_float64(layout, form):
    feats, maps = _make([(2, 3, 4, 5), (1, 2, 3, 1)], f64, layout=layout)
    maps = [m.clamp(0.05, 0.95) for m in maps]  # stay inside [0, 1] under finite differences
    F, M = _leaf(feats), _leaf(maps)

    def fn(*xs):
        return _native(list(xs[:2]), list(xs[2:]), eta=0.6, weights=[1.5, 0.5], reduction="mean", form=form)

    assert torch.autograd.gradcheck(fn, (*F, *M))
    assert torch.autograd.gradgradcheck(fn, (*F, *M))


@needs_native
@pytest.mark.parametrize("form", FORMS)
def test_double_backward_mixed_with_other_terms(form):
    # Issue 14: the kernel's saved dF is a constant, so a graph-building backward used to miss
    # the loss's own second derivative (the 2 (1 - M)^2 term of the paper form).
    f = torch.randn(2, 3, 4, 5, dtype=f64)
    m = torch.rand(2, 1, 4, 5, dtype=f64)
    results = []
    for fn in (_native, ref.alignment_loss):
        F, M = f.clone().requires_grad_(), m.clone().requires_grad_()
        loss = fn([F], [M], eta=0.7, form=form) + (F**3).sum()
        (g,) = torch.autograd.grad(loss, F, create_graph=True)
        results.append(torch.autograd.grad(g.sum(), (F, M)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- determinism
@needs_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic_across_runs_and_threads(layout, form):
    feats, maps = _make([(2, 16, 64, 64), (2, 32, 32, 32), (2, 5, 17, 3)], torch.float32, layout=layout)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_run(_native, feats, maps, eta=0.7, form=form))
    finally:
        torch.set_num_threads(before)
    loss0, gf0, gm0 = results[0]
    for loss, gf, gm in results[1:]:
        assert torch.equal(loss, loss0)
        assert all(torch.equal(a, b) for a, b in zip(gf + gm, gf0 + gm0))


# --------------------------------------------------------------------------- one pass over F
@needs_native
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize(
    "form, grads, passes",
    [("paper", True, 1), ("paper", False, 1), ("normalized", True, 2), ("normalized", False, 1)],
)
def test_passes_over_the_features(layout, form, grads, passes):
    # The kernel counts its passes over F. The paper form writes the loss, dF and dM in its one
    # pass; the normalized form needs each sample's norm before its gradients, so a second pass;
    # the backward reuses what the forward wrote and makes none.
    sweeps = torch.ops.ssattn.alignment_loss_cpu_sweeps
    feats, maps = _make(LEVELS, torch.float32, layout=layout)
    F, M = _leaf(feats, grad=grads), _leaf(maps, grad=grads)
    before = sweeps()
    loss = _native(F, M, eta=0.7, form=form)
    assert sweeps() - before == passes
    if grads:
        loss.backward()
        assert sweeps() - before == passes


class _FeatureSizedOps(TorchDispatchMode):
    """Records the ops that take or return a tensor with as many elements as some level's features."""

    def __init__(self, numels):
        super().__init__()
        self.numels = set(numels)
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.numel() in self.numels for t in tree_leaves((args, kwargs, out))):
            self.ops.append(str(func.overloadpacket))
        return out


@needs_native
@pytest.mark.parametrize("form", FORMS)
def test_backward_hands_over_the_kernels_gradients(form):
    # Around the kernel nothing touches a feature-sized tensor but detach (autograd storing the
    # op's dF as .grad without a copy): no second pass over F or dF in Python either.
    feats, maps = _make(LEVELS, torch.float32)
    F, M = _leaf(feats), _leaf(maps)
    recorder = _FeatureSizedOps(f.numel() for f in feats if f.shape[1] > 1)  # C > 1: not map-sized
    with recorder:
        _native(F, M, eta=0.7, form=form).backward()
    assert recorder.ops.count("ssattn.alignment_loss_fused") == 1
    assert set(recorder.ops) == {"ssattn.alignment_loss_fused", "aten.detach"}


# --------------------------------------------------------------------------- torch.library integration
@needs_native
def test_opcheck():
    feats, maps = _make(LEVELS[:3], torch.float32)
    op = torch.ops.ssattn.alignment_loss_fused.default
    for normalized in (False, True):
        torch.library.opcheck(op, (_leaf(feats), _leaf(maps), [1.0, 0.5, 2.0], 0.7, True, normalized, True, True))
    # Only dF requested, half features with float32 maps, channels-last, reduction "sum".
    cl, clm = _make(LEVELS[:2], torch.bfloat16, layout="channels_last", map_dtype=torch.float32)
    for normalized in (False, True):
        torch.library.opcheck(op, (_leaf(cl), _leaf(clm, grad=False), [1.0, 1.0], 1.0, False, normalized, True, False))


@needs_native
@pytest.mark.parametrize("form", FORMS)
def test_torch_compile_fullgraph(form):
    feats, maps = _make(LEVELS, torch.float32)

    def fn(F, M):
        return ssattn.alignment_loss(F, M, eta=0.7, weights=[1, 2, 3, 4], reduction="mean", form=form,
                                     backend="native")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss, gf, gm = _run(compiled, feats, maps, grad_out=2.0)
    eloss, egf, egm = _run(fn, feats, maps, grad_out=2.0)
    assert torch.equal(loss, eloss)
    for a, b in zip(gf + gm, egf + egm):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@needs_native
def test_auto_picks_native_on_cpu():
    feats, maps = _make(LEVELS[:1], torch.float32)
    loss = ssattn.alignment_loss(_leaf(feats), _leaf(maps))
    assert "alignment_loss_fused" in type(loss.grad_fn).__name__


@needs_native
def test_op_errors_name_the_argument():
    f = torch.randn(2, 3, 4, 5)
    m = torch.rand(2, 1, 4, 5)
    op = torch.ops.ssattn.alignment_loss_fused
    with pytest.raises(RuntimeError, match=r"maps\[0\] must be \(2, 1, 4, 5\)"):
        op([f], [m[:, :, :3]], [1.0], 1.0, True, False, False, False)
    with pytest.raises(RuntimeError, match=r"weights must have one value per level"):
        op([f], [m], [1.0, 2.0], 1.0, True, False, False, False)
    with pytest.raises(RuntimeError, match=r"maps must have the dtype of the features"):
        op([f], [m.double()], [1.0], 1.0, True, False, False, False)
    with pytest.raises(RuntimeError, match=r"features\[1\] has dtype"):
        op([f, f.double()], [m, m], [1.0, 1.0], 1.0, True, True, False, False)


# --------------------------------------------------------------------------- fallback without the extension
def test_missing_extension_warns_once_and_uses_reference(monkeypatch):
    monkeypatch.setattr(_backends, "native_module", lambda: None)
    monkeypatch.setattr(_backends, "_warned", set())
    feats, maps = _make(LEVELS[:2], torch.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = ssattn.alignment_loss(feats, maps, eta=0.7)
        b = ssattn.alignment_loss(feats, maps, eta=0.7)
    ours = [w for w in rec if "alignment_loss" in str(w.message) and "native" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    expected = ref.alignment_loss(feats, maps, eta=0.7)
    assert torch.equal(a, expected) and torch.equal(b, expected)
    with pytest.raises(RuntimeError, match="native"):
        ssattn.alignment_loss(feats, maps, backend="native")


# --------------------------------------------------------------------------- GPU
needs_cuda_native = pytest.mark.skipif(
    NATIVE is None or not getattr(NATIVE, "has_cuda", lambda: False)(), reason="ssattn._C has no CUDA kernels"
)


@pytest.mark.gpu
@needs_cuda_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_matches_reference(dtype, layout, reduction, form):
    feats, maps = _make(LEVELS + BIG, dtype, device="cuda", layout=layout)
    _check_against_reference(feats, maps, eta=0.7, weights=[1.0, 0.5, 2.0, 0.25, 3.0, 1.0], reduction=reduction,
                             form=form)


@pytest.mark.gpu
@needs_cuda_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decoder_levels_and_many_levels(dtype, form):
    shapes = [(2, 32, 256, 256), (2, 64, 128, 128), (2, 128, 64, 64), (2, 256, 32, 32)]
    feats, maps = _make(shapes, dtype, device="cuda", layout="channels_last")
    _check_against_reference(feats, maps, grad_out=3.0, eta=1.0, form=form)
    many = [(1 + i % 3, 1 + i % 40, 3 + i % 7, 5 + i % 9) for i in range(37)]
    feats, maps = _make(many, dtype, device="cuda", map_dtype=torch.float32)
    _check_against_reference(feats, maps, eta=0.5, reduction="sum", form=form)


@pytest.mark.gpu
@needs_cuda_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_samples_of_very_different_scales_and_partial_grads(layout, form):
    feats, maps = _make([(3, 5, 13, 7), (3, 3, 4, 97), (3, 1, 1, 1)], torch.float32, device="cuda", layout=layout)
    scale = torch.tensor([1e-3, 0.0, 1e3], device="cuda").view(3, 1, 1, 1)
    feats = [f * scale for f in feats]
    _check_against_reference(feats, maps, eta=0.8, form=form)
    for which in ("features", "maps"):
        F, M = _leaf(feats, grad=which == "features"), _leaf(maps, grad=which == "maps")
        rF, rM = _leaf(feats, grad=which == "features"), _leaf(maps, grad=which == "maps")
        _native(F, M, eta=0.8, form=form).backward()
        ref.alignment_loss(rF, rM, eta=0.8, form=form).backward()
        for x, r in zip(F + M, rF + rM):
            assert (x.grad is None) == (r.grad is None)
            if r.grad is not None:
                torch.testing.assert_close(x.grad, r.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_empty_levels_give_zero(form, reduction):
    for shape in [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5)]:
        f = torch.randn(*shape, device="cuda", requires_grad=True)
        m = torch.rand(shape[0], 1, *shape[2:], device="cuda", requires_grad=True)
        loss = _native([f], [m], reduction=reduction, form=form)
        assert loss.item() == 0.0
        loss.backward()
        assert (m.grad == 0).all()


@pytest.mark.gpu
@needs_cuda_native
@pytest.mark.parametrize("form", FORMS)
def test_cuda_double_backward(form):
    f = torch.randn(2, 3, 4, 5, device="cuda", dtype=f64)
    m = torch.rand(2, 1, 4, 5, device="cuda", dtype=f64)
    results = []
    for fn in (_native, ref.alignment_loss):
        F = f.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn([F], [m], eta=0.7, form=form) + (F**3).sum(), F, create_graph=True)
        results.append(torch.autograd.grad(g.sum(), F)[0])
    torch.testing.assert_close(*results)


@pytest.mark.gpu
@needs_cuda_native
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_deterministic(layout, form):
    feats, maps = _make([(8, 32, 256, 256), (8, 256, 32, 32)], torch.float32, device="cuda", layout=layout)
    r0 = _run(_native, feats, maps, eta=0.7, form=form)
    for _ in range(3):
        r = _run(_native, feats, maps, eta=0.7, form=form)
        assert torch.equal(r[0], r0[0])
        assert all(torch.equal(a, b) for a, b in zip(r[1] + r[2], r0[1] + r0[2]))


@pytest.mark.gpu
@needs_cuda_native
@pytest.mark.parametrize("form", FORMS)
def test_cuda_compile_and_opcheck(form):
    feats, maps = _make(LEVELS, torch.bfloat16, device="cuda", map_dtype=torch.float32)
    torch.library.opcheck(
        torch.ops.ssattn.alignment_loss_fused.default,
        (_leaf(feats), _leaf(maps), [1.0] * 4, 0.7, True, form == "normalized", True, True),
    )

    def fn(F, M):
        return ssattn.alignment_loss(F, M, eta=0.7, form=form, backend="native")

    loss, gf, gm = _run(torch.compile(fn, fullgraph=True), feats, maps, grad_out=2.0)
    eloss, egf, egm = _run(fn, feats, maps, grad_out=2.0)
    assert torch.equal(loss, eloss)
    for a, b in zip(gf + gm, egf + egm):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@needs_cuda_native
def test_cuda_beyond_int32_elements():
    # 2 x 32769^2 > 2^31 elements: offsets must be 64-bit. bf16 F and dF, float32 M and dM: about 17 GB.
    B, C, H, W = 1, 2, 32769, 32769
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs about 24 GB of free GPU memory")
    torch.cuda.empty_cache()
    f = torch.randn(B, C, H, W, device="cuda", dtype=torch.bfloat16)
    assert f.numel() > 2**31
    m = torch.rand(B, 1, H, W, device="cuda", dtype=torch.float32)
    F, M = f.requires_grad_(), m.requires_grad_()
    loss = _native([F], [M], eta=0.5, reduction="sum")
    loss.backward()
    # float64 truth, computed in slices of rows to bound memory.
    truth = 0.0
    for h0 in range(0, H, 4096):
        fs = f.detach()[:, :, h0 : h0 + 4096].double()
        ms = m.detach()[:, :, h0 : h0 + 4096].double()
        truth += ((fs * (1 - ms)).square().sum() - 0.5 * (fs * ms).sum()).item()
    assert abs(loss.item() - truth) <= 1e-5 * abs(truth) + 1e-2
    # The last rows live beyond element 2^31: check their gradients by the formula.
    fs, ms = f.detach()[:, :, -2:].double(), m.detach()[:, :, -2:].double()
    df = 2 * fs * (1 - ms) ** 2 - 0.5 * ms
    dm = (-2 * fs.square() * (1 - ms) - 0.5 * fs).sum(1, keepdim=True)
    torch.testing.assert_close(F.grad[:, :, -2:].double(), df, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(M.grad[:, :, -2:].double(), dm, rtol=1e-4, atol=1e-4)
