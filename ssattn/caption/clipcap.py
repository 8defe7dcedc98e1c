"""ClipCap's public checkpoint format, mapped onto Captioner's modules.

A ClipCap checkpoint (`torch.save(ClipCaptionModel.state_dict())`) holds

    clip_project.model.{0,2}.{weight,bias}           the MLP mapper (or clip_project.linear.*,
                                                     clip_project.prefix_const, clip_project.transformer.*)
    gpt.transformer.*                                GPT-2 (wte, wpe, h.N.*, ln_f)
    gpt.lm_head.weight                               the LM head (tied to wte)

`map_clipcap_state` renames these onto Captioner (mapper.*, language.*) and
`load_clipcap` loads them, returning a report of every checkpoint key it
could not map (unknown names, shape mismatches, the LM head the feature
spaces do not use) and every module key the checkpoint did not fill.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger("ssattn.caption")

# checkpoint prefix -> Captioner prefix
PREFIXES = (("clip_project.", "mapper."), ("gpt.transformer.", "language."))
# Keys that exist in every checkpoint but have no place in the feature spaces.
UNUSED = {"gpt.lm_head.weight": "GPT-2's LM head (tied to wte; the caption loss uses hidden states only)"}
# GPT-2's causal-mask buffers, saved by the transformers of ClipCap's time; current GPT2Model builds the mask itself.
MASK_BUFFER = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(masked_)?bias$")
MASK_REASON = "GPT-2's causal-mask buffer, not a weight (transformers builds the mask itself)"


def expected_unused(key: str) -> bool:
    """Checkpoint keys every ClipCap checkpoint may hold that are rightly not loaded."""
    return key in UNUSED or bool(MASK_BUFFER.match(key))


@dataclass
class MappingReport:
    loaded: list[str] = field(default_factory=list)      # captioner keys filled from the checkpoint
    unused: dict = field(default_factory=dict)           # checkpoint key -> why it was not used
    missing: list[str] = field(default_factory=list)     # captioner keys the checkpoint did not fill

    @property
    def complete(self) -> bool:
        """Every mapper and language parameter came from the checkpoint."""
        return not self.missing

    def __str__(self) -> str:
        lines = [f"ClipCap checkpoint: {len(self.loaded)} tensors loaded"]
        if self.unused:
            lines.append(f"{len(self.unused)} checkpoint keys not mapped:")
            lines += [f"  {k}: {why}" for k, why in sorted(self.unused.items())]
        if self.missing:
            lines.append(f"{len(self.missing)} captioner keys not in the checkpoint (left as they were):")
            lines += [f"  {k}" for k in self.missing]
        return "\n".join(lines)


def strip_prefixes(state: dict) -> dict:
    """Accept a bare state dict, one under "state_dict"/"model", and DataParallel's "module." names."""
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def map_clipcap_state(state: dict) -> tuple[dict, dict]:
    """({captioner key: (checkpoint key, tensor)}, {checkpoint key: why not mapped}) by name only."""
    mapped, unused = {}, {}
    for key, value in strip_prefixes(state).items():
        if key in UNUSED or MASK_BUFFER.match(key):
            unused[key] = UNUSED.get(key, MASK_REASON)
            continue
        for src, dst in PREFIXES:
            if key.startswith(src):
                mapped[dst + key[len(src):]] = (key, value)
                break
        else:
            unused[key] = "not a ClipCap mapper (clip_project.*) or GPT-2 (gpt.transformer.*) key"
    return mapped, unused


def load_clipcap(captioner: nn.Module, state: dict) -> MappingReport:
    """Load a ClipCap state dict into captioner.mapper and captioner.language; the report says what did not map."""
    mapped, unused = map_clipcap_state(state)
    own = {k: v for k, v in captioner.state_dict().items() if k.startswith(("mapper.", "language."))}
    report = MappingReport(unused=dict(unused))
    ok = {}
    for key, (src, value) in mapped.items():
        if key not in own:
            # e.g. GPT-2's attention masks ("attn.bias", "attn.masked_bias"), buffers in older transformers
            report.unused[src] = f"the captioner has no {key}"
        elif tuple(own[key].shape) != tuple(value.shape):
            report.unused[src] = (f"shape {tuple(value.shape)} in the checkpoint, {tuple(own[key].shape)} "
                                  f"for {key} in the captioner")
        else:
            ok[key] = value
    captioner.load_state_dict(ok, strict=False)
    report.loaded = sorted(ok)
    report.missing = sorted(k for k in own if k not in ok)
    return report


def infer_mapper(state: dict, embed: int) -> dict:
    if "clip_project.model.0.weight" in state:
        w0, w2 = state["clip_project.model.0.weight"], state["clip_project.model.2.weight"]
        if w2.shape[0] % embed:
            raise ValueError(f"ClipCap MLP output {w2.shape[0]} is not a multiple of GPT-2's width {embed}")
        return {"mapper": "mlp", "clip_dim": w0.shape[1], "embed_dim": embed, "prefix_length": w2.shape[0] // embed}
    if "clip_project.linear.weight" in state and "clip_project.prefix_const" in state:
        lin, const = state["clip_project.linear.weight"], state["clip_project.prefix_const"]
        layers = {int(k.split(".")[3]) for k in state if k.startswith("clip_project.transformer.layers.")}
        return {"mapper": "transformer", "clip_dim": lin.shape[1], "embed_dim": embed,
                "prefix_length": const.shape[0], "clip_length": lin.shape[0] // embed, "num_layers": len(layers)}
    raise ValueError("not a ClipCap checkpoint: it has neither clip_project.model.0.weight (MLP mapper) nor "
                     "clip_project.linear.weight + clip_project.prefix_const (transformer mapper)")


def gpt2_config(state: dict, language):
    """GPT-2's config: from `language` (hub id or folder) when given, else from the checkpoint's shapes (64-d heads)."""
    import transformers

    from ..guidance import hub

    if language is not None:
        return hub.from_pretrained(transformers.GPT2Config, language, "GPT-2 config")
    wte, wpe = state["gpt.transformer.wte.weight"], state["gpt.transformer.wpe.weight"]
    layers = {int(k.split(".")[3]) for k in state if k.startswith("gpt.transformer.h.")}
    n_embd = wte.shape[1]
    log.info("GPT-2 config inferred from the checkpoint: %d layers, width %d, %d heads of 64 (pass language= to "
             "give the config)", len(layers), n_embd, max(1, n_embd // 64))
    return transformers.GPT2Config(vocab_size=wte.shape[0], n_positions=wpe.shape[0], n_embd=n_embd,
                                   n_layer=len(layers), n_head=max(1, n_embd // 64))
