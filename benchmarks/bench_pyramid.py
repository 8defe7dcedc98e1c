"""Guidance pyramid (SPEC 1) on the GPU: the one-launch Triton kernel and its peers.

Peers in the same suite: the eager PyTorch reference (what a user writes:
cosine similarity, min-max, sharpen, F.interpolate, adaptive_avg_pool2d)
and torch.compile of that same composition. Cases: a 24x24 grid (and a 64x64 one, the embedded saliency guidance), or
(576, 256) patch features with a text feature, to 512x512 with levels
512/256/128/64 (B=16) and to 1024x1024 with levels 1024/512/256/128 (B=4).

Each benchmark round makes REPS calls and then synchronises, so the
pytest-benchmark times are REPS calls (host launch cost included); extra_info
holds per-call numbers: wall_ms (best round / REPS), gpu_ms (CUDA-event time
from triton.testing.do_bench), out_MB, and floor_fraction = (output bytes /
3.0 TB/s) / gpu_ms, the fraction of the output-write floor reached.

    python -m pytest benchmarks/bench_pyramid.py -q -p no:cacheprovider \
        --benchmark-columns=min,median,rounds --benchmark-sort=name \
        --benchmark-json=$OUT/bench_pyramid.json
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

COPY_BW = 3.0e12  # bytes/s, H100 device copy (SPEC "Peers")
REPS = 20
GAMMA, DELTA = 2.0, 0.2

CASES = {
    "grid-B16-512": dict(B=16, features=False, sizes=[(512, 512), (256, 256), (128, 128), (64, 64)]),
    "grid-B4-1024": dict(B=4, features=False, sizes=[(1024, 1024), (512, 512), (256, 256), (128, 128)]),
    "grid64-B16-512": dict(B=16, features=False, grid=(64, 64), sizes=[(512, 512), (256, 256), (128, 128), (64, 64)]),
    "feat-B16-512": dict(B=16, features=True, sizes=[(512, 512), (256, 256), (128, 128), (64, 64)]),
    "feat-B4-1024": dict(B=4, features=True, sizes=[(1024, 1024), (512, 512), (256, 256), (128, 128)]),
}
IMPLS = ["triton", "triton-tf32x3", "triton-bf16out", "api", "eager", "compile"]
_COMPILED: dict = {}


def _inputs(case):
    g = torch.Generator(device="cuda").manual_seed(0)
    spec = CASES[case]
    gh, gw = spec.get("grid", (24, 24))
    if spec["features"]:
        scores = torch.randn(spec["B"], 576, 256, device="cuda", generator=g)
        text = torch.randn(spec["B"], 256, device="cuda", generator=g)
    else:
        scores, text = torch.randn(spec["B"], gh, gw, device="cuda", generator=g), None
    return scores, text, spec["sizes"]


def _fn(impl, scores, text, sizes):
    import ssattn
    from ssattn import reference as ref
    from ssattn.kernels import pyramid as kp

    grid = (24, 24) if text is not None else tuple(scores.shape[1:])
    if impl.startswith("triton"):
        from ssattn.reference.pyramid import NORM_EPS

        opts = {"triton": {}, "triton-tf32x3": {"precision": "tf32x3"}, "triton-bf16out": {"out_dtype": torch.bfloat16}}[impl]
        return lambda: kp.guidance_pyramid(scores, text, grid, sizes, GAMMA, DELTA, False, eps=NORM_EPS, **opts)
    kw = dict(gamma=GAMMA, delta=DELTA, text=text, grid_size=grid if text is not None else None)
    if impl == "api":
        return lambda: ssattn.guidance_pyramid(scores, sizes, backend="triton", **kw)
    if impl == "eager":
        return lambda: ref.guidance_pyramid(scores, sizes, **kw)
    key = (text is not None, tuple(sizes))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(lambda s, t: ref.guidance_pyramid(s, sizes, gamma=GAMMA, delta=DELTA, text=t,
                                                                          grid_size=grid if t is not None else None))
    comp = _COMPILED[key]
    return lambda: comp(scores, text)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_pyramid(benchmark, case, impl):
    with torch.no_grad():
        _bench(benchmark, case, impl)


def _bench(benchmark, case, impl):
    from triton.testing import do_bench

    from ssattn import reference as ref

    scores, text, sizes = _inputs(case)
    fn = _fn(impl, scores, text, sizes)
    outs = fn()  # warm-up: compiles, fills the weight cache
    # Keep the numbers honest: every peer must produce the reference maps.
    expect = ref.guidance_pyramid(scores, sizes, gamma=GAMMA, delta=DELTA, text=text,
                                  grid_size=(24, 24) if text is not None else None)
    assert all(o.shape == e.shape for o, e in zip(outs, expect))
    tol = 1e-2 if outs[0].dtype == torch.bfloat16 else 2e-5
    for o, e in zip(outs, expect):
        torch.testing.assert_close(o.float(), e.float(), rtol=0, atol=tol)

    def rounds():
        for _ in range(REPS):
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(rounds, rounds=30, warmup_rounds=3, iterations=1)
    gpu_ms = do_bench(fn, warmup=25, rep=200)
    out_bytes = sum(o.numel() * o.element_size() for o in outs)
    floor_ms = out_bytes / COPY_BW * 1e3
    benchmark.extra_info.update(
        case=case, impl=impl, wall_ms=benchmark.stats.stats.min / REPS * 1e3, gpu_ms=gpu_ms,
        out_MB=out_bytes / 1e6, floor_ms=floor_ms, floor_fraction=floor_ms / gpu_ms,
        device=torch.cuda.get_device_name(), torch=torch.__version__,
    )
    print(f"\n{case:>13} {impl:>15}: gpu {gpu_ms * 1e3:8.1f} us  wall {benchmark.extra_info['wall_ms'] * 1e3:8.1f} us"
          f"  out {out_bytes / 1e6:6.1f} MB  floor {floor_ms * 1e3:5.1f} us  ({floor_ms / gpu_ms:5.1%} of floor)")
