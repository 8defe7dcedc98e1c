"""The caption-feature loss (docs/operations.md section 4): the reference against an independent
formula, and the compiled op ssattn::caption_loss_fused against the reference by the accuracy rule.

Lists of pairs of different shapes and dtypes, awkward sizes, non-contiguous
inputs, every distance, the gradient (gradcheck on the reference, op against
reference), determinism across runs and thread counts, opcheck,
torch.compile(fullgraph=True), bad inputs and the fallback without the extension.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ssattn
from ssattn import _backends
from ssattn import reference as ref
from tests._accuracy import assert_accurate

NATIVE = _backends.native_module()
needs_native = pytest.mark.skipif(NATIVE is None, reason="ssattn._C is not built")
f64 = torch.float64
DISTANCES = ["l1", "l2", "cosine"]
# Feature shapes of the three spaces at realistic and awkward sizes: visual (B, P), prefix (B, 10, E),
# language (B, 10 + T, E), and odd ones (a single vector, D = 1, 255 x 257).
SHAPES = [(2, 16), (2, 10, 32), (2, 13, 32), (1,), (7,), (97, 1), (3, 113), (255, 257)]
WEIGHTS = [1.0, 0.5, 2.0, 0.25, 3.0, 1.5, 0.75, 1.25]


def _pairs(shapes, dtype, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for s in shapes:
        if noncontig and len(s) >= 1:
            # every other element of a wider last dimension, then a transpose where there are two dims
            x = torch.randn(*s[:-1], 2 * s[-1], generator=g, dtype=f64)[..., ::2]
            y = torch.randn(*s[:-1], 2 * s[-1], generator=g, dtype=f64)[..., ::2]
        else:
            x = torch.randn(*s, generator=g, dtype=f64)
            y = torch.randn(*s, generator=g, dtype=f64)
        xs.append(x.to(dtype))
        ys.append((0.7 * x + 0.5 * y).to(dtype))  # correlated with x, as enhanced and reference features are
    return xs, ys


def _leaf(xs, dtype=None):
    return [x.detach().to(dtype or x.dtype).requires_grad_(True) for x in xs]


# --------------------------------------------------------------------------- the formula (independent numpy)
def _numpy_loss(xs, ys, distance, weights, eps=1e-8):
    total = 0.0
    for x, y, w in zip(xs, ys, weights):
        a, b = x.detach().double().numpy(), y.detach().double().numpy()
        if a.size == 0:
            continue
        if distance == "l1":
            d = np.abs(a - b).sum() / a.size
        elif distance == "l2":
            d = ((a - b) ** 2).sum() / a.size
        else:
            a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            cos = [float(u @ v) / (max(np.sqrt(u @ u), eps) * max(np.sqrt(v @ v), eps)) for u, v in zip(a2, b2)]
            d = float(np.mean([1.0 - c for c in cos]))
        total += w * d
    return total


@pytest.mark.parametrize("distance", DISTANCES)
def test_reference_matches_the_formula(distance):
    xs, ys = _pairs(SHAPES, f64)
    got = ref.caption_feature_loss(xs, ys, distance=distance, weights=WEIGHTS)
    assert got.dtype == f64
    assert got.item() == pytest.approx(_numpy_loss(xs, ys, distance, WEIGHTS), rel=1e-12, abs=1e-12)


def test_reference_hand_computed_cases():
    x, y = torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    # l1: (0 + 4 + 1 + 0) / 4; l2: (16 + 1) / 4; cosine: rows (1 - 3/5) and (1 - 0) (a zero vector), mean
    assert ref.caption_feature_loss([x], [y], distance="l1").item() == pytest.approx(1.25)
    assert ref.caption_feature_loss([x], [y], distance="l2").item() == pytest.approx(4.25)
    assert ref.caption_feature_loss([x], [y], distance="cosine").item() == pytest.approx((0.4 + 1.0) / 2)
    # weights and an empty pair (contributes 0)
    e = torch.empty(0, 3)
    assert ref.caption_feature_loss([x, e], [y, e], distance="l1", weights=[2.0, 5.0]).item() == pytest.approx(2.5)


@pytest.mark.parametrize("distance", DISTANCES)
def test_reference_gradcheck(distance):
    xs, ys = _pairs([(3, 5), (2, 4, 6), (7,)], f64)
    xs = [x + 0.3 for x in xs]  # away from l1's kinks
    ys = [y.requires_grad_(True) for y in ys]
    assert torch.autograd.gradcheck(
        lambda *t: ref.caption_feature_loss(list(t[:3]), list(t[3:]), distance=distance, weights=[1.0, 0.5, 2.0]),
        tuple(_leaf(xs)) + tuple(ys))


def test_half_inputs_accumulate_in_float32():
    xs, ys = _pairs(SHAPES[:3], torch.bfloat16)
    assert ref.caption_feature_loss(xs, ys).dtype == torch.float32
    assert ssattn.caption_feature_loss(xs, ys, backend="reference").dtype == torch.float32


# --------------------------------------------------------------------------- the fused op against the reference
def _run(fn, xs, ys, grad_out=1.0, **kw):
    X = _leaf(xs)
    loss = fn(X, [y.detach() for y in ys], **kw)
    (loss * grad_out).backward()
    return loss.detach(), [x.grad for x in X]


def _native(X, Y, **kw):
    return ssattn.caption_feature_loss(X, Y, backend="native", **kw)


def _check(xs, ys, grad_out=1.0, **kw):
    loss, g = _run(_native, xs, ys, grad_out, **kw)
    rloss, rg = _run(ref.caption_feature_loss, xs, ys, grad_out, **kw)
    tloss, tg = _run(ref.caption_feature_loss, [x.double() for x in xs], [y.double() for y in ys], grad_out, **kw)
    assert loss.dtype == rloss.dtype
    assert_accurate(loss, rloss, tloss, name="loss")
    for i, (a, r, t, x) in enumerate(zip(g, rg, tg, xs)):
        assert a.dtype == x.dtype and a.shape == x.shape
        if a.numel():
            assert_accurate(a, r, t, name=f"dX[{i}]")


@needs_native
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noncontig", [False, True])
def test_matches_reference(distance, dtype, noncontig):
    xs, ys = _pairs(SHAPES, dtype, noncontig=noncontig)
    _check(xs, ys, distance=distance, weights=WEIGHTS)


@needs_native
@pytest.mark.parametrize("distance", DISTANCES)
def test_pairs_of_different_dtypes_and_grad_output(distance):
    dtypes = [torch.bfloat16, torch.float32, torch.float16]
    xs, ys = [], []
    for s, dt, seed in zip(SHAPES[:3], dtypes, range(3)):
        x, y = _pairs([s], dt, seed=seed)
        xs += x
        ys += y
    _check(xs, ys, grad_out=-2.5, distance=distance, weights=[1.0, 2.0, 0.5])


@needs_native
@pytest.mark.parametrize("distance", DISTANCES)
def test_realistic_sizes(distance):
    xs, ys = _pairs([(8, 512), (8, 10, 768), (8, 18, 768)], torch.float32)
    _check(xs, ys, distance=distance, weights=[1.0, 1.0, 1.0])


@needs_native
def test_cosine_zero_vectors_and_empty_pairs():
    x = torch.randn(4, 9)
    x[1] = 0.0
    y = torch.randn(4, 9)
    y[2] = 0.0
    e = torch.empty(0, 5)
    _check([x, e], [y, e], distance="cosine", weights=[1.0, 3.0])
    _check([x, e], [y, e], distance="l1", weights=[1.0, 3.0])


@needs_native
def test_equal_features_give_zero_loss_and_gradient():
    xs, _ = _pairs(SHAPES[:3], torch.float32)
    for distance in ("l1", "l2"):
        loss, g = _run(_native, xs, [x.clone() for x in xs], distance=distance)
        assert loss.item() == 0.0 and all(bool((t == 0).all()) for t in g)


@needs_native
def test_no_grad_mode_and_reference_requiring_grad():
    xs, ys = _pairs(SHAPES[:2], torch.float32)
    with torch.no_grad():
        a = ssattn.caption_feature_loss(_leaf(xs), ys, backend="native")
    assert a.grad_fn is None
    assert a.item() == pytest.approx(ref.caption_feature_loss(xs, ys).item(), rel=1e-6)
    Y = _leaf(ys)
    with pytest.raises(ValueError, match="no gradient for `reference`"):
        ssattn.caption_feature_loss(_leaf(xs), Y, backend="native")
    # "auto" gives a reference that requires grad the reference path, whose gradient reaches it
    ssattn.caption_feature_loss(_leaf(xs), Y).backward()
    assert all(y.grad is not None for y in Y)


@needs_native
@pytest.mark.parametrize("distance", DISTANCES)
def test_double_backward(distance):
    xs, ys = _pairs([(3, 6), (2, 2, 5)], f64)
    X = _leaf(xs)
    loss = ssattn.caption_feature_loss(X, ys, distance=distance, backend="native")
    g = torch.autograd.grad(loss, X, create_graph=True)
    h = torch.autograd.grad(sum((t * t).sum() for t in g), X, allow_unused=True)
    X2 = _leaf(xs)
    loss2 = ref.caption_feature_loss(X2, ys, distance=distance)
    g2 = torch.autograd.grad(loss2, X2, create_graph=True)
    h2 = torch.autograd.grad(sum((t * t).sum() for t in g2), X2, allow_unused=True)
    for a, b in zip(h, h2):
        if b is None:
            assert a is None or bool((a == 0).all())
        else:
            torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- determinism
@needs_native
@pytest.mark.parametrize("distance", DISTANCES)
def test_deterministic_across_runs_and_threads(distance):
    xs, ys = _pairs([(32, 512), (32, 10, 768), (32, 20, 768), (5, 3)], torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_run(_native, xs, ys, distance=distance))
    finally:
        torch.set_num_threads(before)
    loss0, g0 = results[0]
    for loss, g in results[1:]:
        assert torch.equal(loss, loss0)
        assert all(torch.equal(a, b) for a, b in zip(g, g0))


# --------------------------------------------------------------------------- torch.library integration
@needs_native
def test_opcheck():
    op = torch.ops.ssattn.caption_loss_fused.default
    for code in range(3):
        xs, ys = _pairs(SHAPES[:3], torch.float32)
        torch.library.opcheck(op, (_leaf(xs), ys, [1.0, 0.5, 2.0], code, 1e-8, True))
        xs, ys = _pairs([(3, 4), (2, 5)], torch.bfloat16, noncontig=True)
        torch.library.opcheck(op, (_leaf(xs), ys, [1.0, 1.0], code, 1e-8, True))


@needs_native
@pytest.mark.parametrize("distance", DISTANCES)
def test_torch_compile_fullgraph(distance):
    xs, ys = _pairs(SHAPES[:3], torch.float32)

    def fn(X, Y):
        return ssattn.caption_feature_loss(X, Y, distance=distance, weights=[1.0, 2.0, 3.0], backend="native")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss, g = _run(compiled, xs, ys, grad_out=2.0)
    eloss, eg = _run(fn, xs, ys, grad_out=2.0)
    assert torch.equal(loss, eloss)
    for a, b in zip(g, eg):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@needs_native
def test_auto_picks_native_on_cpu():
    xs, ys = _pairs(SHAPES[:1], torch.float32)
    loss = ssattn.caption_feature_loss(_leaf(xs), ys)
    assert "caption_loss_fused" in type(loss.grad_fn).__name__


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs_name_the_argument():
    x, y = torch.randn(2, 5), torch.randn(2, 5)
    f = ssattn.caption_feature_loss
    with pytest.raises(TypeError, match="enhanced must be a list"):
        f(x, [y])
    with pytest.raises(ValueError, match="enhanced must not be empty"):
        f([], [])
    with pytest.raises(ValueError, match="same number of spaces"):
        f([x, x], [y])
    with pytest.raises(ValueError, match=r"reference\[0\] has shape \(2, 4\)"):
        f([x], [y[:, :4]])
    with pytest.raises(ValueError, match="distance must be one of"):
        f([x], [y], distance="l3")
    with pytest.raises(ValueError, match="weights must have one value per level"):
        f([x], [y], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"weights\[0\] must be a finite number"):
        f([x], [y], weights=[float("nan")])
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        f([x], [y], eps=0.0)
    with pytest.raises(ValueError, match=r"enhanced\[0\] must have at least one dimension"):
        f([torch.tensor(1.0)], [torch.tensor(1.0)])
    with pytest.raises((TypeError, ValueError), match=r"enhanced\[0\]"):
        f([x.long()], [y.long()])
    with pytest.raises(ValueError, match="backend must be one of"):
        f([x], [y], backend="cuda")


@needs_native
def test_op_errors_name_the_argument():
    x, y = torch.randn(2, 5), torch.randn(2, 5)
    op = torch.ops.ssattn.caption_loss_fused
    with pytest.raises(RuntimeError, match=r"reference\[0\] has shape"):
        op([x], [y[:, :3]], [1.0], 0, 1e-8, False)
    with pytest.raises(RuntimeError, match=r"reference\[0\] has dtype"):
        op([x], [y.double()], [1.0], 0, 1e-8, False)
    with pytest.raises(RuntimeError, match="weights must have one value per pair"):
        op([x], [y], [1.0, 1.0], 0, 1e-8, False)
    with pytest.raises(RuntimeError, match="distance must be 0"):
        op([x], [y], [1.0], 3, 1e-8, False)


def test_missing_extension_warns_once_and_uses_reference(monkeypatch):
    monkeypatch.setattr(_backends, "native_module", lambda: None)
    monkeypatch.setattr(_backends, "_warned", set())
    xs, ys = _pairs(SHAPES[:2], torch.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = ssattn.caption_feature_loss(xs, ys)
        b = ssattn.caption_feature_loss(xs, ys)
    ours = [w for w in rec if "caption_feature_loss" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    expected = ref.caption_feature_loss(xs, ys)
    assert torch.equal(a, expected) and torch.equal(b, expected)
    with pytest.raises(RuntimeError, match="native"):
        ssattn.caption_feature_loss(xs, ys, backend="native")


def test_cuda_auto_takes_the_reference():
    # "auto" never picks the CUDA kernel until it has been checked on a GPU (ssattn/ops/caption_loss.py).
    assert _backends.resolve("caption_feature_loss", "auto", "cuda", torch.float32) == "reference"


@pytest.mark.skipif(NATIVE is None or getattr(NATIVE, "has_cuda", lambda: False)(), reason="_C has CUDA kernels")
def test_cuda_native_without_cuda_kernels_says_why():
    with pytest.raises(RuntimeError, match="cannot run on cuda"):
        _backends.resolve("caption_feature_loss", "native", "cuda", torch.float32)


# --------------------------------------------------------------------------- GPU (not yet run by this project)
needs_cuda_native = pytest.mark.skipif(
    NATIVE is None or not getattr(NATIVE, "has_cuda", lambda: False)() or not torch.cuda.is_available(),
    reason="needs a CUDA device and ssattn._C with CUDA kernels")


def _cuda_check(xs, ys, grad_out=1.0, **kw):
    X = [x.detach().cuda().requires_grad_(True) for x in xs]
    loss = ssattn.caption_feature_loss(X, [y.cuda() for y in ys], backend="native", **kw)
    assert "caption_loss_fused" in type(loss.grad_fn).__name__
    (loss * grad_out).backward()
    rloss, rg = _run(ref.caption_feature_loss, xs, ys, grad_out, **kw)
    tloss, tg = _run(ref.caption_feature_loss, [x.double() for x in xs], [y.double() for y in ys], grad_out, **kw)
    assert_accurate(loss.cpu(), rloss, tloss, name="loss")
    for i, (x, r, t) in enumerate(zip(X, rg, tg)):
        if x.numel():
            assert_accurate(x.grad.cpu(), r, t, name=f"dX[{i}]")
    return loss


@pytest.mark.gpu
@needs_cuda_native
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noncontig", [False, True])
def test_cuda_matches_reference(distance, dtype, noncontig):
    xs, ys = _pairs(SHAPES + [(32, 18, 768)], dtype, noncontig=noncontig)
    _cuda_check(xs, ys, grad_out=-1.5, distance=distance, weights=WEIGHTS + [1.0])


@pytest.mark.gpu
@needs_cuda_native
@pytest.mark.parametrize("distance", DISTANCES)
def test_cuda_deterministic_zero_vectors_and_empty_pairs(distance):
    x, y = torch.randn(40, 9), torch.randn(40, 9)
    x[1], y[2] = 0.0, 0.0
    e = torch.empty(0, 5)
    a = _cuda_check([x, e], [y, e], distance=distance, weights=[1.0, 3.0])
    b = _cuda_check([x, e], [y, e], distance=distance, weights=[1.0, 3.0])
    assert torch.equal(a, b)


@needs_native
def test_meta_tensors_give_shapes_through_the_fake_kernel():
    xs = [torch.empty(4, 7, device="meta", requires_grad=True), torch.empty(2, 3, 5, device="meta", dtype=f64)]
    ys = [torch.empty(4, 7, device="meta"), torch.empty(2, 3, 5, device="meta", dtype=f64)]
    loss = ssattn.caption_feature_loss(xs, ys, backend="native")
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == f64
