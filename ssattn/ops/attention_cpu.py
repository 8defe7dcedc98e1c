"""Memory-linear masked cross-attention on CPU: SPEC 2 through PyTorch's CPU flash-attention kernel.

The reference materialises the (Nq, Nk) score matrix of every batch and head
(forward and backward: a 256x256 stage asks for 17 GB). PyTorch's CPU flash
kernel (aten::_scaled_dot_product_flash_attention_for_cpu) walks the keys in
blocks with an online softmax, forward and backward, so its memory is linear
in N. SPEC 2's per-key weight enters as K*m and V*m, whose autograd gives
dk, dv and the weight gradient dm; the key padding mask becomes an additive
-inf mask.

The kernel is called directly, not through F.scaled_dot_product_attention:
that dispatcher falls back silently to its math kernel (which materialises
the scores) for inputs the flash kernel does not take. The kernel reads its
inputs as if the head dim were contiguous (a strided head view gives wrong
values, NaN included), so q, k and v are made contiguous first: a linear copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backends

BACKEND = "cpu-flash"
OP = "masked_cross_attention"

# "auto" takes this path on CPU once the reference's score matrix of one call, B*h*Nq*Nk scores in float32,
# would pass 16 MiB. Measured (benchmarks/RESULTS.md "CPU attention", B*h = 1, d = 32, 1 thread): at 4 MiB
# of scores (N = 1024) the reference is as fast or faster (the flash backward has a fixed cost of ~8 ms); from
# ~20 MiB (N = 2304) the flash kernel is faster forward and backward, and the reference's memory, about
# three score matrices in fwd+bwd, grows as N^2 (3.1 GB at N = 16384 against 36 MB).
AUTO_MIN_SCORE_BYTES = 16 * 2**20

_backends.register(
    OP, BACKEND, auto_devices=("cpu",), devices_text="PyTorch's CPU flash-attention kernel runs on CPU tensors",
    dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
)


def worth_it(q: Tensor, k: Tensor) -> bool:
    """Whether "auto" should prefer this path to the reference for these sizes (see AUTO_MIN_SCORE_BYTES).

    Half precision always: the reference's bf16/fp16 matmuls on CPU were 3-18x slower than this kernel at every
    size measured (benchmarks/RESULTS.md, image-word cross-attention on CPU), and it sums in half precision.
    """
    if q.dtype in (torch.float16, torch.bfloat16):
        return True
    B, h, nq, _ = q.shape
    return B * h * nq * k.shape[-2] * 4 > AUTO_MIN_SCORE_BYTES


def masked_attention_cpu(q: Tensor, k: Tensor, v: Tensor, weight: Tensor | None, key_padding_mask: Tensor | None,
                         scale: float) -> Tensor:
    """SPEC 2 with memory linear in Nq and Nk, forward and backward (autograd through the flash kernel)."""
    if weight is not None:
        w = weight.to(k.dtype)[:, None, :, None]
        k, v = k * w, v * w
    mask = empty = None
    if key_padding_mask is not None:
        # A batch whose keys are all padded: left unmasked (a defined softmax, finite gradients), its output
        # zeroed below; the reference gives zeros there too.
        empty = key_padding_mask.all(dim=-1)
        padded = key_padding_mask & ~empty[:, None]
        mask = torch.zeros(padded.shape, dtype=q.dtype, device=q.device).masked_fill(padded, float("-inf"))
        mask = mask[:, None, None, :]
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask, scale=float(scale),
    )
    if empty is not None:
        out = out * (~empty).to(out.dtype)[:, None, None, None]
    return out
