"""LPIPS (Zhang et al. 2018) through the maintained `lpips` package, with its backbone's weights read offline.

The package ships its own calibrated linear layers (lpips/weights/v0.1/<net>.pth). Its backbone (AlexNet,
VGG-16 or SqueezeNet 1.1 with torchvision's ImageNet weights) is built here with random weights and then
loaded from a local file, never downloaded: the file given, or the one torchvision's download would have
left in torch hub's cache (`torch.hub.get_dir()/checkpoints`).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

# The smallest height and width each backbone takes (its pooling leaves nothing below): measured, and tested.
MIN_SIDE = {"alex": 31, "vgg": 16, "squeeze": 17}
# lpips' name for the backbone -> (torchvision's model, its weights enum, whose IMAGENET1K_V1 weights lpips uses).
BACKBONES = {"alex": ("AlexNet", "AlexNet_Weights"), "vgg": ("VGG-16", "VGG16_Weights"),
             "squeeze": ("SqueezeNet 1.1", "SqueezeNet1_1_Weights")}


class MissingWeightsError(FileNotFoundError):
    """The backbone's weight file is neither given nor in torch hub's cache."""

    def __init__(self, net: str, filename: str, folder: str, url: str):
        super().__init__(f"LPIPS ({net}) needs torchvision's ImageNet weights for its backbone, {filename}, which is "
                         f"not in torch hub's cache ({folder}): download {url} into that folder, or give the "
                         f"file's path as weights=")
        # not OSError's filename: that attribute rewrites the message
        self.net, self.weights_file, self.cache_folder, self.url = net, filename, folder, url


def _import_lpips():
    try:
        import lpips
    except ImportError as exc:
        raise ImportError("LPIPS needs the lpips package (and torchvision): pip install 'ssattn[metrics]' "
                          f"(missing: {exc.name})") from exc
    return lpips


def _check_net(net: str) -> None:
    if net not in BACKBONES:
        raise ValueError(f"net must be one of {sorted(BACKBONES)}, got {net!r}")


def backbone_url(net: str = "alex") -> str:
    """Where torchvision downloads the backbone's ImageNet weights from (for the user to fetch; never fetched here)."""
    _check_net(net)
    import torchvision.models as tvm

    return getattr(tvm, BACKBONES[net][1]).IMAGENET1K_V1.url


def backbone_weights_path(net: str = "alex", weights: str | os.PathLike | None = None) -> str:
    """The backbone weight file: `weights` when given (it must exist), else torch hub's cached download."""
    _check_net(net)
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LPIPS backbone weights {path!r} do not exist or are not a file")
        return path
    url = backbone_url(net)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    filename = os.path.basename(url)
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise MissingWeightsError(net, filename, folder, url)
    return path


def _load_backbone(backbone: nn.Module, state: dict, path: str, net: str) -> None:
    """Copy torchvision's `features.<i>.*` tensors into lpips' slices, whose children are named by that index i."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} is not a state dict (got {type(state).__name__})")
    mapped = {}
    for slice_name, piece in backbone.named_children():
        for index, layer in piece.named_children():
            for key, value in layer.state_dict().items():
                source = f"features.{index}.{key}"
                if source not in state:
                    raise ValueError(f"{path!r} is not torchvision's {BACKBONES[net][0]} state dict: "
                                     f"it has no {source!r}")
                if state[source].shape != value.shape:
                    raise ValueError(f"{path!r}: {source} has shape {tuple(state[source].shape)}, the {net} "
                                     f"backbone needs {tuple(value.shape)}")
                mapped[f"{slice_name}.{index}.{key}"] = state[source]
    backbone.load_state_dict(mapped, strict=True)


class LPIPS(nn.Module):
    """LPIPS distance per image pair (B,) for RGB images (B, 3, H, W) in [0, 1] (lower is closer).

    net: "alex" (the package's default for evaluation), "vgg" or "squeeze". weights: the backbone's
    torchvision ImageNet state dict; None reads torch hub's cache (see backbone_weights_path).
    """

    def __init__(self, net: str = "alex", weights: str | os.PathLike | None = None):
        super().__init__()
        lpips = _import_lpips()
        path = backbone_weights_path(net, weights)
        if os.path.getsize(path) == 0:  # an interrupted download; torch.load's own error says nothing
            raise ValueError(f"LPIPS backbone weights {path!r} is empty (0 bytes)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which one
            raise ValueError(f"cannot read LPIPS backbone weights {path!r}: {str(exc) or type(exc).__name__}") from exc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained is deprecated", from lpips
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        _load_backbone(model.net, state, path, net)
        self.net_name, self.weights_path, self.min_side = net, path, MIN_SIDE[net]
        self.model = model.eval().requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[1] != 3 or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating RGB tensor (B, 3, H, W) in [0, 1], got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < self.min_side:
            raise ValueError(f"LPIPS ({self.net_name}) needs images of at least {self.min_side}x{self.min_side} "
                             f"pixels, got {tuple(x.shape[-2:])}")
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            return self.model(x.to(dtype), y.to(dtype), normalize=True).flatten()


_MODELS: dict = {}


def lpips(x: Tensor, y: Tensor, *, net: str = "alex", weights: str | os.PathLike | None = None) -> Tensor:
    """LPIPS per image pair (B,) float32; the model is built once per (net, weight file, device) and kept."""
    path = os.path.realpath(backbone_weights_path(net, weights))
    key = (net, path, x.device)
    if key not in _MODELS:
        _MODELS[key] = LPIPS(net, path).to(x.device)
    return _MODELS[key](x, y)
