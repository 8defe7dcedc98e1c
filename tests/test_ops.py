"""torch.library registration: opcheck on every op, and torch.compile(fullgraph=True) without graph breaks."""

import pytest
import torch

import ssattn
from ssattn import reference as ref


def _attention_inputs(weight=True, pad=False, grad=True, dtype=torch.float32):
    B, h, nq, nk, d = 2, 2, 5, 6, 4
    q, k, v = (torch.randn(B, h, n, d, dtype=dtype, requires_grad=grad) for n in (nq, nk, nk))
    w = torch.rand(B, nk, dtype=dtype, requires_grad=grad) if weight else None
    kpm = None
    if pad:
        kpm = torch.zeros(B, nk, dtype=torch.bool)
        kpm[0, 1] = True
        kpm[1] = True
    return q, k, v, w, kpm


@pytest.mark.parametrize("weight,pad", [(True, False), (False, False), (True, True)])
def test_opcheck_attention(weight, pad):
    q, k, v, w, kpm = _attention_inputs(weight, pad)
    # test_aot_dispatch_dynamic is left to test_compiled_op_matches_eager_with_gradients (aot_eager, fwd + bwd):
    # under the Triton interpreter its symbolic-shape tracing trips over the interpreter's tensor patching.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.ssattn.masked_attention_fwd, (q, k, v, w, kpm, 0.5, "triton", "ieee", False),
                          test_utils=utils)
    out, lse = torch.ops.ssattn.masked_attention_fwd(q, k, v, w, kpm, 0.5, "triton", "ieee", False)
    # The backward op has no autograd of its own (no double backward): check it on plain tensors.
    plain = [None if t is None else t.detach() for t in (q, k, v, w)]
    args = (torch.randn_like(out), *plain, kpm, out.detach(), lse.detach(), 0.5, weight, "triton", "ieee", False)
    torch.library.opcheck(torch.ops.ssattn.masked_attention_bwd, args, test_utils=utils)


def test_opcheck_pyramid():
    scores = torch.randn(2, 4, 5)
    torch.library.opcheck(torch.ops.ssattn.guidance_pyramid, (scores, None, [4, 5], [9, 7, 3, 2], 2.0, 0.2, False, "triton"))
    feats, text = torch.randn(2, 20, 6), torch.randn(6)
    torch.library.opcheck(torch.ops.ssattn.guidance_pyramid, (feats, text, [4, 5], [9, 7, 1, 1], 1.0, 0.0, True, "triton"))


def test_compiled_op_matches_eager_with_gradients():
    q, k, v, w, kpm = _attention_inputs(pad=True)

    def f(q, k, v, w):
        return torch.ops.ssattn.masked_attention_fwd(q, k, v, w, kpm, 0.5, "triton", "ieee", False)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    do = torch.randn(2, 2, 5, 4)
    got = torch.autograd.grad(compiled(q, k, v, w), (q, k, v, w), do)
    want = torch.autograd.grad(ref.masked_cross_attention(q, k, v, w, kpm, 0.5), (q, k, v, w), do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _ss_step(block, loss_fn):
    def step(dec, enc, guidance):
        maps = ssattn.guidance_pyramid(guidance[:, 0], [(8, 8), (4, 4)], backend="auto")
        y = block(dec, enc, maps[0])
        return y, loss_fn([y], [maps[0]])

    return step


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_public_api_compiles_fullgraph(backend):
    block = ssattn.SemanticCrossAttention(8, 6, heads=2)
    torch.nn.init.normal_(block.out_proj.weight)
    loss_fn = ssattn.SemanticAlignmentLoss(backend="reference")
    step = _ss_step(block, loss_fn)
    dec, enc, g = torch.randn(2, 8, 8, 8, requires_grad=True), torch.randn(2, 6, 4, 4), torch.rand(2, 1, 8, 8)
    y_eager, l_eager = step(dec, enc, g)
    y, loss = torch.compile(step, fullgraph=True, backend=backend)(dec, enc, g)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(loss, l_eager)
    (g_compiled,) = torch.autograd.grad(loss + y.sum(), dec)
    (g_eager,) = torch.autograd.grad(l_eager + y_eager.sum(), dec)
    torch.testing.assert_close(g_compiled, g_eager)
