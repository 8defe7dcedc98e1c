"""The reference-feature cache: a reference image's caption features never change during training.

ssattn.guidance.feature_cache.FeatureCache (in memory, optionally on disk with
atomic writes and checksummed entries) of kind "caption-features". An entry
is one image's features {space: (1, ...)}, keyed by a content hash of the
image (dtype, shape, values) and of its caption tokens when the language
space uses them; the settings id hashes the captioner's settings, a
fingerprint of its weights, the spaces and the autocast dtype.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from ..guidance.feature_cache import FeatureCache, content_key

KIND = "caption-features"


def reference_key(image: Tensor, tokens: Tensor | None = None) -> str:
    """The cache key of one reference image (C, H, W) and its caption tokens (T,), if any."""
    return content_key(image) if tokens is None else content_key(image, "tokens", tokens)


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (two captioners with equal settings can differ in weights)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(content_key(name, t).encode())
    return h.hexdigest()[:32]


def reference_cache(settings: dict, cache_dir=None, *, memory: int | None = None) -> FeatureCache:
    return FeatureCache(KIND, settings, cache_dir, memory=memory)


__all__ = ["KIND", "FeatureCache", "reference_cache", "reference_key", "weights_fingerprint"]
