"""The reference-feature cache: a reference image's caption features never change during training.

Keyed per image by a SHA-256 of its content (dtype, shape, bytes) and of its
caption tokens when the language space uses them, under a settings id that
hashes the captioner's settings, a fingerprint of its weights, the spaces and
the autocast dtype. In memory (a dict, optionally bounded: oldest entries
first out) and optionally on disk through ssattn.guidance.cache.TensorCache
(atomic writes, checksummed entries, corrupt ones recomputed).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..guidance.cache import TensorCache

FORMAT = 1


def content_sha256(x: Tensor, tokens: Tensor | None = None) -> str:
    """SHA-256 of a tensor's dtype, shape and values (and of its caption tokens)."""
    h = hashlib.sha256()
    for t in (x,) if tokens is None else (x, tokens):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (two captioners with equal settings can differ in weights)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


class ReferenceFeatureCache:
    """Features of reference images by content: get(sha) -> {space: tensor} or None; put(sha, features)."""

    def __init__(self, settings: dict, *, cache_dir=None, max_items: int | None = None):
        self.settings = {"kind": "caption-features", "format": FORMAT, **settings}
        self.memory: OrderedDict[str, dict] = OrderedDict()
        self.max_items = max_items
        self.disk = TensorCache(cache_dir, self.settings) if cache_dir is not None else None
        self.hits = self.misses = 0

    def get(self, sha: str, device=None) -> dict | None:
        found = self.memory.get(sha)
        if found is None and self.disk is not None:
            found = self.disk.get(sha)
            if found is not None:
                self._remember(sha, found)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        return {k: v.to(device, non_blocking=True) for k, v in found.items()} if device is not None else found

    def put(self, sha: str, features: dict) -> None:
        features = {k: v.detach() for k, v in features.items()}
        if self.disk is not None:
            self.disk.put(sha, features)
        self._remember(sha, features)

    def _remember(self, sha: str, features: dict) -> None:
        self.memory[sha] = features
        self.memory.move_to_end(sha)
        while self.max_items is not None and len(self.memory) > self.max_items:
            self.memory.popitem(last=False)

    def __len__(self) -> int:
        return len(self.memory)
