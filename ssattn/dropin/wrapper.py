"""Drop-in -SS for an existing encoder-decoder model (SPEC Public API: semantic_sensitive).

    ss = ssattn.semantic_sensitive(unet, {"dec2": "enc2", "dec1": "enc1"})
    y = ss(x, guidance=m)                 # m: (B, 1, H, W) map of the image size
    loss = l1(y, ref) + ss.alignment_loss()

The model's source is not touched. Forward hooks capture each named encoder
module's output e_l and replace each named decoder module's output d_l by
SemanticCrossAttention(d_l, e_l, m) (keys and values from the map-weighted
encoder output, the map area-averaged to e_l's size). Every attention stage
starts as the identity (zero output projection), so a new wrapper gives the
model's outputs bit for bit.

When are the attention stages created? Their sizes must be known before an
optimizer, DDP or a state_dict load sees the parameters, so they are created
at construction whenever possible:
  1. from `channels={dec_name: (dec_channels, enc_channels)}` when given;
  2. else from the modules themselves (a Conv2d / ConvTranspose2d / norm
     layer, or an nn.Sequential ending in one, possibly followed by
     channel-preserving layers such as activations);
  3. else by a dry probe when `example_inputs=(x, ...)` is given;
  4. else lazily at the first call (a warning says so). Call
     `ss.materialize(*example_inputs)` before building the optimizer or DDP.
Inferred channel counts are checked against the real tensors at every call
(SemanticCrossAttention raises on a mismatch).

Works with torch.compile (the hooks are traced: one graph, no graph break,
checked with torch._dynamo.explain), autocast, state_dict save/load, .to()
and DistributedDataParallel (wrap the SemanticSensitive module, after the
stages exist). nn.DataParallel is not supported (its replicas would share
the wrapper's per-call state); use DDP. The hooks keep per-call state on the
wrapper, so one wrapper must not run forwards from several threads at once.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .. import _checks
from ..reference.area import area_resize
from ..semantic import SemanticAlignmentLoss, SemanticCrossAttention

__all__ = ["SemanticSensitive", "semantic_sensitive", "remove_semantic_sensitive"]

# Layers whose output has as many channels as their input.
_CHANNEL_PRESERVING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Upsample, nn.UpsamplingBilinear2d,
    nn.UpsamplingNearest2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)


def _declared_channels(module: nn.Module) -> int | None:
    """Output channel count readable from the module's definition, or None when unknown."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return module.out_channels
    if isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)) and module.num_features:
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if type(module) is nn.Sequential:
        for child in reversed(list(module)):
            if isinstance(child, _CHANNEL_PRESERVING):
                continue
            return _declared_channels(child)
    return None


def _block_key(name: str) -> str:
    # ModuleDict keys cannot contain dots.
    return name.replace(".", "__")


class SemanticSensitive(nn.Module):
    """A model wrapped with -SS attention stages; see `semantic_sensitive`."""

    def __init__(self, model: nn.Module, pairs: Mapping[str, str], *, heads: int = 1, head_dim: int | None = None,
                 backend: str = "auto", scale: float | None = None, eta: float = 1.0, weight: float = 0.1,
                 level_weights=None, reduction: str = "mean", channels: Mapping | None = None,
                 example_inputs=None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(pairs, Mapping) or not pairs:
            raise ValueError("pairs must be a non-empty mapping {decoder module name: encoder module name}")
        modules = dict(model.named_modules())
        for role, name in [("decoder", d) for d in pairs] + [("encoder", e) for e in pairs.values()]:
            if not isinstance(name, str) or name not in modules or name == "":
                close = difflib.get_close_matches(str(name), [n for n in modules if n], n=5, cutoff=0.5)
                hint = f"; close matches: {close}" if close else f"; module names: {[n for n in modules if n][:20]}"
                raise ValueError(f"pairs: {role} module {name!r} is not in the model{hint}")
        if level_weights is not None and len(level_weights) != len(pairs):
            raise ValueError(f"level_weights must have one value per pair ({len(pairs)}), got {len(level_weights)}")
        self.model = model
        self.pairs = dict(pairs)
        self.blocks = nn.ModuleDict()
        # The guidance is range-checked once per forward (_check_guidance); the stages' and the loss's
        # maps are area averages of it, so their own checks (a host sync each) are off.
        self.align = SemanticAlignmentLoss(eta=eta, weight=weight, level_weights=level_weights, reduction=reduction,
                                           backend=backend, check_values=False)
        self._attn_options = dict(heads=heads, head_dim=head_dim, backend=backend, scale=scale, check_values=False)
        # Per-call state, only set inside forward().
        self._guidance: Tensor | None = None
        self._last_guidance: Tensor | None = None
        self._encoded: dict[str, Tensor] = {}
        self._features: dict[str, Tensor] = {}
        self._probing: dict[str, tuple[int, int]] | None = None
        self._removed = False
        self._lazy_warned = False

        channels = dict(channels or {})
        for dec, enc in self.pairs.items():
            if dec in channels:
                dc, ec = channels[dec]
            else:
                dc, ec = _declared_channels(modules[dec]), _declared_channels(modules[enc])
            if dc is not None and ec is not None:
                self._make_block(dec, int(dc), int(ec), self._param_like())
        self._handles = []
        for enc in set(self.pairs.values()):
            self._handles.append(modules[enc].register_forward_hook(self._encoder_hook(enc)))
        for dec in self.pairs:
            self._handles.append(modules[dec].register_forward_hook(self._decoder_hook(dec)))
        if example_inputs is not None and not self.materialized:
            inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
            self.materialize(*inputs)

    # ------------------------------------------------------------------ creation
    def _param_like(self) -> Tensor | None:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p
        return None

    def _make_block(self, dec: str, dec_channels: int, enc_channels: int, like: Tensor | None) -> None:
        block = SemanticCrossAttention(dec_channels, enc_channels, **self._attn_options)
        if like is not None:
            block = block.to(device=like.device, dtype=like.dtype)
        self.blocks[_block_key(dec)] = block

    @property
    def materialized(self) -> bool:
        """True when every attention stage exists (safe to build an optimizer / DDP / load a state_dict)."""
        return all(_block_key(d) in self.blocks for d in self.pairs)

    @torch.no_grad()
    def materialize(self, *inputs, **kwargs) -> "SemanticSensitive":
        """Create missing attention stages from one dry forward pass of the model on example inputs."""
        self._check_live()
        if self.materialized:
            return self
        self._probing = {}
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()  # the probe must not update BatchNorm running statistics
        try:
            self.model(*inputs, **kwargs)
            found = self._probing
        finally:
            self._probing = None
            self._encoded = {}
            for m, mode in modes.items():
                m.training = mode
        like = self._param_like()
        for dec, enc in self.pairs.items():
            if _block_key(dec) in self.blocks:
                continue
            if dec not in found or enc not in found:
                missing = [n for n in (dec, enc) if n not in found]
                raise RuntimeError(f"materialize: module(s) {missing} did not run in the example forward pass")
            self._make_block(dec, found[dec], found[enc], like)
        return self

    # ------------------------------------------------------------------ hooks
    def _check_live(self):
        if self._removed:
            raise RuntimeError("this semantic_sensitive wrapper was removed; wrap the model again")

    @staticmethod
    def _feature(role: str, name: str, out) -> Tensor:
        if not isinstance(out, Tensor) or out.dim() != 4:
            what = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"{role} module {name!r} must output a (B, C, H, W) tensor, got {what}")
        return out

    def _encoder_hook(self, name: str):
        def hook(module, args, out):
            out = self._feature("encoder", name, out)
            if self._probing is not None:
                self._probing[name] = out.shape[1]
            else:
                self._encoded[name] = out
        return hook

    def _decoder_hook(self, name: str):
        enc_name = self.pairs[name]

        def hook(module, args, out):
            out = self._feature("decoder", name, out)
            if self._probing is not None:
                self._probing[name] = out.shape[1]
                return None
            if self._guidance is None:
                raise RuntimeError(
                    "the model is wrapped by semantic_sensitive: call the wrapper, ss(*inputs, guidance=map), "
                    "or ss.remove() to get the plain model back"
                )
            if enc_name not in self._encoded:
                raise RuntimeError(
                    f"encoder module {enc_name!r} has not run before decoder module {name!r} in this forward pass"
                )
            enc = self._encoded[enc_name]
            key = _block_key(name)
            if key not in self.blocks:
                self._lazy_create(name, out, enc)
            refined = self.blocks[key](out, enc, self._guidance.to(out.device))
            self._features[name] = refined
            return refined
        return hook

    def _lazy_create(self, name: str, dec: Tensor, enc: Tensor) -> None:
        if not self._lazy_warned:
            self._lazy_warned = True
            warnings.warn(
                "semantic_sensitive: attention stages are being created at the first call because their channel "
                "counts could not be read from the modules; an optimizer or DDP built before this call does not "
                "see them. Call ss.materialize(*example_inputs) first, or pass channels=/example_inputs=.",
                UserWarning, stacklevel=4,
            )
        like = self._param_like()
        self._make_block(name, dec.shape[1], enc.shape[1], like if like is not None else dec)

    # ------------------------------------------------------------------ forward
    def _check_guidance(self, inputs, guidance) -> Tensor:
        _checks.tensor("guidance", guidance)
        if guidance.dim() != 4 or guidance.shape[1] != 1:
            raise ValueError(f"guidance must be a map of shape (B, 1, H, W), got {tuple(guidance.shape)}")
        x = inputs[0] if inputs else None
        if isinstance(x, Tensor) and x.dim() == 4:
            expected = (x.shape[0], 1, x.shape[-2], x.shape[-1])
            if tuple(guidance.shape) != expected:
                raise ValueError(
                    f"guidance must have the input image's batch and size {expected}, got {tuple(guidance.shape)}"
                )
        _checks.unit_interval("guidance", guidance)
        return guidance

    def forward(self, *inputs, guidance: Tensor | None = None, **kwargs):
        self._check_live()
        if guidance is None:
            raise TypeError("semantic_sensitive model needs a guidance map: call ss(*inputs, guidance=map (B, 1, H, W))")
        self._guidance = self._check_guidance(inputs, guidance)
        self._encoded, self._features = {}, {}
        try:
            return self.model(*inputs, **kwargs)
        finally:
            self._encoded = {}
            self._last_guidance = self._guidance
            self._guidance = None

    def alignment_loss(self) -> Tensor:
        """lambda_align * SPEC-3 loss over the refined decoder outputs of the last call (pairs' order)."""
        self._check_live()
        names = [d for d in self.pairs if d in self._features]
        if not names:
            raise RuntimeError("alignment_loss() needs a forward call first: ss(*inputs, guidance=map)")
        if len(names) != len(self.pairs):
            missing = [d for d in self.pairs if d not in self._features]
            raise RuntimeError(f"decoder module(s) {missing} did not run in the last forward pass")
        feats = [self._features[d] for d in names]
        g = self._last_guidance
        maps = [area_resize(g.to(f.device, torch.float32), f.shape[-2:]) for f in feats]
        return self.align(feats, maps)

    def decoder_features(self) -> dict[str, Tensor]:
        """The refined decoder outputs of the last call, by decoder module name."""
        return dict(self._features)

    def remove(self) -> nn.Module:
        """Remove the hooks and return the original model (its own outputs again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._removed = True
        self._features = {}
        return self.model

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}"


def semantic_sensitive(model: nn.Module, pairs: Mapping[str, str], **options) -> SemanticSensitive:
    """Wrap `model` with -SS attention stages; see the module docstring.

    pairs: {decoder module name: encoder module name} as in model.named_modules().
    options: heads (1), head_dim, backend ("auto"), scale (attention stages);
    eta (1.0), weight (lambda_align, 0.1), level_weights, reduction ("mean")
    (alignment loss); channels {dec: (dec_channels, enc_channels)},
    example_inputs (tuple) (how the stages are sized).
    """
    return SemanticSensitive(model, pairs, **options)


def remove_semantic_sensitive(ss: SemanticSensitive) -> nn.Module:
    """Remove the hooks of `ss` and return the original model."""
    if not isinstance(ss, SemanticSensitive):
        raise TypeError(f"ss must be a SemanticSensitive wrapper, got {type(ss).__name__}")
    return ss.remove()
