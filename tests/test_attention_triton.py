"""Triton kernels of SPEC 2 (ssattn.kernels.attention) against the reference, by SPEC's accuracy rule.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) on small
shapes; the GPU-marked tests sweep sizes, head dims, dtypes and precisions.
Every case checks the output and every gradient (dq, dk, dv, dweight) against
the reference run in float64, allowing 2x the reference's own error in the
same dtype plus a small floor.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssattn
from ssattn import _backends, reference as ref
from ssattn.ops import attention as attn_ops
from tests._accuracy import FLOOR, assert_accurate
from tests._poison import PoisonEmpty

kern = _backends.kernel_module("attention")  # ssattn.kernels.attention, or None without Triton
pytestmark = pytest.mark.skipif(
    kern is None or not (torch.cuda.is_available() or _backends.triton_interpreting()),
    reason="Triton attention kernels cannot run here",
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
f64 = torch.float64
FAST_OP = torch.ops.ssattn.masked_attention_fwd


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def fp32_matmul(precision: str):
    """Run reference matmuls in IEEE fp32 ("highest") or TF32 ("high") on the GPU."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def make_inputs(B, h, nq, nk, d, dtype, *, dv=None, weight=True, kpm=None, gain=1.0, device=DEV):
    """Leaf tensors in `dtype` (the truth is computed from these exact values upcast to float64)."""
    dv = d if dv is None else dv
    q = (torch.randn(B, h, nq, d, device=device) * gain).to(dtype)
    k = (torch.randn(B, h, nk, d, device=device) * gain).to(dtype)
    v = (torch.randn(B, h, nk, dv, device=device) * gain).to(dtype)
    w = torch.rand(B, nk, device=device).to(dtype) if weight else None
    do = torch.randn(B, h, nq, dv, device=device).to(dtype)
    return q, k, v, w, kpm, do


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x (B, h, N, d) in another memory layout, as a view."""
    B, h, N, d = x.shape
    if layout == "contiguous":
        return x.contiguous()
    if layout == "nchw":  # a 1x1-conv projection (B, h*d, N) seen as heads: strides (h*d*N, d*N, 1, N)
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last":  # (B, H, W, h*d) memory: strides (N*h*d, d, h*d, 1)
        return x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    if layout == "sliced":  # every other row of a wider buffer, d not innermost-contiguous
        buf = torch.empty(B, h, 2 * N, d + 3, dtype=x.dtype, device=x.device)
        view = buf[:, :, ::2, 1 : d + 1]
        view.copy_(x)
        return view
    raise ValueError(layout)


def run_attention(fn, q, k, v, w, kpm, do, scale, *, weight_grad=True):
    """out and gradients (dq, dk, dv, dweight) of fn(q, k, v, w, kpm, scale) with grad_output do."""
    # Fresh leaves with the caller's exact strides (clone() would compact a sliced view).
    leaves = [same_strides(t) if t is not None else None for t in (q, k, v, w)]
    for i, t in enumerate(leaves):
        if t is not None and (i < 3 or weight_grad):
            t.requires_grad_(True)
    out = fn(*leaves, kpm, scale)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None and t.requires_grad], do)
    grads = list(grads) + ([None] if (w is None or not weight_grad) else [])
    return out.detach(), grads


def same_strides(src):
    out = torch.empty_strided(src.shape, src.stride(), dtype=src.dtype, device=src.device)
    return out.copy_(src.detach())


def fast_fn(precision="ieee", deterministic=False, backend="triton"):
    def fn(q, k, v, w, kpm, scale):
        return FAST_OP(q, k, v, w, kpm, scale, backend, precision, deterministic)[0]

    return fn


def ref_fn(q, k, v, w, kpm, scale):
    return ref.masked_cross_attention(q, k, v, w, kpm, scale)


def to(x, dtype):
    return None if x is None else x.detach().to(dtype)


def check_against_reference(q, k, v, w, kpm, do, scale=None, precision=None, *, ref_dtype=None,
                            ref_precision="highest", floor_scale=1.0, weight_grad=True, deterministic=False,
                            backend="triton"):
    """Fast path (float32 dot precision) vs the reference in the same dtype vs the float64 truth, output and every gradient."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    precision = precision or attn_ops.default_precision()
    fast = fast_fn(precision, deterministic, backend)
    fast_out, fast_grads = run_attention(fast, q, k, v, w, kpm, do, scale, weight_grad=weight_grad)
    ref_dtype = ref_dtype or q.dtype
    base = [to(t.contiguous(), ref_dtype) if t is not None else None for t in (q, k, v, w)]
    with fp32_matmul(ref_precision):
        ref_out, ref_grads = run_attention(ref_fn, *base, kpm, to(do, ref_dtype), scale, weight_grad=weight_grad)
    truth = [to(t, f64) for t in (q, k, v, w)]
    true_out, true_grads = run_attention(ref_fn, *truth, kpm, to(do, f64), scale, weight_grad=weight_grad)
    floor_dtype = torch.float16 if (q.dtype == torch.float32 and precision == "tf32") else q.dtype
    names = ["out", "dq", "dk", "dv", "dweight"]
    for name, fast, refd, truth_t in zip(names, [fast_out, *fast_grads], [ref_out, *ref_grads], [true_out, *true_grads]):
        if truth_t is None:
            assert fast is None
            continue
        assert fast.dtype == (q.dtype if name != "dweight" else w.dtype), name
        floor = FLOOR[floor_dtype] * floor_scale * max(1.0, truth_t.abs().max().item())
        assert_accurate(fast, refd, truth_t, floor=floor, name=name)
    return fast_out, fast_grads


# --------------------------------------------------------------------------- CPU (interpreter) cases
CASES = [  # B, h, nq, nk, d, dtype, weight, padded
    (1, 1, 1, 1, 16, torch.float32, True, False),
    (2, 1, 7, 97, 16, torch.float32, True, True),
    (1, 2, 97, 7, 32, torch.float32, True, False),
    (1, 2, 130, 130, 32, torch.float32, False, True),
    (2, 1, 1, 130, 32, torch.float32, True, False),
    (1, 1, 97, 1, 16, torch.float16, True, False),
    (2, 2, 7, 130, 32, torch.float16, True, True),
    (2, 1, 130, 97, 16, torch.float16, False, False),
]


@pytest.mark.parametrize("deterministic", [True, False], ids=["two-pass", "single-pass"])
@pytest.mark.parametrize("B,h,nq,nk,d,dtype,weight,padded", CASES)
def test_matches_reference(B, h, nq, nk, d, dtype, weight, padded, deterministic):
    kpm = (torch.rand(B, nk, device=DEV) < 0.3) if padded else None
    if kpm is not None:
        kpm[:, 0] = False  # at least one key per batch here; fully padded batches have their own test
    check_against_reference(*make_inputs(B, h, nq, nk, d, dtype, weight=weight, kpm=kpm), deterministic=deterministic)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_non_contiguous_layouts(layout):
    q, k, v, w, kpm, do = make_inputs(1, 2, 97, 66, 16, torch.float32)
    q, k, v = (relayout(t, layout) for t in (q, k, v))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, w, kpm, do)


def test_module_views_from_nchw_and_channels_last_projections():
    """The views SemanticCrossAttention builds: (B, h*d, H, W) -> (B, h, H*W, d), read in place."""
    B, h, d, H, W = 1, 2, 16, 5, 7
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(B, h * d, H, W, device=DEV).contiguous(memory_format=fmt)
        y = torch.randn(B, h * d, 4, 6, device=DEV).contiguous(memory_format=fmt)
        q = x.view(B, h, d, H * W).transpose(-1, -2)
        k = y.view(B, h, d, 24).transpose(-1, -2)
        v = (y * 0.5).contiguous(memory_format=fmt).view(B, h, d, 24).transpose(-1, -2)
        w = torch.rand(B, 24, device=DEV)
        check_against_reference(q, k, v, w, None, torch.randn(B, h, H * W, d, device=DEV))


class _CopyRecorder(TorchDispatchMode):
    """Records the copying aten ops run outside the attention kernels (the interpreter's own copies are not ours)."""

    COPIES = {"aten::clone", "aten::copy_", "aten::_to_copy", "aten::contiguous"}

    def __init__(self):
        super().__init__()
        self.copies, self.paused = [], False

    def ignore_inside(self, monkeypatch, module, *names) -> None:
        """Record nothing while module.<name> runs (the launchers: the interpreter copies for itself)."""
        for name in names:
            fn = getattr(module, name)

            def run(*args, _fn=fn, **kwargs):
                self.paused = True
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.paused = False
            monkeypatch.setattr(module, name, run)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and func._schema.name in self.COPIES:
            self.copies.append((func._schema.name, tuple(args[0].shape)))
        return out


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_module_path_makes_no_copies(monkeypatch, fmt):
    """SemanticCrossAttention fwd + bwd: no permute/contiguous/weighted copy of q, k, v, out or their gradients."""
    recorder = _CopyRecorder()
    recorder.ignore_inside(monkeypatch, kern, "forward", "backward")
    block = ssattn.SemanticCrossAttention(8, 6, heads=2, backend="triton").to(DEV, memory_format=fmt)
    torch.nn.init.normal_(block.out_proj.weight, std=0.3)
    dec = torch.randn(2, 8, 9, 7, device=DEV).contiguous(memory_format=fmt).requires_grad_()
    enc = torch.randn(2, 6, 4, 5, device=DEV).contiguous(memory_format=fmt).requires_grad_()
    guidance = torch.rand(2, 1, 8, 10, device=DEV).requires_grad_()
    with recorder:
        y = block(dec, enc, guidance)
        y.backward(torch.randn_like(y))
    assert recorder.copies == []
    assert y.is_contiguous(memory_format=fmt)
    assert all(t.grad is not None for t in (dec, enc, guidance))


def test_value_head_dim_differs_and_odd_head_dim():
    q, k, v, w, kpm, do = make_inputs(1, 1, 33, 40, 24, torch.float32, dv=16)
    check_against_reference(q, k, v, w, kpm, do)


@pytest.mark.parametrize("precision,deterministic", [("tf32", False), ("tf32x3", False), ("ieee", True)])
def test_precision_options_run(precision, deterministic):
    # The interpreter computes float32 dots exactly in every mode; the GPU tests check each precision's accuracy.
    q, k, v, w, kpm, do = make_inputs(1, 1, 40, 70, 16, torch.float32)
    check_against_reference(q, k, v, w, kpm, do, precision=precision, floor_scale=1.0, deterministic=deterministic)


def test_bfloat16_under_the_interpreter():
    q, k, v, w, kpm, do = make_inputs(1, 1, 33, 70, 16, torch.bfloat16)
    check_against_reference(q, k, v, w, kpm, do)
    check_against_reference(q, k, v, None, kpm, do, scale=-0.3)  # the sign flip of k in bf16


def test_negative_scale_and_weight_without_grad():
    q, k, v, w, kpm, do = make_inputs(1, 1, 20, 30, 16, torch.float32)
    check_against_reference(q, k, v, w, kpm, do, scale=-0.3)
    check_against_reference(q, k, v, w, kpm, do, weight_grad=False)


def test_padding_leaves_one_key_and_fully_padded_batch_gives_zeros():
    B, h, nq, nk, d = 3, 1, 9, 70, 16
    kpm = torch.zeros(B, nk, dtype=torch.bool, device=DEV)
    kpm[0, :] = True
    kpm[0, 65] = False  # one key left, in the peeled partial block
    kpm[1, :] = True  # fully padded batch
    q, k, v, w, _, do = make_inputs(B, h, nq, nk, d, torch.float32, kpm=kpm)
    out, grads = check_against_reference(q, k, v, w, kpm, do)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for g in grads:
        assert torch.isfinite(g).all()
        assert torch.equal(g[1], torch.zeros_like(g[1]))
    _, lse = FAST_OP(q, k, v, w, kpm, d ** -0.5, "triton", "ieee", False)
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all()
    # One key left: every query attends to key 65 only.
    torch.testing.assert_close(out[0, 0], (v[0, 0, 65] * w[0, 65]).expand(nq, d))


def test_zero_weights_give_uniform_attention_of_zero_values():
    q, k, v, w, kpm, do = make_inputs(2, 1, 7, 97, 16, torch.float32)
    w = torch.zeros_like(w)
    out, grads = check_against_reference(q, k, v, w, kpm, do)
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("deterministic", [True, False], ids=["two-pass", "single-pass"])
def test_large_inputs_float32(deterministic):
    """x100 inputs: base-2 logits of ~1e4 saturate the softmax (one-hot rows).

    One ulp of a single log-sum-exp is ~1e-3 in P there, so this fails unless the backward gets
    the forward's statistics in base 2 (row max and log2 of the row sum, not a natural-log LSE);
    and dq, dk, dweight only meet the plain rule if dS cancels exactly at one-hot rows, as the
    reference's softmax backward does.
    """
    q, k, v, w, kpm, do = make_inputs(1, 2, 33, 97, 16, torch.float32, gain=100.0)
    check_against_reference(q, k, v, w, kpm, do, scale=0.25, precision="ieee", deterministic=deterministic)


@pytest.mark.parametrize("scale", [0.0, -0.0, -0.3, -2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_and_negative_scales(scale, dtype):
    """scale 0 and -0.0 gave all-NaN (masked scores were -inf before scaling: -inf * 0); negative scales flip the logits."""
    kpm = torch.rand(2, 70, device=DEV) < 0.3
    kpm[:, 0] = False
    q, k, v, w, _, do = make_inputs(2, 1, 20, 70, 16, dtype, kpm=kpm)
    out, grads = check_against_reference(q, k, v, w, kpm, do, scale=scale)
    if scale == 0:  # uniform attention over the unpadded keys, and no gradient reaches q or k
        assert torch.equal(grads[0], torch.zeros_like(grads[0])) and torch.equal(grads[1], torch.zeros_like(grads[1]))


@pytest.mark.parametrize("deterministic", [True, False], ids=["two-pass", "single-pass"])
def test_single_key_gives_exactly_zero_dk(deterministic):
    """With Nk = 1 the softmax is the constant 1: dk and dq are exactly 0, as the reference gives."""
    q, k, v, w, kpm, do = make_inputs(2, 2, 97, 1, 16, torch.float32)
    _, grads = check_against_reference(q, k, v, w, kpm, do, deterministic=deterministic)
    assert torch.equal(grads[1], torch.zeros_like(grads[1]))
    assert torch.equal(grads[0], torch.zeros_like(grads[0]))


def test_large_inputs_float16_stay_finite():
    """x100 fp16 inputs: scores ~1e4 overflow the fp16 reference, so the rule has no reference error to use.

    Scores that large are ill-conditioned in the weighted key m_j k_j, which the kernel (like the
    reference) rounds to fp16 for the tensor cores. Check that nothing is NaN/inf, and that the output
    matches the float64 truth computed from those fp16-rounded weighted keys and values.
    """
    q, k, v, w, kpm, do = make_inputs(1, 1, 33, 97, 16, torch.float16, gain=100.0)
    out, grads = run_attention(fast_fn(), q, k, v, w, kpm, do, 0.25)
    for g in [out, *grads]:
        assert torch.isfinite(g).all()
    wk = w.to(torch.float16)[:, None, :, None]
    truth = ref.masked_cross_attention(q.double(), (k * wk).double(), (v * wk).double(), None, None, 0.25)
    assert (out.double() - truth).abs().max() <= 1e-2 * truth.abs().max()


def test_every_output_element_is_written():
    """Poison every buffer the launchers allocate: a NaN left anywhere fails the comparison."""
    q, k, v, w, kpm, do = make_inputs(2, 1, 97, 70, 24, torch.float32, dv=20)
    with PoisonEmpty() as mode:
        check_against_reference(relayout(q, "nchw"), k, relayout(v, "channels_last"), w, kpm, do)
    assert mode.poisoned > 0


def test_deterministic_mode_gives_identical_bits():
    q, k, v, w, kpm, do = make_inputs(1, 2, 40, 70, 16, torch.float32)
    runs = [run_attention(fast_fn("ieee", deterministic=True), q, k, v, w, kpm, do, 0.25) for _ in range(2)]
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_public_api_and_module_use_the_kernels():
    q, k, v, w, kpm, do = make_inputs(1, 2, 20, 30, 16, torch.float32)
    out = ssattn.masked_cross_attention(q, k, v, w, backend="triton")
    torch.testing.assert_close(out, ref.masked_cross_attention(q, k, v, w))
    torch.manual_seed(1)
    mod = ssattn.SemanticCrossAttention(8, 6, heads=2, head_dim=16, backend="triton").to(DEV)
    torch.nn.init.normal_(mod.out_proj.weight, std=0.1)
    dec, enc, g = torch.randn(1, 8, 5, 4, device=DEV), torch.randn(1, 6, 3, 7, device=DEV), torch.rand(1, 1, 9, 9, device=DEV)
    y = mod(dec, enc, g)
    mod.backend = "reference"
    torch.testing.assert_close(y, mod(dec, enc, g))


def test_backend_and_precision_choice():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert _backends.resolve("masked_cross_attention", "triton", DEV, dtype) == "triton"
    # float64 has no Triton path: it runs the reference formulas, also when triton is asked for by name.
    assert _backends.resolve("masked_cross_attention", "triton", DEV, torch.float64) == "reference"
    with fp32_matmul("highest"):
        assert attn_ops.default_precision() == "ieee"
    with fp32_matmul("high"):
        assert attn_ops.default_precision() == "tf32"
    q = torch.randn(1, 1, 4, 16, device=DEV)
    with pytest.raises(ValueError, match=r"precision must be one of \['ieee', 'tf32', 'tf32x3'\], got 'fast'"):
        FAST_OP(q, q, q, None, None, 0.25, "triton", "fast", False)
    q = q.double()
    with pytest.raises(TypeError, match=r"float16, bfloat16 or float32"):
        kern.forward(q, q, q, None, None, 0.25)


def test_opcheck():
    q, k, v, w, _, _ = make_inputs(1, 2, 7, 9, 16, torch.float32)
    kpm = torch.zeros(1, 9, dtype=torch.bool, device=DEV)
    kpm[0, 3] = True
    for t in (q, k, v, w):
        t.requires_grad_(True)
    # test_aot_dispatch_dynamic is left to test_torch_compile_fullgraph (aot_eager, fwd + bwd): it triples the time.
    torch.library.opcheck(FAST_OP, (relayout(q, "nchw"), k, v, w, kpm, 0.25, "triton", "ieee", False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    do = torch.randn(1, 2, 7, 16, device=DEV)
    out, lse = FAST_OP(q.detach(), k.detach(), v.detach(), w.detach(), kpm, 0.25, "triton", "ieee", False)
    torch.library.opcheck(
        torch.ops.ssattn.masked_attention_bwd,
        (do, relayout(q.detach(), "nchw"), relayout(k.detach(), "channels_last"), v.detach(), w.detach(), kpm,
         out, lse, 0.25, True, "triton", "ieee", False),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_torch_compile_fullgraph():
    q, k, v, w, kpm, do = make_inputs(1, 1, 20, 30, 16, torch.float32)

    def f(q, k, v, w):
        return ssattn.masked_cross_attention(q, k, v, w, backend="triton") * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    eager_out, eager_grads = run_attention(lambda q, k, v, w, kpm, s: f(q, k, v, w), q, k, v, w, kpm, do, 0.25)
    comp_out, comp_grads = run_attention(lambda q, k, v, w, kpm, s: compiled(q, k, v, w), q, k, v, w, kpm, do, 0.25)
    torch.testing.assert_close(comp_out, eager_out)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- GPU sweep
PRECISIONS = {  # name: (dtype, float32 dot precision, reference dtype, reference fp32 matmul precision)
    "bf16": (torch.bfloat16, "ieee", torch.bfloat16, "highest"),
    "fp16": (torch.float16, "ieee", torch.float16, "highest"),
    "fp32-ieee": (torch.float32, "ieee", torch.float32, "highest"),
    "fp32-tf32": (torch.float32, "tf32", torch.float32, "high"),  # the reference with TF32 matmuls is the peer
    "fp32-tf32x3": (torch.float32, "tf32x3", torch.float32, "highest"),
}
# Each (precision, head dim) compiles its own kernels (seconds each), while sizes reuse them: so the
# sweep is one test per compile class looping over sizes. fp32-ieee at d=128 is left out: its FMA
# dots take minutes to compile and are far slower than tf32x3 at the same accuracy class.
GPU_CLASSES = [("bf16", d) for d in (16, 24, 32, 40, 48, 64, 72, 80, 96, 112, 128)] + [
    ("fp16", 32), ("fp16", 48), ("fp16", 64), ("fp16", 96), ("fp32-ieee", 16), ("fp32-ieee", 64),
    ("fp32-tf32", 32), ("fp32-tf32", 128), ("fp32-tf32x3", 32), ("fp32-tf32x3", 64),
]
GPU_SIZES = [(1, 1), (7, 7), (97, 97), (113, 203), (203, 113), (1025, 1025), (4096, 4096), (97, 1025), (1025, 7),
             (4096, 1)]
LAYOUTS = ["contiguous", "nchw", "channels_last"]


@pytest.fixture
def heuristic_configs(monkeypatch):
    # One config per shape class keeps the sweep's compile time sane; test_gpu_autotuned covers autotuning.
    monkeypatch.setenv("SSATTN_AUTOTUNE", "0")


@pytest.mark.gpu
@pytest.mark.parametrize("name,d", GPU_CLASSES, ids=[f"{n}-d{d}" for n, d in GPU_CLASSES])
def test_gpu_sweep(name, d, heuristic_configs):
    """Every size in GPU_SIZES, cycling heads 1/2, the two backward paths, layouts and key padding; all failures
    reported together."""
    dtype, precision, ref_dtype, ref_prec = PRECISIONS[name]
    floor_scale = 10.0 if precision == "tf32x3" else 1.0  # tf32x3 drops the small*small term: ~2^-22, not 2^-24
    # Layout and padding are fixed per class (each stride==1 pattern and HAS_KPM compiles another binary);
    # across the classes every layout is used with and without padding.
    c = GPU_CLASSES.index((name, d))
    layout, padded = LAYOUTS[c % 3], c % 2 == 1
    failures = []
    for i, (nq, nk) in enumerate(GPU_SIZES):
        h, B = 1 + i % 2, 2
        kpm = (torch.rand(B, nk, device="cuda") < 0.2) if padded else None
        if kpm is not None:
            kpm[:, -1] = False
        q, k, v, w, _, do = make_inputs(B, h, nq, nk, d, dtype, kpm=kpm, device="cuda")
        q, k, v = (relayout(t, layout) for t in (q, k, v))
        deterministic = i % 2 == 1
        try:
            check_against_reference(q, k, v, w, kpm, do, precision=precision, ref_dtype=ref_dtype, ref_precision=ref_prec,
                                    floor_scale=floor_scale, deterministic=deterministic)
        except AssertionError as exc:
            failures.append(f"nq={nq} nk={nk} h={h} {layout} padded={kpm is not None} deterministic={deterministic}: "
                            f"{str(exc).splitlines()[0]}")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
def test_gpu_autotuned_and_heuristic_configs(monkeypatch):
    """The autotuned path (every config compiled and timed: bf16 d=32, the benchmark's main class) and the
    heuristic one both meet the rule."""
    for nq, nk in ((1025, 1025), (4096, 4096)):
        q, k, v, w, kpm, do = make_inputs(2, 2, nq, nk, 32, torch.bfloat16, device="cuda")
        q, k, v = (relayout(t, "nchw") for t in (q, k, v))
        monkeypatch.setenv("SSATTN_AUTOTUNE", "1")
        check_against_reference(q, k, v, w, kpm, do)
        monkeypatch.setenv("SSATTN_AUTOTUNE", "0")
        check_against_reference(q, k, v, w, kpm, do)


@pytest.mark.gpu
def test_gpu_padding_and_zero_weights(heuristic_configs):
    B, nk = 3, 1025
    kpm = torch.zeros(B, nk, dtype=torch.bool, device="cuda")
    kpm[0] = True
    kpm[0, 1024] = False
    kpm[1] = True
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, w, _, do = make_inputs(B, 2, 513, nk, 32, dtype, kpm=kpm, device="cuda")
        w[2] = 0
        out, grads = check_against_reference(q, k, v, w, kpm, do)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert all(torch.equal(g[1], torch.zeros_like(g[1])) for g in grads)


@pytest.mark.gpu
def test_gpu_large_n_bf16_forward(heuristic_configs):
    """N=65536, d=32, bf16: forward rows checked on a random subset of queries (the float64 truth is chunked)."""
    B, h, n, d = 1, 1, 65536, 32
    q, k, v, w, _, _ = make_inputs(B, h, n, n, d, torch.bfloat16, device="cuda")
    out, _ = FAST_OP(q, k, v, w, None, d ** -0.5, "triton", "ieee", False)
    assert torch.isfinite(out).all()
    rows = torch.randperm(n, device="cuda")[:256]
    qs = q[:, :, rows]
    ref_bf16 = ref.masked_cross_attention(qs, k, v, w)
    truth = ref.masked_cross_attention(qs.double(), k.double(), v.double(), w.double())
    assert_accurate(out[:, :, rows], ref_bf16, truth, name="out")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [32, 64])
def test_gpu_fast_exp2_option(heuristic_configs, monkeypatch, dtype, d):
    """SSATTN_FAST_EXP2=1 (packed ex2.approx.f16x2 in the forward) must still meet the accuracy rule."""
    monkeypatch.setenv("SSATTN_FAST_EXP2", "1")
    assert kern.fast_exp2_enabled(dtype, d)
    for nq, nk in ((97, 1025), (1025, 1025)):
        q, k, v, w, kpm, do = make_inputs(2, 2, nq, nk, d, dtype, device="cuda")
        check_against_reference(q, k, v, w, kpm, do)


@pytest.mark.gpu
def test_gpu_deterministic(heuristic_configs):
    q, k, v, w, kpm, do = make_inputs(2, 2, 4096, 4096, 32, torch.bfloat16, device="cuda")
    (o1, g1), (o2, g2) = (run_attention(fast_fn(deterministic=True), q, k, v, w, kpm, do, 0.2) for _ in range(2))
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# --------------------------------------------------------------------------- the peer benchmark script
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_peer_benchmark_script_quick_mode(tmp_path):
    """benchmarks/peers_attention.py --quick runs end to end and writes its markdown table."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "peers_attention.py"
    spec = importlib.util.spec_from_file_location("peers_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "peers.md"
    rows = mod.main(["--quick", "--out", str(out), "--dtypes", "fp32"])
    impls = {r[3] for r in rows if r[4] is not None}
    assert "ssattn ieee" in impls and "sdpa-math" in impls
    text = out.read_text()
    assert "| case | dtype | mode | impl | ms |" in text and "ssattn ieee" in text


# --------------------------------------------------------------------------- config tables
def test_config_tables_cover_every_class_and_prune_keeps_the_class(monkeypatch):
    import triton

    from ssattn.kernels import _attention_configs as configs

    classes = {(p, d) for p in ("half", "tf32", "ieee") for d in (32, 64, 128, 256)}
    for kind, table in configs.TABLE.items():
        assert set(table) == classes, kind
        for cls, entries in table.items():
            assert entries and len(set(entries)) == len(entries), (kind, cls)
            for bm, bn, warps, stages in entries:  # tl.dot needs power-of-two sides >= 16
                assert bm >= 16 and bn >= 16 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0, (kind, cls)
                assert warps in (4, 8) and stages in (2, 3, 4), (kind, cls)
    assert configs.shape_class(False, "tf32", 16) == ("half", 32)
    assert configs.shape_class(True, "tf32x3", 64) == ("tf32", 64)
    assert configs.shape_class(True, "ieee", 256) == ("ieee", 256)

    monkeypatch.setattr(kern, "INTERPRET", False)
    every = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
             for bm, bn, w, s in configs.choices("fwd")]
    q = torch.empty(0, dtype=torch.bfloat16)
    args = {"Q": q, "PREC": "tf32", "BLOCK_D": 64, "BLOCK_DV": 64, "Nq": 4096, "Nk": 4096}
    kept = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in kern._prune("fwd", every, args)]
    assert kept == configs.TABLE["fwd"][("half", 64)]
    small = kern._prune("fwd", every, {**args, "Nq": 7, "Nk": 7})  # no tile far larger than the problem
    assert small and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in small)
    heuristic = kern._heuristic("dkdv", ("ieee", 64))
    assert (heuristic["BLOCK_M"], heuristic["BLOCK_N"]) == configs.TABLE["dkdv"][("ieee", 64)][0][:2]


def test_config_policy_heuristic_by_default_autotune_opt_in_deterministic_pinned(monkeypatch):
    launched = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.name, kwargs.get("BLOCK_M")))

    q = torch.empty(1, 1, 4, 16)
    meta = {"PREC": "ieee", "BLOCK_D": 16, "BLOCK_DV": 16}
    monkeypatch.delenv("SSATTN_AUTOTUNE", raising=False)
    for env, deterministic, expected in ((None, False, "raw"), ("1", False, "tuned"), ("1", True, "raw")):
        if env is not None:
            monkeypatch.setenv("SSATTN_AUTOTUNE", env)
        launched.clear()
        kern._launch(Fake("tuned"), Fake("raw"), "fwd", lambda bm, bn: (1, 1), (q,), meta, deterministic)
        assert launched[0][0] == expected, (env, deterministic)
    # The autotune cache key tells the layouts apart (which dim has stride 1), so an NCHW view never
    # reuses the config tuned for contiguous inputs.
    assert "LAYOUT" in kern._KEYS
    x = torch.randn(1, 2, 8, 16)
    assert kern.layout_code(x, x, x) != kern.layout_code(relayout(x, "nchw"), x, x)
    assert kern.layout_code(relayout(x, "nchw"), x, x) != kern.layout_code(x, relayout(x, "nchw"), x)
    # The packed half-precision exp2 is an opt-in, for fp16/bf16 at d <= 64, compiled kernels only.
    monkeypatch.setenv("SSATTN_FAST_EXP2", "1")
    assert not kern.fast_exp2_enabled(torch.bfloat16, 64)  # the interpreter has no PTX
    monkeypatch.setattr(kern, "INTERPRET", False)
    assert kern.fast_exp2_enabled(torch.bfloat16, 64) and kern.fast_exp2_enabled(torch.float16, 32)
    assert not kern.fast_exp2_enabled(torch.float32, 32) and not kern.fast_exp2_enabled(torch.bfloat16, 128)
    monkeypatch.delenv("SSATTN_FAST_EXP2")
    assert not kern.fast_exp2_enabled(torch.bfloat16, 64)


def test_single_pass_and_two_pass_backward_agree():
    """Both backward paths give the same gradients up to float32 rounding (the order of dq's additions)."""
    q, k, v, w, kpm, do = make_inputs(1, 2, 97, 130, 16, torch.float32)
    (o1, g1), (o2, g2) = (run_attention(fast_fn("ieee", deterministic=det), q, k, v, w, kpm, do, 0.25)
                          for det in (True, False))
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
