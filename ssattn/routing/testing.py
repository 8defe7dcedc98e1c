"""A tiny random CLIP saved like the hub does, for tests (the tiny LLaVA is ssattn.guidance.testing.save_llava)."""

from __future__ import annotations

from pathlib import Path

from ..guidance.testing import CLIP_MEAN, CLIP_STD


def save_clip(folder, hidden: int = 32, seed: int = 0, image_size: int = 224, patch: int = 32):
    """A random CLIPModel (1 layer each side) + CLIPProcessor (letter-level BPE vocabulary) in `folder`."""
    import torch
    from ..guidance.hub import require_transformers

    require_transformers("routing", "VLM degradation routing (a tiny CLIP)")
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz")
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                               image_mean=CLIP_MEAN, image_std=CLIP_STD)
    layer = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tokens), max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1, **layer),
                     vision_config=dict(image_size=image_size, patch_size=patch, **layer), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).eval().save_pretrained(folder)
    CLIPProcessor(ip, tok).save_pretrained(folder)
    return Path(folder)
