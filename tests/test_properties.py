"""Property-based sweep (hypothesis) of the three ops' fast paths against the reference, by the accuracy rule.

Random shapes (awkward, 1-sized and spanning more than one interpreter
block), memory layouts, dtypes, per-key weights (with exact 0s and 1s),
key-padding masks (a fully padded batch included), scales (negative and
zero too), sharpening parameters, level sizes and loss weights. The Triton
kernels run under the interpreter on CPU, so every case is small and the
number of examples is bounded: derandomized (the same cases every run, no
example database written), well under a minute in CI. Each case reuses its
suite's checker: fast path vs the reference in the same dtype vs float64.
"""

from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ssattn import _backends  # noqa: E402

interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                            reason="CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")
needs_kernels = pytest.mark.skipif(_backends.kernel_module("attention") is None
                                   or _backends.kernel_module("pyramid") is None,
                                   reason="the Triton kernels are not importable")


def bounded(n: int):
    """A fixed, bounded set of n examples: reproducible in CI, no .hypothesis folder, no deadline
    (the interpreter's first call of a kernel is slow)."""
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


FLOATS = st.sampled_from([torch.float32, torch.float16])


# --------------------------------------------------------------------------- masked cross-attention
LAYOUTS = ["contiguous", "nchw", "channels_last", "sliced"]


@st.composite
def attention_cases(draw):
    B, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    # short rows, or rows spanning a full interpreter block (64) and a peeled partial one
    length = st.one_of(st.integers(1, 24), st.integers(65, 70))
    nq, nk = draw(length), draw(length)
    d = draw(st.sampled_from([1, 3, 8, 16, 32]))
    dv = draw(st.sampled_from([d, d, 4, 16]))
    dtype = draw(FLOATS)
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    weight = draw(st.sampled_from(["none", "rand", "binary", "rand"]))
    padding = draw(st.sampled_from(["none", "random", "one_batch_all_padded", "random"]))
    # scale 0 is left to test_attention_scale_zero (a known kernel NaN)
    scale = draw(st.one_of(st.none(), st.floats(-1.5, 1.5, allow_nan=False).map(lambda s: round(s, 3)).filter(bool)))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, h, nq, nk, d, dv, dtype, layouts, weight, padding, scale, seed


@interp
@needs_kernels
@bounded(8)
@given(case=attention_cases())
def test_attention_matches_reference(case):
    from tests.test_attention_triton import check_against_reference, make_inputs, relayout

    B, h, nq, nk, d, dv, dtype, layouts, weight, padding, scale, seed = case
    torch.manual_seed(seed)
    q, k, v, w, _, do = make_inputs(B, h, nq, nk, d, dtype, dv=dv, weight=weight != "none")
    q, k, v = (relayout(t, lay) for t, lay in zip((q, k, v), layouts))
    if weight == "binary":  # exact zeros and ones: keys switched off and passed unweighted
        w = (torch.rand(B, nk) < 0.5).to(dtype)
    kpm = None
    if padding != "none":
        kpm = torch.rand(B, nk) < 0.4
        if padding == "one_batch_all_padded":
            kpm[0] = True
    check_against_reference(q, k, v, w, kpm, do, scale)


@interp
@needs_kernels
@pytest.mark.xfail(strict=True, reason="found by the sweep: the Triton attention kernels give NaN at scale=0 "
                                      "(masked -inf times a zero scale); kernels/ is being reworked (issue 14 report)")
def test_attention_scale_zero():
    from tests.test_attention_triton import check_against_reference, make_inputs

    q, k, v, w, _, do = make_inputs(1, 1, 1, 1, 1, torch.float32, weight=False)
    check_against_reference(q, k, v, w, None, do, 0.0)


# --------------------------------------------------------------------------- guidance pyramid
@st.composite
def pyramid_cases(draw):
    B = draw(st.integers(1, 3))
    gh, gw = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    H, W = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    levels = [(H, W)] + [(draw(st.integers(1, H)), draw(st.integers(1, W))) for _ in range(draw(st.integers(0, 2)))]
    features = draw(st.booleans())
    cf = draw(st.integers(1, 12))
    text_batched = draw(st.booleans())
    transposed = draw(st.booleans())  # scores as a non-contiguous view
    dtype = draw(FLOATS)
    gamma = draw(st.floats(1.0, 4.0).map(lambda g: round(g, 2)))
    delta = draw(st.floats(0.0, 0.9).map(lambda x: round(x, 2)))
    renormalize = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, (gh, gw), levels, features, cf, text_batched, transposed, dtype, gamma, delta, renormalize, seed


@interp
@needs_kernels
@bounded(12)
@given(case=pyramid_cases())
def test_pyramid_matches_reference(case):
    from tests.test_pyramid_triton import check_against_reference, run_kernel

    B, (gh, gw), sizes, features, cf, text_batched, transposed, dtype, gamma, delta, renorm, seed = case
    torch.manual_seed(seed)
    text = None
    if features:
        scores = torch.randn(B, cf, gh * gw).transpose(1, 2) if transposed else torch.randn(B, gh * gw, cf)
        text = torch.randn(B, cf) if text_batched else torch.randn(cf)
        text = text.to(dtype)
    else:
        scores = torch.randn(B, gw, gh).transpose(1, 2) if transposed else torch.randn(B, gh, gw)
    scores = scores.to(dtype)
    grid = (gh, gw) if features else None
    maps = run_kernel(scores, sizes, gamma=gamma, delta=delta, text=text, grid_size=grid, renormalize=renorm)
    check_against_reference(maps, scores, sizes, gamma=gamma, delta=delta, text=text, grid_size=grid,
                            renormalize=renorm)


# --------------------------------------------------------------------------- alignment loss
@st.composite
def alignment_cases(draw):
    B = draw(st.integers(1, 3))
    n_levels = draw(st.integers(1, 3))
    shapes = [(B, draw(st.integers(1, 9)), draw(st.integers(1, 13)), draw(st.integers(1, 13))) for _ in range(n_levels)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))
    layout = draw(st.sampled_from(["nchw", "channels_last", "noncontig"]))
    eta = draw(st.floats(0.0, 3.0).map(lambda e: round(e, 3)))
    weights = draw(st.one_of(st.none(), st.lists(st.floats(-2.0, 2.0).map(lambda w: round(w, 3)),
                                                 min_size=n_levels, max_size=n_levels)))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return shapes, dtype, layout, eta, weights, reduction, seed


@pytest.mark.skipif(_backends.native_module() is None, reason="ssattn._C is not built")
@bounded(25)
@given(case=alignment_cases())
def test_alignment_loss_matches_reference(case):
    from tests.test_alignment_native import _check_against_reference, _make

    shapes, dtype, layout, eta, weights, reduction, seed = case
    torch.manual_seed(seed)
    feats, maps = _make(shapes, dtype, layout=layout)
    _check_against_reference(feats, maps, eta=eta, weights=weights, reduction=reduction)
