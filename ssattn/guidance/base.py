"""The Guide interface: images (+ optional prompts) -> guidance maps.

A guide works in two steps so that a dataset can be processed once and the
result cached compactly:

1. ``guide.grids(images, prompts)`` returns, per image, the *normalised*
   similarity grids (P, gh, gw) in [0, 1] -- SPEC 1 steps 1-2, one grid per
   prompt -- and the prompts used. This is what the cache stores.
2. ``render_maps(grids, size, gamma, delta, combine)`` sharpens, upsamples
   and combines them (SPEC 1 steps 3-5) through ``ssattn.guidance_pyramid``
   at any size, exactly. gamma, delta and the size are applied here, so
   changing them needs no model run.

Several prompts per image are combined over their sharpened maps:
``combine="max"`` (default: a pixel is foreground when any named object is
there) or ``"mean"``. ``BlipAligner(joint=True)`` instead joins an image's
prompts into one text ("fish, diver, coral") and yields one grid, which
is the paper's single-description setting.

``guide(images, prompts=None, gamma=, delta=)`` does both steps and returns
a (B, 1, H, W) tensor for a (B, 3, H, W) batch, or a list of (1, H_i, W_i)
maps for a list of images of different sizes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .. import _checks
from ..images import resize_image, to_image_tensor
from ..functional import guidance_pyramid

COMBINE_MODES = ("max", "mean")


@runtime_checkable
class Guide(Protocol):
    """What the cache, the CLI and the dataset need from a guidance method."""

    #: JSON-serialisable settings that change grids(); part of every cache key.
    settings: dict
    #: Square input size (S, S) images are resized to before the model.
    input_size: tuple[int, int]

    def preprocess(self, image: Tensor) -> Tensor:
        """(3, H, W) float in [0, 1] -> (3, S, S): resize_image(image, input_size) (what DataLoader workers run)."""

    def grids(self, images=None, prompts=None, *, preprocessed: Tensor | None = None
              ) -> tuple[list[Tensor], list[list[str]]]:
        """Per image normalised grids (P, gh, gw) in [0, 1] (float32, CPU) and the prompts used.

        images: a list of images or a (B, 3, H, W) batch; or preprocessed: the
        images already through preprocess(), stacked (B, 3, S, S).
        """


def normalized_grid(scores: Tensor, text: Tensor | None = None, grid_size=None, backend: str = "auto") -> Tensor:
    """SPEC 1 steps 1-2 through guidance_pyramid (gamma=1, delta=0 at the grid's own size): -> (B, gh, gw)."""
    if text is not None:
        gh, gw = grid_size
    else:
        gh, gw = scores.shape[-2:]
    (n,) = guidance_pyramid(scores, [(gh, gw)], gamma=1.0, delta=0.0, text=text, grid_size=grid_size, backend=backend)
    return n[:, 0].float()


def _check_render_args(gamma, delta, combine):
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")


def render_maps(grids: Tensor, sizes, *, gamma: float = 2.0, delta: float = 0.2, combine: str = "max",
                backend: str = "auto") -> list[Tensor]:
    """Guidance pyramid (one (1, H_l, W_l) map per size) of one image from its normalised grids (P, gh, gw).

    Each prompt's grid goes through ssattn.guidance_pyramid (sharpen, upsample,
    area pyramid); the P maps of each level are then combined by max or mean.
    """
    _check_render_args(gamma, delta, combine)
    if grids.dim() == 2:
        grids = grids.unsqueeze(0)
    if grids.dim() != 3 or grids.shape[0] < 1:
        raise ValueError(f"grids must have shape (P, gh, gw) with P >= 1, got {tuple(grids.shape)}")
    levels = guidance_pyramid(grids.float(), sizes, gamma=gamma, delta=delta, backend=backend)
    if combine == "max":
        return [m.amax(dim=0) for m in levels]
    return [m.mean(dim=0) for m in levels]


def as_image_list(images) -> tuple[list[Tensor], bool]:
    """Images as a list of (3, H, W) float tensors, and whether the input was one (B, 3, H, W) batch."""
    if isinstance(images, Tensor) and images.dim() == 4:
        if images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        return [to_image_tensor(x) for x in images], True
    if isinstance(images, Tensor) and images.dim() == 3:
        raise ValueError("images must be a batch (B, 3, H, W) or a list of images; got one (3, H, W) tensor, "
                         "wrap it in a list")
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a (B, 3, H, W) tensor or a list of PIL images / tensors, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is empty")
    return [to_image_tensor(x) for x in images], False


class GuideBase:
    """Shared __call__: grids() then render_maps() at each image's own size."""

    settings: dict
    input_size: tuple[int, int]
    backend: str = "auto"

    def preprocess(self, image: Tensor) -> Tensor:
        return resize_image(to_image_tensor(image).float(), self.input_size)

    def __call__(self, images, prompts=None, *, gamma: float = 2.0, delta: float = 0.2, combine: str = "max"):
        """Guidance maps: (B, 1, H, W) for a (B, 3, H, W) batch, else a list of (1, H_i, W_i)."""
        _check_render_args(gamma, delta, combine)
        imgs, batched = as_image_list(images)
        grids, _ = self.grids(imgs, prompts)
        maps = [
            render_maps(g, [tuple(img.shape[-2:])], gamma=gamma, delta=delta, combine=combine, backend=self.backend)[0]
            for g, img in zip(grids, imgs)
        ]
        return torch.stack(maps) if batched else maps


class SaliencyGuide(GuideBase):
    """The embedded default, no weights, no prompts: method "water-contrast" (default) or "spectral-residual"
    (ssattn.guidance.embedded.METHODS)."""

    def __init__(self, grid: int | None = None, device=None, backend: str = "auto", method: str | None = None):
        from . import embedded, saliency

        self.method = method or embedded.DEFAULT_METHOD
        _checks.choice("method", self.method, embedded.METHODS)
        self.grid = int(grid or saliency.GRID)
        # Saliency works on a small grey image: decode-side resizing to 4x the grid keeps workers cheap.
        self.input_size = (4 * self.grid, 4 * self.grid)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.backend = backend
        self.settings = {"method": "saliency", "cue": self.method, "grid": self.grid,
                         "input_size": list(self.input_size)}

    def grids(self, images=None, prompts=None, *, preprocessed: Tensor | None = None):
        from .embedded import guidance_grid

        if preprocessed is not None:
            batch = preprocessed
        elif images is None:
            raise ValueError("grids() needs images or preprocessed")
        else:
            imgs, _ = as_image_list(images)
            batch = torch.stack([self.preprocess(x) for x in imgs])
        n = normalized_grid(guidance_grid(batch.to(self.device), self.method, self.grid), backend=self.backend)
        return [g.unsqueeze(0).cpu() for g in n], [[] for _ in range(n.shape[0])]
