"""Poisoned allocations: every tensor that torch.empty* creates inside the context is filled with NaN.

A kernel that leaves an output element unwritten then shows a NaN, which the
accuracy rule rejects. Test-only behaviour, so it lives here rather than in
the kernels' launchers.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_EMPTY = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default, torch.ops.aten.empty_strided.default,
          torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default}


class PoisonEmpty(TorchDispatchMode):
    """Fill floating tensors from empty allocations with NaN; count how many were poisoned."""

    def __init__(self):
        super().__init__()
        self.poisoned = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _EMPTY and out.is_floating_point():
            out.fill_(float("nan"))
            self.poisoned += 1
        return out
