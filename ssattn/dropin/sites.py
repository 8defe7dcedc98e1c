"""Paired call sites of the drop-in: "name", "name#k", "name[0]", "name['key']#k".

A site names a module (any name model.get_submodule resolves: a module
registered under several names, e.g. appended to a ModuleList several
times, answers to each; the wrapper hooks it once, under the first name
model.named_modules() lists), optionally one of its calls in a forward pass
(`#k`, counted from 0) and one element of a structured output (`[i]` for a
tuple or list, `[key]` / `['key']` for a dict; selectors chain: `m[0][1]`).
The element must be a (B, C, H, W) map: a token sequence (B, N, C) is
refused, never reshaped by a guess. This module parses site strings, reads
and replaces the selected element, and reads channel counts from module
definitions.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from torch import Tensor, nn

_SITE = re.compile(r"^(?P<name>[^\[\]#]+)(?P<path>(?:\[[^\[\]]+\])*)(?:#(?P<call>\d+))?$")
_SELECTOR = re.compile(r"\[([^\[\]]+)\]")


@dataclass(frozen=True)
class Site:
    """One paired call site: module name, call index (None: every call), output element path."""

    spec: str
    module: str
    call: int | None
    path: tuple
    alias: str = ""  # the name in spec, when the module is registered under several names and `module` is its first

    def describe(self) -> str:
        if self.alias:
            return f"{self.spec!r} (module {self.module!r}, registered under several names)"
        return f"module {self.module!r}" if self.spec == self.module else f"{self.spec!r} (module {self.module!r})"


def _selector(text: str):
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_site(role: str, spec, where: str = "pairs") -> Site:
    """Site from a pairs key (role "decoder") or value (role "encoder"); ValueError naming `where` on bad syntax."""
    match = _SITE.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(
            f"{where}: {role} {spec!r} is not a module name with optional selectors: expected 'name', 'name#1' "
            f"(the second call), 'name[0]' (an element of a tuple/list/dict output) or 'name[0]#1'"
        )
    path = tuple(_selector(s) for s in _SELECTOR.findall(match["path"] or ""))
    call = None if match["call"] is None else int(match["call"])
    return Site(spec, match["name"].strip(), call, path)


class SiteOutputError(TypeError):
    """A site names an output element that is not there, or not a (B, C, H, W) tensor (tokens: a (B, N, C) one)."""

    def __init__(self, message: str, site: Site | None = None, tokens: bool = False):
        super().__init__(message)
        self.site, self.tokens = site, tokens


def select(site: Site, role: str, out) -> Tensor:
    """The (B, C, H, W) tensor of `out` that the site names; TypeError naming the site otherwise."""
    value = out
    for step in site.path:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError) as exc:
            raise SiteOutputError(
                f"{role} {site.describe()}: cannot select [{step!r}] from its output "
                f"({type(value).__name__}): {exc}"
            ) from None
    if isinstance(value, Tensor) and value.dim() == 3:
        raise SiteOutputError(
            f"{role} {site.describe()} outputs tokens (B, N, C), {tuple(value.shape)}, as transformer stages do, "
            f"not a (B, C, H, W) map; the drop-in does not guess how to fold them into a map: pair a module that "
            f"outputs one (e.g. the convolution of the stage's down- or upsampling)", site, tokens=True)
    if not isinstance(value, Tensor) or value.dim() != 4:
        what = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        hint = ""
        if isinstance(value, (tuple, list)):
            hint = f"; select an element, e.g. '{site.module}[0]'"
        elif isinstance(value, dict):
            hint = f"; select an entry, e.g. '{site.module}[{next(iter(value), 'key')}]'"
        raise SiteOutputError(f"{role} {site.describe()} must output a (B, C, H, W) tensor, got {what}{hint}")
    return value


def replace(out, path: tuple, value):
    """`out` with the element at `path` replaced by `value`; containers are rebuilt, never mutated."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    inner = replace(out[head], rest, value)
    if isinstance(out, tuple):
        items = list(out)
        items[head] = inner
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    new = copy.copy(out)  # list, dict or a dict-like output class: a shallow copy keeps the other entries
    new[head] = inner
    return new


# Layers whose output has as many channels as their input.
_CHANNEL_PRESERVING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Upsample,
    nn.UpsamplingBilinear2d, nn.UpsamplingNearest2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)


def declared_channels(module: nn.Module) -> int | None:
    """Output channel count readable from the module's definition, or None when unknown.

    Layers give theirs (convolutions, norms, Linear for blocks that work on
    channels-last tokens, a custom layer whose parameters are per-channel
    vectors of one length); a container or custom block gives that of its last
    registered submodule that changes or fixes the channel count (skipping
    activations, pooling, dropout, ...): in the usual definition order, the
    layer that produces the block's output. The wrapper checks the count
    against the real output at every call.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return module.out_channels
    if isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)) and module.num_features:
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    if isinstance(module, nn.PixelShuffle | nn.PixelUnshuffle):
        return None  # changes the channel count by a factor we cannot see without the input
    children = list(module.children())
    if not children:
        # A custom norm or scale layer (e.g. a LayerNorm2d): only per-channel vectors of one length C.
        params = list(module.parameters(recurse=False))
        if params and all(p.dim() == 1 for p in params) and len({p.shape[0] for p in params}) == 1:
            return params[0].shape[0]
        return None
    for child in reversed(children):
        if isinstance(child, _CHANNEL_PRESERVING):
            continue
        found = declared_channels(child)
        if found is not None:
            return found
        return None  # the last channel-changing layer is unknown: do not guess past it
    return None
