"""SPEC's accuracy rule, shared by every suite.

A fast path and the reference, both run in the same dtype, are compared with
the reference run in float64: the fast path's error may be at most
`factor` (2) times the reference's own error plus a small absolute floor
(the convention of flash-attention's tests). NaN never passes.
"""

from __future__ import annotations

import torch

# Absolute floors per dtype: the error a correctly rounded result can have
# near zero, where the reference's own error may happen to vanish.
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def max_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.detach().double() - truth.detach().double()).abs().max().item() if x.numel() else 0.0


def assert_accurate(fast, ref_same_dtype, ref64, *, factor: float = 2.0, floor: float | None = None, name: str = "output"):
    """Check `fast` against the float64 truth by the accuracy rule; returns (fast_err, ref_err)."""
    fast, ref, truth = fast.detach(), ref_same_dtype.detach(), ref64.detach()
    assert fast.shape == truth.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(fast).any(), f"{name}: NaN in the fast path's result"
    truth_nan = torch.isnan(truth)
    assert not truth_nan.any(), f"{name}: NaN in the float64 reference (bad test input)"
    if floor is None:
        floor = FLOOR.get(fast.dtype, 1e-6) * max(1.0, truth.abs().max().item())
    fast_err = max_error(fast, truth)
    ref_err = max_error(ref, truth)
    bound = factor * ref_err + floor
    assert fast_err <= bound, (
        f"{name}: error {fast_err:.3e} exceeds {factor} x reference error {ref_err:.3e} + floor {floor:.1e}"
    )
    return fast_err, ref_err


def assert_grads_accurate(out, out_ref, out64, inputs, inputs_ref, inputs64,
                          names=("dq", "dk", "dv", "dweight")):
    """The accuracy rule on the gradients of three runs (fast, reference in its dtype, float64) for one upstream grad."""
    do = torch.randn_like(out64)
    g64 = torch.autograd.grad(out64, inputs64, do)
    g_ref = torch.autograd.grad(out_ref, inputs_ref, do.to(out_ref.dtype))
    g = torch.autograd.grad(out, inputs, do.to(out.dtype))
    for name, a, b, c in zip(names, g, g_ref, g64):
        assert_accurate(a, b, c, name=name)


def poison_like(x: torch.Tensor) -> torch.Tensor:
    """A tensor of x's shape full of NaN, to catch outputs that are never written."""
    return torch.full_like(x, float("nan"))


def assert_same_sums(got: dict, want: dict, *, rel: float = 1e-10) -> None:
    """Float64 tensors (by name) that are the same computation with sums taken in another order.

    Summing n terms in another order changes the result by at most n * 2**-53 (1.1e-16) times the sum of
    their magnitudes. For the tests' small networks (n <= 1e4 terms per sum, a few layers deep, terms no
    larger than the largest gradient entry times a few) that is below 1e-10 of the tensor's largest entry,
    while a wrong computation (a stage run twice, a missing term) is off by a sizeable fraction of it.
    """
    assert got.keys() == want.keys()
    for n, w in want.items():
        assert got[n].dtype == w.dtype == torch.float64, n
        scale = float(w.abs().max()) if w.numel() else 0.0
        torch.testing.assert_close(got[n], w, rtol=0.0, atol=rel * scale, msg=n)
