"""A compact reference UIE baseline: a 4-level U-Net with concatenation skips.

Named stages (as in named_modules()):
    enc1 (H, w) -> enc2 (H/2, 2w) -> enc3 (H/4, 4w) -> bottleneck (H/8, 8w)
    up3 + cat(enc3) -> dec3 (H/4, 4w) -> up2 + cat(enc2) -> dec2 (H/2, 2w)
    -> up1 + cat(enc1) -> dec1 (H, w) -> head (out_ch)
The output is x + head(dec1) (a residual correction of the input, common in
UIE networks). H and W must be divisible by 8.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _block(cin: int, cout: int) -> nn.Sequential:
    # Conv-GroupNorm-LeakyReLU x2; GroupNorm keeps small batches stable.
    groups = 4 if cout % 4 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.LeakyReLU(0.2, inplace=True),
    )


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.MaxPool2d(2), _block(cin, cout))


class UNet(nn.Module):
    """UNet(in_ch=3, out_ch=3, width=16): the baseline UIE network (about 0.48M parameters at width 16)."""

    levels = 3  # decoder stages dec3, dec2, dec1

    def __init__(self, in_ch: int = 3, out_ch: int = 3, width: int = 16, residual: bool = True):
        super().__init__()
        for name, v in (("in_ch", in_ch), ("out_ch", out_ch), ("width", width)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if residual and in_ch != out_ch:
            raise ValueError(f"residual=True needs in_ch == out_ch, got {in_ch} and {out_ch}")
        w = width
        self.in_ch, self.out_ch, self.width, self.residual = in_ch, out_ch, width, residual
        self.enc1 = _block(in_ch, w)
        self.enc2 = _down(w, 2 * w)
        self.enc3 = _down(2 * w, 4 * w)
        self.bottleneck = _down(4 * w, 8 * w)
        self.up3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2)
        self.dec3 = _block(8 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _block(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = _block(2 * w, w)
        self.head = nn.Conv2d(w, out_ch, 1)
        if residual:
            # Start as the identity (output = input): training begins from the degraded image's score.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_ch:
            raise ValueError(f"x must have shape (B, {self.in_ch}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f"x's height and width must be divisible by 8, got {tuple(x.shape[-2:])}")
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        b = self.bottleneck(e3)
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        y = self.head(d1)
        return x + y if self.residual else y


# Decoder stage -> the encoder stage whose output is its skip feature.
DEFAULT_PAIRS = {"dec3": "enc3", "dec2": "enc2", "dec1": "enc1"}


def unet_ss(in_ch: int = 3, out_ch: int = 3, width: int = 16, *, pairs=None, levels=None, attention_levels=None,
            align_levels=None, residual: bool = True, **options):
    """The -SS version of UNet through ssattn.semantic_sensitive.

    pairs defaults to every decoder stage (DEFAULT_PAIRS). `levels` picks the
    decoder stages of both parts, e.g. levels=("dec3", "dec2") to skip the
    full-resolution stage (its attention has (H*W)^2 scores: costly on CPU).
    `attention_levels` and `align_levels` override one part each (the
    ablation switches): the stages that get an attention block, and the
    decoder stages whose outputs feed the alignment loss; () is none of that
    kind (attention only, or alignment only). A part left as None follows
    `levels` (all stages when that is None too).
    options go to semantic_sensitive (heads, backend, eta, weight, ...).
    Returns the wrapper; the plain U-Net is `.model`.
    """
    from ..dropin import semantic_sensitive

    if pairs is None:
        pairs = dict(DEFAULT_PAIRS)
    chosen = {}
    for name, value in (("levels", levels), ("attention_levels", attention_levels), ("align_levels", align_levels)):
        if value is None:
            continue
        value = [value] if isinstance(value, str) else list(value)
        unknown = [lv for lv in value if lv not in pairs]
        if unknown:
            raise ValueError(f"{name} {unknown} are not decoder stages; choose from {list(pairs)}")
        chosen[name] = set(value)
    base = chosen.get("levels", set(pairs))
    attention = chosen.get("attention_levels", base)
    align = chosen.get("align_levels", base)
    if not attention and not align:
        raise ValueError("unet_ss needs at least one stage: attention_levels and align_levels (or levels) are both "
                         "empty; the plain network is ssattn.models.UNet")
    return semantic_sensitive(UNet(in_ch, out_ch, width, residual=residual),
                              {d: e for d, e in pairs.items() if d in attention},
                              align_sites=[d for d in pairs if d in align], **options)
