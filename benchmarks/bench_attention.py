"""Mask-weighted cross-attention (SPEC 2) on the GPU: ssattn's Triton kernels and their peers.

Cases (B=4): the d=32 decoder stages C=32@256x256 (h=1), C=64@128x128 (h=2),
C=128@64x64 (h=4), C=256@32x32 (h=8), and C=64 d=64 @128x128 (h=1); fwd and
fwd+bwd (gradients for q, k, v and the map); bf16 and fp32. Peers in the same
suite, built by benchmarks/peers_attention.py from the same NCHW inputs: the
SDPA chain a user writes (mask multiply, permute + contiguous, SDPA with one
backend, permute back) and torch.compile(flex_attention) with a score_mod for
the weight. Every implementation is first checked against the float32
reference on the case, so a fast wrong peer cannot win.

Each benchmark round makes one call and synchronises; extra_info holds gpu_ms
(triton.testing.do_bench median), TFLOP/s (flash-attention convention) and the
peak extra memory of one call.

    python -m pytest benchmarks/bench_attention.py -q -p no:cacheprovider \
        --benchmark-columns=min,median,rounds --benchmark-sort=name \
        --benchmark-json=$OUT/bench_attention.json
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import peers_attention as peers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = {c[0].replace(" ", "-").replace("@", "at"): c for c in peers.CASES}
IMPLS = {
    "bf16": ["ssattn", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex"],
    "fp32": ["ssattn-ieee", "ssattn-tf32", "ssattn-tf32x3", "sdpa-efficient", "sdpa-math", "sdpa-math-tf32", "flex"],
}
PARAMS = [(case, dt, impl) for case in CASES for dt in IMPLS for impl in IMPLS[dt]]


def _chain(impl):
    """(chain, fp32 matmul precision for the call)."""
    if impl == "ssattn":
        return peers.ssattn_chain(None), "highest"
    if impl.startswith("ssattn-"):
        return peers.ssattn_chain(impl.split("-", 1)[1]), "highest"
    if impl == "flex":
        return peers.flex_chain(compiled=True), "highest"
    if impl == "sdpa-math-tf32":
        return peers.sdpa_chain("math"), "high"
    return peers.sdpa_chain(impl.split("-", 1)[1]), "highest"


def _check(chain, case, dtype, precision):
    """The chain's forward against the float32 reference on this case (loose: bf16 / tf32 inputs)."""
    from ssattn import reference as ref

    _, B, C, H, W, h = case
    q, k, v, m = peers.make_inputs(B, C, H, W, dtype, "cuda", False)
    with torch.no_grad(), peers.fp32_matmul(precision):
        out = chain(q, k, v, m, h).float()
        qs = peers._heads(q.float(), h)[:, :, :256]  # first 256 query rows keep the reference cheap
        expect = ref.masked_cross_attention(qs, peers._heads(k.float(), h), peers._heads(v.float(), h),
                                            m.float().reshape(B, -1))
    got = peers._heads(out, h)[:, :, :256]
    tol = 3e-2 if (dtype != torch.float32 or precision == "high") else 5e-3
    torch.testing.assert_close(got, expect, rtol=0, atol=tol)


@pytest.mark.parametrize("mode", peers.MODES)
@pytest.mark.parametrize("case,dtype,impl", PARAMS)
def test_attention(benchmark, case, dtype, impl, mode):
    from triton.testing import do_bench

    spec = CASES[case]
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    chain, precision = _chain(impl)
    try:
        _check(chain, spec, torch_dtype, precision)
    except (RuntimeError, NotImplementedError) as exc:  # the backend does not take this dtype/shape
        pytest.skip(f"{impl} cannot run {case} {dtype}: {str(exc).splitlines()[0][:120]}")

    _, B, C, H, W, h = spec
    grad = mode == "fwd+bwd"
    q, k, v, m = peers.make_inputs(B, C, H, W, torch_dtype, "cuda", grad)
    go = torch.randn(B, C, H, W, device="cuda", dtype=torch_dtype) if grad else None

    def step():
        out = chain(q, k, v, m, h)
        if grad:
            torch.autograd.grad(out, (q, k, v, m), go)

    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx, peers.fp32_matmul(precision):
        step()

        def one_round():
            step()
            torch.cuda.synchronize()

        benchmark.pedantic(one_round, rounds=20, warmup_rounds=3, iterations=1)
        gpu_ms = do_bench(step, warmup=25, rep=100, return_mode="median")
        peak_mb = peers._peak_extra_mb(step, "cuda")
    tflops = peers.flops(spec, mode) / (gpu_ms * 1e-3) / 1e12
    benchmark.extra_info.update(
        case=case, dtype=dtype, impl=impl, mode=mode, gpu_ms=gpu_ms, tflops=tflops, peak_extra_MB=peak_mb,
        device=torch.cuda.get_device_name(), torch=torch.__version__,
    )
    print(f"\n{case:>22} {dtype} {mode:>7} {impl:>15}: {gpu_ms:9.3f} ms  {tflops:6.1f} TFLOP/s  {peak_mb:8.1f} MB")
