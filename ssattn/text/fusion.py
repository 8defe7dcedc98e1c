"""Information Fusion Attention (NaLSuper text guidance's IFA): channel, pixel and cross-layer attention.

Definitions: docs/operations.md, section 6. Plain PyTorch (these are cheap
next to the attention stages); every module compiles with
torch.compile(fullgraph=True). Text enters as the masked mean of the word
features, so an image with no words gets the image-only path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from .modules import check_words


def pooled_words(words: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of the unpadded word features (B, Ct); zeros for an image whose words are all padded."""
    if mask is None:
        return words.mean(1)
    keep = (~mask).to(words.dtype)[..., None]
    return (words * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class _TextDescriptor(nn.Module):
    """The pooled image descriptor, with the pooled words projected to `hidden` features appended."""

    def __init__(self, text_channels: int | None, hidden: int):
        super().__init__()
        self.text_channels = None if text_channels is None else _positive("text_channels", text_channels)
        self.text_proj = None if text_channels is None else nn.Linear(text_channels, hidden)

    def forward(self, pooled: Tensor, words: Tensor | None, mask: Tensor | None) -> Tensor:
        if self.text_proj is None:
            if words is not None:
                raise ValueError("words were given but this module was built without text_channels")
            return pooled
        if words is None:
            raise ValueError("this module was built with text_channels: pass words (B, L, Ct)")
        check_words(words, mask, None, batch=pooled.shape[0], channels=self.text_channels)
        return torch.cat([pooled, self.text_proj(pooled_words(words, mask))], dim=1)


class ChannelAttention(nn.Module):
    """y = x * sigmoid(W_2 relu(W_1 [avgpool(x); W_t pool(words)]))[:, :, None, None] (per-channel gates)."""

    def __init__(self, channels: int, reduction: int = 8, text_channels: int | None = None):
        super().__init__()
        self.channels = _positive("channels", channels)
        hidden = max(1, channels // _positive("reduction", reduction))
        self.text = _TextDescriptor(text_channels, channels)
        width = channels * (1 if text_channels is None else 2)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, channels)

    def forward(self, x: Tensor, words: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        _checks.tensor("x", x, ndim=4)
        if x.shape[1] != self.channels:
            raise ValueError(f"x must have {self.channels} channels, got shape {tuple(x.shape)}")
        z = self.text(x.mean((2, 3)), words, mask)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(z))))
        return x * gate[:, :, None, None].to(x.dtype)


class PixelAttention(nn.Module):
    """y = x * sigmoid(conv_2 relu(conv_1 x)), 1x1 convolutions to C/r channels and to one (per-pixel gates)."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.channels = _positive("channels", channels)
        hidden = max(1, channels // _positive("reduction", reduction))
        self.conv1, self.conv2 = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        _checks.tensor("x", x, ndim=4)
        if x.shape[1] != self.channels:
            raise ValueError(f"x must have {self.channels} channels, got shape {tuple(x.shape)}")
        return x * torch.sigmoid(self.conv2(F.relu(self.conv1(x))))


class CrossLayerAttentionFusion(nn.Module):
    """CAFB: features of several decoder levels, fused with learned per-channel attention over the levels.

    G_l = resize(P_l F_l) (1x1 projection to `channels`, bilinear to the first
    level's size or `size`); z = relu(W_z [sum_l avgpool(G_l); W_t pool(words)]);
    a = softmax over l of (W_l z) (B, n, channels); y = sum_l a_l * G_l.
    """

    def __init__(self, level_channels: Sequence[int], channels: int, text_channels: int | None = None,
                 reduction: int = 4):
        super().__init__()
        if isinstance(level_channels, int) or not isinstance(level_channels, Sequence) or len(level_channels) < 2:
            raise ValueError(f"level_channels must list the channels of at least two levels, got {level_channels!r}")
        self.level_channels = [_positive(f"level_channels[{i}]", c) for i, c in enumerate(level_channels)]
        self.channels = _positive("channels", channels)
        hidden = max(1, channels // _positive("reduction", reduction))
        self.proj = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in self.level_channels)
        self.text = _TextDescriptor(text_channels, channels)
        self.squeeze = nn.Linear(channels * (1 if text_channels is None else 2), hidden)
        self.select = nn.Linear(hidden, channels * len(self.level_channels))

    def extra_repr(self) -> str:
        return f"level_channels={self.level_channels}, channels={self.channels}"

    def level_weights(self, levels: list[Tensor], words: Tensor | None = None,
                      mask: Tensor | None = None) -> Tensor:
        """The attention over levels a (B, n, channels) (softmax over n) for resized, projected levels."""
        pooled = sum(g.mean((2, 3)) for g in levels)
        z = F.relu(self.squeeze(self.text(pooled, words, mask)))
        return self.select(z).view(z.shape[0], len(levels), self.channels).softmax(dim=1)

    def _levels(self, features, size) -> list[Tensor]:
        if not isinstance(features, (list, tuple)) or len(features) != len(self.proj):
            raise ValueError(f"features must be a list of {len(self.proj)} tensors (B, C_l, H_l, W_l), one per level")
        for i, (f, c) in enumerate(zip(features, self.level_channels)):
            _checks.tensor(f"features[{i}]", f, ndim=4)
            if f.shape[1] != c or f.shape[0] != features[0].shape[0]:
                raise ValueError(f"features[{i}] must be (B, {c}, H, W) with the batch of features[0], "
                                 f"got {tuple(f.shape)}")
        size = tuple(features[0].shape[-2:]) if size is None else _checks.size_pair("size", size)
        out = []
        for f, p in zip(features, self.proj):
            g = p(f)
            if tuple(g.shape[-2:]) != size:
                g = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
            out.append(g)
        return out

    def forward(self, features, words: Tensor | None = None, mask: Tensor | None = None, *, size=None) -> Tensor:
        levels = self._levels(features, size)
        a = self.level_weights(levels, words, mask).to(levels[0].dtype)
        return sum(a[:, i, :, None, None] * g for i, g in enumerate(levels))


class InformationFusionAttention(nn.Module):
    """IFA: F = CAFB(features, words); y = F + PA(CA(F, words)) (channel, then pixel attention)."""

    def __init__(self, level_channels: Sequence[int], channels: int, text_channels: int | None = None,
                 reduction: int = 8):
        super().__init__()
        self.fusion = CrossLayerAttentionFusion(level_channels, channels, text_channels)
        self.channel = ChannelAttention(channels, reduction, text_channels)
        self.pixel = PixelAttention(channels, reduction)

    def forward(self, features, words: Tensor | None = None, mask: Tensor | None = None, *, size=None) -> Tensor:
        fused = self.fusion(features, words, mask, size=size)
        return fused + self.pixel(self.channel(fused, words, mask))
