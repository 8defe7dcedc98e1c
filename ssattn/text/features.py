"""Word features of captions from a CLIP text encoder, cached per caption.

    enc = TextEncoder("openai/clip-vit-base-patch32")   # any hub id or local folder
    words = enc(["a diver near a coral reef", "two fish"])
    words.words   # (B, L, Ct) float: CLIP's last hidden states, one row per token
    words.mask    # (B, L) bool: True for a padded position (the key_padding_mask of the attention)

L is the longest caption's token count in the batch (start and end tokens
included, at most `max_length`, CLIP's 77). The encoder is frozen (eval,
no gradients). Each caption's features are computed once and kept in a
FeatureCache keyed by the caption's text and the encoder's settings (model,
revision, max_length, dtype), in memory and, with cache_dir, on disk.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from ..guidance.feature_cache import FeatureCache, content_key
from ..guidance.hub import from_pretrained, model_ref, require_transformers, revision_of

DEFAULT_TEXT_ENCODER = "openai/clip-vit-base-patch32"


class TextFeatures(NamedTuple):
    """Word features (B, L, Ct), their padding mask (B, L) (True = padded) and optional word weights (B, L)."""

    words: Tensor
    mask: Tensor | None = None
    weight: Tensor | None = None

    def to(self, *args, **kwargs) -> "TextFeatures":
        """words (and weight) moved/converted like Tensor.to; the mask moved only (it stays bool)."""
        words = self.words.to(*args, **kwargs)
        mask = None if self.mask is None else self.mask.to(words.device)
        weight = None if self.weight is None else self.weight.to(device=words.device)
        return TextFeatures(words, mask, weight)

    def index(self, idx) -> "TextFeatures":
        """The rows `idx` of each tensor (a batch of a table of captions)."""
        return TextFeatures(*(None if t is None else t[idx] for t in self))


def as_text_features(text, name: str = "text") -> TextFeatures:
    """TextFeatures from a TextFeatures, a words tensor, or a tuple (words[, mask[, weight]])."""
    if isinstance(text, TextFeatures):
        return text
    if isinstance(text, Tensor):
        return TextFeatures(text)
    if isinstance(text, (tuple, list)) and 1 <= len(text) <= 3 and isinstance(text[0], Tensor):
        return TextFeatures(*text)
    raise TypeError(f"{name} must be word features (B, L, Ct), a tuple (words, mask[, weight]) or TextFeatures, "
                    f"got {type(text).__name__}")


def pad_features(rows: list[Tensor]) -> TextFeatures:
    """Stack per-caption features (L_i, Ct) into (B, max L_i, Ct) with the padding mask."""
    if not rows:
        raise ValueError("no captions to stack")
    longest = max(r.shape[0] for r in rows)
    words = rows[0].new_zeros((len(rows), longest, rows[0].shape[1]))
    mask = torch.ones((len(rows), longest), dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        words[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = False
    return TextFeatures(words, mask)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class TextEncoder:
    """Captions -> TextFeatures through transformers' CLIPTextModel and CLIPTokenizer (see the module docstring)."""

    def __init__(self, model=DEFAULT_TEXT_ENCODER, *, max_length: int = 77, device=None, dtype=None,
                 cache_dir=None, batch_size: int = 64):
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (start and end tokens), got {max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model_id = model
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32
        self.batch_size = batch_size
        require_transformers("text", "NaLSuper text guidance (its CLIP text encoder)")
        self.tokenizer = from_pretrained("AutoTokenizer", model, "CLIP tokenizer")
        with _quiet_transformers():  # a full CLIP checkpoint's vision weights are expected to stay unused
            self.model = from_pretrained("CLIPTextModel", model, "CLIP text encoder", dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        limit = int(getattr(self.model.config, "max_position_embeddings", max_length))
        self.max_length = min(max_length, limit)
        self.channels = int(self.model.config.hidden_size)
        self.settings = {"text_encoder": model_ref(model), "revision": revision_of(model),
                         "max_length": self.max_length, "dtype": str(self.dtype), "features": "last_hidden_state"}
        self.cache = FeatureCache("text-features", self.settings, cache_dir)

    def _check_captions(self, captions) -> list[str]:
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings (one per image), got a single string; wrap it: [text]")
        captions = list(captions)
        if not captions:
            raise ValueError("captions must not be empty")
        for i, c in enumerate(captions):
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"captions[{i}] must be a non-empty string, got {c!r}")
        return captions

    @torch.inference_mode()
    def _encode(self, captions: list[str]) -> list[Tensor]:
        """Each caption's features (L_i, Ct) on the CPU, as float32."""
        rows: list[Tensor] = []
        for i in range(0, len(captions), self.batch_size):
            chunk = captions[i:i + self.batch_size]
            tok = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            ids, attn = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=attn).last_hidden_state.float().cpu()
            lengths = attn.sum(1).tolist()
            rows += [hidden[j, : int(n)] for j, n in enumerate(lengths)]
        return rows

    def features(self, captions) -> list[Tensor]:
        """Per-caption features (L_i, Ct), float32 on the CPU, from the cache where it has them."""
        captions = self._check_captions(captions)
        key_of = {c: content_key(c) for c in captions}  # each distinct caption once
        found = {c: self.cache.get(k) for c, k in key_of.items()}
        todo = [c for c, entry in found.items() if entry is None]
        for c, row in zip(todo, self._encode(todo) if todo else []):
            found[c] = self.cache.put(key_of[c], {"words": row})
        return [found[c]["words"] for c in captions]

    def __call__(self, captions, *, device=None, dtype=None) -> TextFeatures:
        """TextFeatures of a batch of captions (padded to the longest), on `device` (default the CPU)."""
        feats = pad_features(self.features(captions))
        return feats.to(device=device or "cpu", dtype=dtype or torch.float32)
