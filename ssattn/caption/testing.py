"""Tiny random captioners with the real structure (CLIP vision -> ClipCap mapper -> GPT-2), for tests and benchmarks.

CLIP's vision tower at 224 px / patch 32 with hidden 32 and 1 layer, a
16-d projection, the MLP mapper with prefix length 10, and a 1-layer GPT-2
of width 32: milliseconds per image on CPU. Saved like a real captioner
folder (ssattn.caption.captioner.save_captioner), loaded through the same
from_pretrained path.
"""

from __future__ import annotations

from pathlib import Path

from ..guidance.testing import CLIP_MEAN, CLIP_STD


def tiny_captioner(*, hidden: int = 32, proj: int = 16, embed: int = 32, prefix_length: int = 10,
                   mapper: str = "mlp", image_size: int = 224, patch: int = 32, seed: int = 0,
                   vocab: int = 64, layers: int = 1, heads: int = 2):
    """(Captioner, image processor) with random weights; `layers`/`heads` for both CLIP and GPT-2."""
    import torch

    from ..guidance.hub import require_transformers

    require_transformers("caption", "the ClipCap-style caption regulariser (a tiny captioner)")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, GPT2Config, GPT2Model

    from .captioner import Captioner, _image_processor_class
    from .mapper import MLPMapper, TransformerMapper
    from .preprocess import ClipPreprocess

    torch.manual_seed(seed)
    vcfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch, projection_dim=proj)
    vision = CLIPVisionModelWithProjection(vcfg).eval()
    gpt = GPT2Model(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=embed, n_layer=layers, n_head=heads,
                                bos_token_id=0, eos_token_id=1)).eval()
    if mapper == "mlp":
        m = MLPMapper(proj, embed, prefix_length)
    else:
        m = TransformerMapper(proj, embed, prefix_length, clip_length=prefix_length, num_layers=1)  # 8 heads, as ClipCap
    processor = _image_processor_class()(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size},
                                         image_mean=CLIP_MEAN, image_std=CLIP_STD)
    cap = Captioner(vision, m, gpt, ClipPreprocess.from_processor(processor))
    return cap, processor


# ClipCap's geometry (CLIP ViT-B/32 at 224 px with its 512-d projection, GPT-2 small), random weights:
# for timing a realistic captioner without downloading one.
CLIPCAP_GEOMETRY = dict(hidden=768, proj=512, embed=768, layers=12, heads=12, vocab=50257)


def save_tiny_captioner(folder, **kw) -> Path:
    """A tiny captioner folder (captioner.json, vision/, language/, mapper.pt) at `folder`."""
    from .captioner import save_captioner

    cap, processor = tiny_captioner(**kw)
    return save_captioner(cap, folder, vision_processor=processor)


def clipcap_state(captioner) -> dict:
    """The captioner's mapper and GPT-2 as a ClipCap checkpoint names them (to test the loader)."""
    state = {}
    for k, v in captioner.state_dict().items():
        if k.startswith("mapper."):
            state["clip_project." + k[len("mapper."):]] = v.clone()
        elif k.startswith("language."):
            state["gpt.transformer." + k[len("language."):]] = v.clone()
    state["gpt.lm_head.weight"] = state["gpt.transformer.wte.weight"].clone()
    return state
