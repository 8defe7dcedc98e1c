"""torch.library registrations: schemas, fake (meta) kernels and autograd.

Each op takes an `impl` string naming the implementation that runs it
("torch" for the explicit PyTorch formulas, "triton[:options]" for the
kernels), so one registered op serves every fast path and torch.compile sees
a single opaque node with a fake kernel.
"""

from . import attention, pyramid  # noqa: F401  (registers the ops)
