"""What the router needs from a degradation classifier, and the helpers every classifier shares.

A classifier has ``classes`` (tuple of names), ``settings`` (JSON-able dict:
everything that changes its answers, for cache keys) and
``__call__(images) -> (B, C)`` class probabilities (float32, rows sum to 1,
on the images' device for a tensor batch). images is a (B, 3, H, W) batch in
[0, 1] or a list of (3, H, W) tensors / PIL images of any sizes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..images import to_image_tensor


@runtime_checkable
class Classifier(Protocol):
    classes: tuple[str, ...]
    settings: dict

    def __call__(self, images) -> Tensor:
        """(B, len(classes)) probabilities."""


def image_list(images) -> list[Tensor]:
    """images as a list of float (3, H, W) tensors in [0, 1]; errors name the argument."""
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a batch (B, 3, H, W) or a list of images, got shape {tuple(images.shape)}")
        return list(images.detach().float())
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a (B, 3, H, W) tensor or a list of images, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is empty")
    return [to_image_tensor(x).detach() for x in images]


def to_pil(image):
    """(3, H, W) tensor in [0, 1] or PIL image -> RGB PIL image (what transformers processors take)."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    x = to_image_tensor(image).detach().float().clamp(0, 1).cpu()
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8))


def batches(n: int, size: int):
    """Index ranges of consecutive batches of at most `size`."""
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def device_of(images, default=None) -> torch.device:
    if isinstance(images, Tensor):
        return images.device
    return torch.device(default or "cpu")
