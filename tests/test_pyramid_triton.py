"""The one-launch Triton guidance pyramid (ssattn/kernels/pyramid.py) against the float64 reference.

On CPU the kernel runs in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small; the GPU-marked tests repeat the
cases on CUDA and add the production sizes. Every kernel call uses the
"poison" option (outputs pre-filled with NaN) so an element the kernel
never writes fails the accuracy check.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import ssattn
from ssattn import reference as ref
from ssattn.reference.pyramid import NORM_EPS
from tests._accuracy import assert_accurate
from tests._poison import PoisonEmpty

kp = pytest.importorskip("ssattn.kernels.pyramid")

HAS_CUDA = torch.cuda.is_available()
f64 = torch.float64
# CPU tensors reach the kernel only through the interpreter; on a CUDA machine the gpu tests cover it.
interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                            reason="CPU tensors run the kernel only under TRITON_INTERPRET=1")


_OUT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def launcher_kwargs(options: str) -> dict:
    """The launcher's keyword arguments from a compact test notation such as "ppi=3,rows=16,tile=16x32,out=fp16"."""
    kw = {}
    for tok in filter(None, options.split(",")):
        key, _, val = tok.partition("=")
        if key == "out":
            kw["out_dtype"] = _OUT[val]
        elif key == "prec":
            kw["precision"] = val
        elif key == "tile":
            kw["tile"] = tuple(int(v) for v in val.split("x"))
        else:
            kw[key] = int(val)
    return kw


def run_kernel(scores, sizes, *, gamma=2.0, delta=0.2, text=None, grid_size=None, renormalize=False, options=""):
    """The launcher with its outputs poisoned (NaN-filled) first, so an element it does not write shows."""
    if grid_size is None:
        grid_size = tuple(scores.shape[1:])
    with PoisonEmpty():
        return kp.guidance_pyramid(scores, text, grid_size, sizes, gamma, delta, renormalize, eps=NORM_EPS,
                                   **launcher_kwargs(options))


def check_against_reference(maps, scores, sizes, *, gamma=2.0, delta=0.2, text=None, grid_size=None,
                            renormalize=False, out_dtype=None):
    """The accuracy rule on every level: the fast maps vs the reference in the same dtype, both vs float64."""
    kw = dict(gamma=gamma, delta=delta, renormalize=renormalize,
              grid_size=grid_size if text is not None else None)
    same = ref.guidance_pyramid(scores, sizes, text=text, **kw)
    truth = ref.guidance_pyramid(scores.double(), sizes, text=None if text is None else text.double(), **kw)
    assert len(maps) == len(sizes)
    errors = []
    for i, (m, r, t, (h, w)) in enumerate(zip(maps, same, truth, sizes)):
        assert m.shape == (scores.shape[0], 1, h, w), f"level {i}: shape {tuple(m.shape)}"
        assert m.dtype == (out_dtype or scores.dtype), f"level {i}: dtype {m.dtype}"
        assert m.is_contiguous()
        errors.append(assert_accurate(m, r.to(m.dtype), t, name=f"level {i} {h}x{w}"))
    return errors


# (B, grid, sizes, gamma, delta, renormalize): awkward sizes, overlapping windows, tiny levels,
# a level equal to sizes[0], grids below 16 and not powers of two, a downsampling "upsample".
GRID_CASES = [
    (2, (24, 24), [(255, 257), (128, 129), (64, 65), (7, 3), (1, 1)], 2.0, 0.2, False),
    (1, (14, 14), [(97, 64), (48, 32), (7, 7)], 1.0, 0.0, True),
    (3, (32, 32), [(64, 64), (32, 32), (16, 16), (8, 8)], 3.5, 0.95, True),
    (1, (7, 5), [(33, 17), (33, 17), (1, 17)], 1.7, 0.5, False),
    (2, (32, 32), [(20, 24), (5, 7)], 2.0, 0.2, False),
    (1, (40, 33), [(50, 70), (10, 7)], 2.0, 0.2, False),  # padded to 64x64, the largest kernel grid
]


def _devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


# --------------------------------------------------------------------------- weights (no Triton)
@pytest.mark.parametrize("grid,sizes", [((24, 24), [(255, 257), (128, 129), (7, 3), (1, 1)]),
                                        ((5, 9), [(5, 9), (4, 4), (2, 9)]), ((32, 30), [(20, 24), (5, 7)])])
def test_level_matrices_reproduce_interpolate_and_adaptive_pool_in_float64(grid, sizes):
    s = torch.rand(2, *grid, dtype=f64)
    up = F.interpolate(s[:, None], size=sizes[0], mode="bilinear", align_corners=False)
    wys = kp.level_matrices(grid[0], sizes[0][0], [h for h, _ in sizes])
    wxs = kp.level_matrices(grid[1], sizes[0][1], [w for _, w in sizes])
    for (h, w), wy, wx in zip(sizes, wys, wxs):
        expect = F.adaptive_avg_pool2d(up, (h, w))[:, 0]
        got = torch.from_numpy(wy) @ s @ torch.from_numpy(wx).T
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-13)
        # each row of a weight matrix is an average of convex combinations: rows sum to 1
        torch.testing.assert_close(torch.from_numpy(wy.sum(1)), torch.ones(h, dtype=f64), rtol=0, atol=1e-13)


# --------------------------------------------------------------------------- grid path
@interp
@pytest.mark.parametrize("case", range(len(GRID_CASES)))
def test_grid_path_matches_reference(case):
    B, grid, sizes, gamma, delta, renorm = GRID_CASES[case]
    scores = torch.randn(B, *grid)
    maps = run_kernel(scores, sizes, gamma=gamma, delta=delta, renormalize=renorm)
    check_against_reference(maps, scores, sizes, gamma=gamma, delta=delta, renormalize=renorm)


@interp
@pytest.mark.parametrize("options", ["ppi=1", "ppi=3,rows=16,tile=16x32", "ppi=64,tile=32x16", "tile=64x64,rows=200"])
def test_work_split_options_give_the_same_maps(options):
    # Every work split and tile shape writes each element exactly once with the same value.
    scores = torch.randn(2, 24, 24)
    sizes = [(70, 50), (35, 25), (9, 4), (1, 1)]
    maps = run_kernel(scores, sizes, options=options)
    check_against_reference(maps, scores, sizes)


@interp
def test_non_contiguous_grid_and_half_inputs():
    scores = torch.randn(2, 20, 24).transpose(1, 2)  # (2, 24, 20), strides (480, 1, 24)
    sizes = [(61, 50), (30, 25), (3, 2)]
    check_against_reference(run_kernel(scores, sizes), scores, sizes)
    for dtype in (torch.float16, torch.bfloat16):
        half = scores.to(dtype)
        check_against_reference(run_kernel(half, sizes), half, sizes)


@interp
@pytest.mark.parametrize("out", ["fp16", "bf16", "fp32"])
def test_output_dtype_option(out):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[out]
    scores = torch.randn(2, 16, 16)
    sizes = [(40, 40), (20, 20), (5, 5)]
    maps = run_kernel(scores, sizes, options=f"out={out}")
    check_against_reference(maps, scores, sizes, out_dtype=dtype)


@interp
def test_constant_grids_give_exact_zeros_and_do_not_disturb_other_images():
    scores = torch.randn(3, 12, 12)
    scores[1] = 0.37
    sizes = [(50, 31), (25, 15), (1, 1)]
    for renorm in (False, True):
        maps = run_kernel(scores, sizes, renormalize=renorm, options="ppi=2")
        for m in maps:
            assert torch.equal(m[1], torch.zeros_like(m[1]))
        check_against_reference(
            [m[[0, 2]] for m in maps], scores[[0, 2]], sizes, renormalize=renorm
        )


@interp
def test_delta_near_one_and_gamma_one():
    scores = torch.randn(2, 24, 24)
    sizes = [(64, 48), (16, 12)]
    for gamma, delta in ((1.0, 0.0), (1.0, 0.95), (4.0, 0.95), (2.0, 0.999)):
        for renorm in (False, True):
            maps = run_kernel(scores, sizes, gamma=gamma, delta=delta, renormalize=renorm)
            check_against_reference(maps, scores, sizes, gamma=gamma, delta=delta, renormalize=renorm)
            if renorm:
                # M_sem's peak is at most 1 and reaches almost 1 near the grid's argmax
                assert maps[0].max() <= 1.0 + 1e-6


@interp
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_or_inf_in_an_image_gives_nan_maps_for_that_image_only():
    scores = torch.randn(2, 10, 10)
    sizes = [(30, 20), (4, 4)]
    for bad in (float("nan"), float("inf"), float("-inf")):
        s = scores.clone()
        s[0, 3, 4] = bad
        maps = run_kernel(s, sizes)
        truth = ref.guidance_pyramid(s.double(), sizes)
        for m, t in zip(maps, truth):
            assert torch.isnan(m[0]).all()
            assert torch.isnan(t[0]).any()  # the reference is NaN there too (for +inf only near the cell)
        check_against_reference([m[1:] for m in maps], s[1:], sizes)


@interp
def test_float64_and_oversized_grids_take_the_pytorch_formulas():
    scores = torch.randn(2, 6, 7, dtype=f64)
    sizes = [(13, 11), (3, 3)]
    for m, r in zip(ssattn.guidance_pyramid(scores, sizes, backend="triton"), ref.guidance_pyramid(scores, sizes)):
        torch.testing.assert_close(m, r, rtol=0, atol=1e-15)
    big = torch.randn(1, 130, 129)
    with pytest.warns(RuntimeWarning, match="130x129"):
        maps = ssattn.guidance_pyramid(big, [(140, 135)], backend="triton")
    torch.testing.assert_close(maps[0], ref.guidance_pyramid(big, [(140, 135)])[0])
    assert not kp.fits(130, 129) and kp.fits(64, 64)


def test_bad_options_and_shapes_raise():
    scores = torch.randn(1, 4, 4)
    with pytest.raises(ValueError, match="out_dtype"):
        kp.guidance_pyramid(scores, None, (4, 4), [(8, 8)], 2.0, 0.2, False, eps=1e-8, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="tile"):
        run_kernel(scores, [(8, 8)], options="tile=24x32")
    with pytest.raises(ValueError, match="grid"):
        kp.guidance_pyramid(scores, None, (4, 5), [(8, 8)], 2.0, 0.2, False, eps=1e-8)
    with pytest.raises(ValueError, match="takes"):
        kp.guidance_pyramid(scores.double(), None, (4, 4), [(8, 8)], 2.0, 0.2, False, eps=1e-8)


# --------------------------------------------------------------------------- features + text path
@interp
@pytest.mark.parametrize("text_batched", [False, True])
def test_features_path_matches_reference(text_batched):
    B, grid, cf = 2, (14, 12), 97
    feats = torch.randn(B, cf, grid[0] * grid[1]).transpose(1, 2)  # non-contiguous (B, P, Cf)
    text = torch.randn(B, cf) if text_batched else torch.randn(2 * cf)[::2]  # (Cf,) with stride 2
    sizes = [(57, 70), (28, 35), (7, 9), (1, 1)]
    maps = run_kernel(feats, sizes, text=text, grid_size=grid, gamma=2.5, delta=0.1, options="ppi=2")
    check_against_reference(maps, feats, sizes, text=text, grid_size=grid, gamma=2.5, delta=0.1)


@interp
def test_features_path_half_inputs_and_degenerate_vectors():
    B, grid, cf = 2, (8, 8), 40
    feats = torch.randn(B, 64, cf)
    feats[0, 5] = 0.0  # a zero patch feature: eps-guarded norm gives similarity 0
    text = torch.randn(B, cf)
    sizes = [(24, 24), (6, 6)]
    maps = run_kernel(feats, sizes, text=text, grid_size=grid)
    check_against_reference(maps, feats, sizes, text=text, grid_size=grid)
    # (no zero patch in half: the reference's eps 1e-8 underflows to 0 in float16 and gives 0/0)
    h = torch.randn(B, 64, cf).half()
    maps = run_kernel(h, sizes, text=text.half(), grid_size=grid)
    check_against_reference(maps, h, sizes, text=text.half(), grid_size=grid)
    # a zero text feature makes every similarity 0: constant grid, zero maps
    zero = run_kernel(feats, sizes, text=torch.zeros(cf), grid_size=grid)
    assert all(torch.equal(m, torch.zeros_like(m)) for m in zero)
    # NaN in one image's features gives NaN maps for that image only
    bad = feats.clone()
    bad[1, 7, 3] = float("nan")
    maps = run_kernel(bad, sizes, text=text, grid_size=grid)
    assert all(torch.isnan(m[1]).all() and not torch.isnan(m[0]).any() for m in maps)


# --------------------------------------------------------------------------- op and public API
def _flat(sizes):
    return [v for hw in sizes for v in hw]


@interp
@pytest.mark.parametrize("out_dtype", [None, torch.float16])
def test_opcheck(out_dtype):
    scores = torch.randn(2, 4, 5)
    args = (scores, None, [4, 5], _flat([(9, 7), (3, 2)]), 2.0, 0.2, False, "triton", out_dtype)
    torch.library.opcheck(torch.ops.ssattn.guidance_pyramid.default, args)
    feats, text = torch.randn(1, 12, 6), torch.randn(6)
    args = (feats, text, [3, 4], _flat([(5, 8), (2, 2)]), 1.5, 0.0, True, "triton", out_dtype)
    torch.library.opcheck(torch.ops.ssattn.guidance_pyramid.default, args)


@interp
def test_public_api_runs_the_kernel_for_backend_triton(monkeypatch):
    calls = []
    real = kp.guidance_pyramid

    def counting(*args, **kwargs):
        calls.append(args[6:])
        return real(*args, **kwargs)

    monkeypatch.setattr(kp, "guidance_pyramid", counting)
    scores = torch.randn(2, 9, 11)
    sizes = [(30, 33), (15, 16), (2, 2)]
    maps = ssattn.guidance_pyramid(scores, sizes, gamma=1.5, delta=0.1, renormalize=True, backend="triton")
    assert len(calls) == 1
    check_against_reference(maps, scores, sizes, gamma=1.5, delta=0.1, renormalize=True)
    feats, text = torch.randn(2, 20, 8), torch.randn(2, 8)
    maps = ssattn.guidance_pyramid(feats, sizes, text=text, grid_size=(4, 5), backend="triton")
    assert len(calls) == 2
    check_against_reference(maps, feats, sizes, text=text, grid_size=(4, 5))


@interp
def test_inputs_that_require_grad():
    # The kernel has no backward: "auto" gives the differentiable reference, an explicit
    # backend="triton" refuses while grad is recorded, and runs the kernel under no_grad.
    scores = torch.randn(1, 6, 6, requires_grad=True)
    sizes = [(12, 12), (3, 3)]
    maps = ssattn.guidance_pyramid(scores, sizes, backend="auto")
    assert maps[0].grad_fn is not None
    maps[1].sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    with pytest.raises(ValueError, match="no backward"):
        ssattn.guidance_pyramid(scores, sizes, backend="triton")
    feats, text = torch.randn(1, 36, 4), torch.randn(4, requires_grad=True)
    with pytest.raises(ValueError, match="no backward"):
        ssattn.guidance_pyramid(feats, sizes, text=text, grid_size=(6, 6), backend="triton")
    with torch.no_grad():
        maps = ssattn.guidance_pyramid(scores, sizes, backend="triton")
    assert maps[0].grad_fn is None
    check_against_reference(maps, scores.detach(), sizes)


def test_torch_compile_sees_the_op():
    if os.environ.get("TRITON_INTERPRET") != "1" and not HAS_CUDA:
        pytest.skip("no Triton device")
    device = "cuda" if HAS_CUDA else "cpu"
    scores = torch.randn(2, 6, 6, device=device)
    sizes = [(12, 10), (3, 5)]

    def fn(s):
        return [m * 2 for m in ssattn.guidance_pyramid(s, sizes, backend="triton")]

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    for a, b in zip(compiled(scores), fn(scores)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GRID_CASES)))
def test_gpu_grid_cases(case):
    B, grid, sizes, gamma, delta, renorm = GRID_CASES[case]
    scores = torch.randn(B, *grid, device="cuda")
    maps = run_kernel(scores, sizes, gamma=gamma, delta=delta, renormalize=renorm)
    check_against_reference(maps, scores, sizes, gamma=gamma, delta=delta, renormalize=renorm)


@pytest.mark.gpu
@pytest.mark.parametrize("B,sizes", [
    (64, [(512, 512), (256, 256), (128, 128), (64, 64)]),
    (2, [(1024, 1024), (512, 512), (256, 256), (128, 128)]),
    (3, [(1023, 1025), (500, 333), (97, 1), (1, 1)]),
])
@pytest.mark.parametrize("options", ["", "prec=tf32x3", "ppi=1", "tile=128x64,rows=512"])
def test_gpu_large(B, sizes, options):
    scores = torch.randn(B, 24, 24, device="cuda")
    maps = run_kernel(scores, sizes, gamma=2.0, delta=0.2, options=options)
    check_against_reference(maps, scores, sizes)


@pytest.mark.gpu
@pytest.mark.parametrize("grid", [(64, 64), (14, 14), (37, 37)])
def test_gpu_other_grids(grid):
    scores = torch.randn(16, *grid, device="cuda")
    sizes = [(512, 512), (256, 256), (128, 128), (64, 64)]
    check_against_reference(run_kernel(scores, sizes), scores, sizes)
    feats, text = torch.randn(4, grid[0] * grid[1], 768, device="cuda"), torch.randn(768, device="cuda")
    maps = run_kernel(feats, sizes, text=text, grid_size=grid)
    check_against_reference(maps, feats, sizes, text=text, grid_size=grid)


@pytest.mark.gpu
@pytest.mark.parametrize("B,text_batched", [(16, True), (4, False), (64, True)])
def test_gpu_features(B, text_batched):
    feats = torch.randn(B, 576, 256, device="cuda")
    text = torch.randn(B, 256, device="cuda") if text_batched else torch.randn(256, device="cuda")
    sizes = [(512, 512), (256, 256), (128, 128), (64, 64)]
    maps = run_kernel(feats, sizes, text=text, grid_size=(24, 24))
    check_against_reference(maps, feats, sizes, text=text, grid_size=(24, 24))
    bf = feats.bfloat16()
    maps = run_kernel(bf, sizes, text=text.bfloat16(), grid_size=(24, 24))
    check_against_reference(maps, bf, sizes, text=text.bfloat16(), grid_size=(24, 24))


@pytest.mark.gpu
@pytest.mark.parametrize("gamma", [1.0, 1.3, 2.0, 2.5, 7.0])
@pytest.mark.parametrize("delta", [0.0, 0.2, 0.95])
def test_gpu_libdevice_pow_and_renormalize(gamma, delta):
    scores = torch.randn(4, 32, 32, device="cuda")
    sizes = [(256, 256), (64, 64)]
    for renorm in (False, True):
        maps = run_kernel(scores, sizes, gamma=gamma, delta=delta, renormalize=renorm)
        check_against_reference(maps, scores, sizes, gamma=gamma, delta=delta, renormalize=renorm)


@pytest.mark.gpu
def test_gpu_half_outputs_nan_and_opcheck():
    scores = torch.randn(8, 24, 24, device="cuda")
    sizes = [(256, 256), (128, 128)]
    for out, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        check_against_reference(run_kernel(scores, sizes, options=f"out={out}"), scores, sizes, out_dtype=dtype)
    s = scores.clone()
    s[3, 0, 0] = float("nan")
    maps = run_kernel(s, sizes)
    assert torch.isnan(maps[0][3]).all() and not torch.isnan(maps[0][[0, 1, 2, 4]]).any()
    args = (scores, None, [24, 24], _flat(sizes), 2.0, 0.2, False, "triton")
    torch.library.opcheck(torch.ops.ssattn.guidance_pyramid.default, args)
    maps = ssattn.guidance_pyramid(scores, sizes)  # "auto" on CUDA picks the kernel
    check_against_reference(maps, scores, sizes)
