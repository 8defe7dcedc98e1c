"""CLIP's image preprocessing as differentiable torch ops on a (B, 3, H, W) tensor in [0, 1].

The enhanced image needs gradients, so the processor's PIL pipeline (resize
the shortest side, centre crop, rescale, normalise) is replayed on the
tensor: resize with torch's antialiased bicubic (bilinear) interpolation,
which follows PIL's filters, then the processor's crop arithmetic and
normalisation. Every constant comes from the image processor's config
(`size`, `crop_size`, `resample`, `image_mean`, `image_std`, the do_* flags).
The input is already rescaled to [0, 1]: `rescale_factor` (1/255 for uint8)
is not applied again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks

# PIL resample codes (PIL.Image.Resampling) the tensor path reproduces.
_MODES = {2: "bilinear", 3: "bicubic"}


def _int(value) -> int:
    return int(getattr(value, "value", value))


def resize_size(h: int, w: int, size: dict) -> tuple[int, int]:
    """The processor's output size: {"shortest_edge": S} keeps the aspect ratio (int(S * long / short))."""
    if "shortest_edge" in size:
        s = int(size["shortest_edge"])
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        return (new_long, s) if w <= h else (s, new_long)
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"image processor size must have 'shortest_edge' or 'height' and 'width', got {size!r}")


class ClipPreprocess(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> pixel_values (B, 3, crop_h, crop_w), as CLIP's image processor computes."""

    def __init__(self, config: dict):
        super().__init__()
        self.do_resize = bool(config.get("do_resize", True))
        self.do_center_crop = bool(config.get("do_center_crop", True))
        self.do_normalize = bool(config.get("do_normalize", True))
        self.size = dict(config.get("size") or {"shortest_edge": 224})
        crop = config.get("crop_size") or {"height": 224, "width": 224}
        self.crop = (int(crop["height"]), int(crop["width"]))
        resample = _int(config.get("resample", 3))
        if self.do_resize and resample not in _MODES:
            raise ValueError(f"image processor resample={resample} has no tensor equivalent here; "
                             f"expected one of {sorted(_MODES)} (PIL bilinear, bicubic)")
        self.mode = _MODES.get(resample, "bicubic")
        mean = config.get("image_mean") or (0.0, 0.0, 0.0)
        std = config.get("image_std") or (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_processor(cls, processor) -> "ClipPreprocess":
        """From an image processor object (or a processor holding one as .image_processor)."""
        processor = getattr(processor, "image_processor", processor)
        return cls(processor.to_dict())

    def settings(self) -> dict:
        return {"resize": self.size if self.do_resize else None, "mode": self.mode,
                "crop": list(self.crop) if self.do_center_crop else None,
                "mean": self.mean.flatten().tolist() if self.do_normalize else None,
                "std": self.std.flatten().tolist() if self.do_normalize else None}

    def forward(self, images: Tensor) -> Tensor:
        _checks.tensor("images", images, ndim=4)
        if images.shape[1] != 3 or images.shape[2] < 1 or images.shape[3] < 1:
            raise ValueError(f"images must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
        x = images
        if self.do_resize:
            size = resize_size(x.shape[2], x.shape[3], self.size)
            if size != tuple(x.shape[2:]):
                # antialias: PIL's filters widen with the scale factor when downsampling
                x = resize_like_pil(x, size, self.mode)
        if self.do_center_crop:
            x = center_crop(x, self.crop)
        if self.do_normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x


def resize_like_pil(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """PIL's two-pass resize of an 8-bit image: width first, then height, each pass clipped to [0, 1].

    torch's antialiased filters are PIL's; PIL stores each pass in 8 bits, so a pass's
    overshoot at sharp edges is clipped before the next (the rounding is not reproduced).
    """
    if size[1] != x.shape[-1]:
        x = F.interpolate(x, size=(x.shape[-2], size[1]), mode=mode, align_corners=False, antialias=True).clamp(0, 1)
    if size[0] != x.shape[-2]:
        x = F.interpolate(x, size=(size[0], x.shape[-1]), mode=mode, align_corners=False, antialias=True).clamp(0, 1)
    return x


def center_crop(x: Tensor, crop: tuple[int, int]) -> Tensor:
    """The processor's centre crop: top = (H - h) // 2, left = (W - w) // 2, zero padding where the image is smaller."""
    H, W = x.shape[-2:]
    h, w = crop
    if H < h or W < w:  # pad symmetrically as the processor does, then crop
        ph, pw = max(0, h - H), max(0, w - W)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        H, W = x.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]
