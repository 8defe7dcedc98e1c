"""Reconstruction losses: L1 + VGG-19 perceptual loss (plain torch, no torchvision).

The VGG-19 feature stack mirrors torchvision's `vgg19().features` layer
indices, so a torchvision state_dict (keys "features.N.weight" or
"N.weight") loads directly from a local file. Without a weights file the
perceptual term is disabled (random VGG features are not a perceptual loss)
and `describe()` says so.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssattn._checks import load_failure

log = logging.getLogger("ssattn.apps.training")

VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# ReLU outputs used for the loss (torchvision indices): relu1_2, relu2_2, relu3_4, relu4_4, relu5_4.
DEFAULT_LAYERS = (3, 8, 17, 26, 35)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg19_features(upto: int = 36) -> nn.Sequential:
    """torchvision's vgg19().features (indices preserved), truncated after layer `upto - 1`."""
    layers: list[nn.Module] = []
    cin = 3
    for v in VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
            cin = v
    return nn.Sequential(*layers[:upto])


class VGGPerceptualLoss(nn.Module):
    """Mean L1 distance between VGG-19 ReLU features of output and target (inputs in [0, 1])."""

    def __init__(self, weights_path: str, layers=DEFAULT_LAYERS, layer_weights=None):
        super().__init__()
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"vgg_weights: no file at {weights_path!r}")
        self.layers = tuple(sorted(int(i) for i in layers))
        self.features = vgg19_features(self.layers[-1] + 1)
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a foreign or broken file (torch's text would advise an unsafe load)
            raise ValueError(f"vgg_weights {weights_path!r} is not a VGG-19 state dict ({load_failure(exc)})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"vgg_weights {weights_path!r} is not a VGG-19 state dict (it holds a "
                             f"{type(state).__name__})")
        state = {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) < len(self.features)}
        missing, _ = self.features.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"vgg_weights {weights_path!r} lacks VGG-19 feature weights ({', '.join(missing[:4])}"
                             f"{', ...' if len(missing) > 4 else ''}): it is not a VGG-19 state dict")
        self.features.requires_grad_(False).eval()
        self.layer_weights = [1.0] * len(self.layers) if layer_weights is None else [float(w) for w in layer_weights]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # frozen feature extractor
        return self

    def _feats(self, x: Tensor) -> list[Tensor]:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.layers:
                out.append(x)
        return out

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        fo = self._feats(output)
        with torch.no_grad():
            ft = self._feats(target)
        return sum(w * F.l1_loss(a, b) for w, a, b in zip(self.layer_weights, fo, ft))


class ReconstructionLoss(nn.Module):
    """l1_weight * L1 + perceptual_weight * VGG-19 perceptual (when vgg_weights is a file)."""

    def __init__(self, vgg_weights: str | None = None, l1_weight: float = 1.0, perceptual_weight: float = 0.1):
        super().__init__()
        self.l1_weight, self.perceptual_weight = float(l1_weight), float(perceptual_weight)
        self.perceptual = VGGPerceptualLoss(vgg_weights) if vgg_weights else None
        if self.perceptual is None:
            log.info("perceptual loss disabled: no VGG-19 weights file given (--vgg-weights PATH)")

    def describe(self) -> str:
        if self.perceptual is None:
            return f"{self.l1_weight:g}*L1 (VGG-19 perceptual term disabled: no weights file)"
        return f"{self.l1_weight:g}*L1 + {self.perceptual_weight:g}*VGG19-perceptual"

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        loss = self.l1_weight * F.l1_loss(output.float(), target.float())
        if self.perceptual is not None and self.perceptual_weight:
            loss = loss + self.perceptual_weight * self.perceptual(output.float(), target.float())
        return loss
