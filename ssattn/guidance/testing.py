"""Tiny random models with the real geometry, saved like the hub does, for tests and benchmarks.

No weights can be downloaded on CI, so tests build BLIP and LLaVA from
configs (hidden 32, 1-2 layers: milliseconds on CPU) with the real image
geometry -- BLIP 384 px / patch 16 (24x24 grid), LLaVA's CLIP tower
336 px / patch 14 -- and load them through the real from_pretrained path
from a hub-style cache folder (see hub_snapshot).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .hub import require_transformers

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
WORDS = ("fish diver coral robot turtle reef sea water a an the and of with some two there is are in on "
         "image key objects photo swimming near shark rock wreck crab").split()


def blip_config(hidden: int = 32, layers: int = 1, heads: int = 2, image_size: int = 384, patch: int = 16,
                vocab_size: int | None = None, proj: int = 16):
    require_transformers("guidance", "BLIP guidance maps (a tiny BLIP)")
    from transformers import BlipConfig

    vocab_size = vocab_size or len(WORDS) + 5
    text = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden, max_position_embeddings=128, encoder_hidden_size=hidden,
                pad_token_id=0, bos_token_id=2, sep_token_id=3)
    vision = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden, image_size=image_size, patch_size=patch)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=proj, image_text_hidden_size=proj)


def blip_base_config():
    """BLIP-base geometry (ViT-B/16 at 384, BERT-base text, 256-d ITC heads): for throughput benchmarks."""
    return blip_config(hidden=768, layers=12, heads=12, vocab_size=30524, proj=256)


def save_blip(folder, config=None, seed: int = 0):
    """A random BlipForImageTextRetrieval + BlipProcessor (BERT word tokenizer, PIL image processor) in `folder`."""
    import torch
    require_transformers("guidance", "BLIP guidance maps (a tiny BLIP)")
    from transformers import BertTokenizer, BlipForImageTextRetrieval, BlipImageProcessorPil, BlipProcessor

    config = config or blip_config()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    size = config.vision_config.image_size
    ip = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    torch.manual_seed(seed)
    BlipForImageTextRetrieval(config).eval().save_pretrained(folder)
    BlipProcessor(ip, tok).save_pretrained(folder)
    return Path(folder)


LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% if message['role'] != 'user' %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_llava(folder, hidden: int = 32, seed: int = 0, extra_chars: str = ""):
    """A random LlavaForConditionalGeneration (CLIP tower 336/14, 2 layers; Llama 1 layer) + LlavaProcessor.

    extra_chars are added to the character vocabulary (e.g. "ABCD" for multiple-choice letters).
    """
    import torch
    require_transformers("guidance", "LLaVA captions (a tiny LLaVA)")
    from transformers import (CLIPImageProcessorPil, LlamaTokenizer, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    chars = list("abcdefghijklmnopqrstuvwxyz,.:") + ["\u2581", "\n"] + list(extra_chars)
    tokens = ["<unk>", "<s>", "</s>", "<image>", "<pad>", *chars]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = LlamaTokenizer(vocab=vocab, merges=[], unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                               image_mean=CLIP_MEAN, image_std=CLIP_STD)
    proc = LlavaProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=2, num_attention_heads=2, image_size=336, patch_size=14, projection_dim=16),
        text_config=dict(model_type="llama", vocab_size=len(tokens), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=2048, pad_token_id=4, bos_token_id=1, eos_token_id=2),
        image_token_index=vocab["<image>"], vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(folder)
    proc.save_pretrained(folder)
    return Path(folder)


def hub_snapshot(cache_dir, repo_id: str, save, revision: str | None = None) -> Path:
    """Write a model as the hub cache holds it: models--ORG--NAME/snapshots/<40 hex>/ plus refs/main.

    save(folder) writes the files. With HF_HUB_CACHE=cache_dir and
    HF_HUB_OFFLINE=1, from_pretrained(repo_id) then loads it unchanged.
    """
    revision = revision or hashlib.sha1(repo_id.encode()).hexdigest()
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    save(snap)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


class offline_hub_cache:
    """Context manager: HF_HUB_OFFLINE=1 and HF_HOME/HF_HUB_CACHE pointing at cache_dir, for this process.

    huggingface_hub reads these variables once at import, so the live values
    in huggingface_hub.constants are switched too, and everything is restored on exit.
    """

    def __init__(self, cache_dir):
        self.cache_dir = str(cache_dir)

    def __enter__(self):
        import os

        import huggingface_hub.constants as C

        self._env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE")}
        self._const = (C.HF_HUB_CACHE, C.HF_HUB_OFFLINE)
        os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(Path(self.cache_dir).parent), HF_HUB_CACHE=self.cache_dir)
        C.HF_HUB_CACHE, C.HF_HUB_OFFLINE = self.cache_dir, True
        return self

    def __exit__(self, *exc):
        import os

        import huggingface_hub.constants as C

        for k, v in self._env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        C.HF_HUB_CACHE, C.HF_HUB_OFFLINE = self._const
        return False


def write_awkward_images(folder, huge: tuple[int, int] = (2000, 3000)) -> dict:
    """Images that loaders get wrong, written into folder; returns {file name: expected (H, W) or None if unreadable}.

    RGB, grayscale, RGBA, 16-bit grayscale, palette, 1x1, 5x3, a huge JPEG,
    garbage bytes with an image extension, and a truncated JPEG.
    """
    import io

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}

    def save(name, img, **kw):
        img.save(folder / name, **kw)
        out[name] = (img.height, img.width)

    save("rgb.png", Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)))
    save("gray.png", Image.fromarray(rng.integers(0, 256, (35, 25), dtype=np.uint8)))
    save("rgba.png", Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA"))
    save("deep16.png", Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16)))
    save("palette.png", Image.fromarray(rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)).convert("P"))
    save("one.png", Image.fromarray(np.full((1, 1, 3), 200, dtype=np.uint8)))
    save("tiny.jpg", Image.fromarray(rng.integers(0, 256, (5, 3, 3), dtype=np.uint8)))
    h, w = huge
    big = np.empty((h, w, 3), dtype=np.uint8)
    big[..., 0] = (np.arange(w) * 255 // w).astype(np.uint8)[None, :]
    big[..., 1] = (np.arange(h) * 255 // h).astype(np.uint8)[:, None]
    big[..., 2] = 128
    save("huge.jpg", Image.fromarray(big), quality=70)
    (folder / "broken.png").write_bytes(b"\x89PNG but not really" * 10)
    out["broken.png"] = None
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    out["truncated.jpg"] = None
    return out
