"""Captions of the training items as word features the trainer can batch (`ssattn train --text`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ssattn.text import TextEncoder, TextFeatures, pad_features, read_captions


def item_names(data) -> list[str]:
    """Each item's name for the caption files: a paired folder's degraded file stems, else the item index."""
    pairs = getattr(data, "pairs", None)
    if pairs is not None:
        return [p[0].stem for p in pairs]
    return [str(i) for i in range(len(data))]


@dataclass
class ItemText:
    """Word features of the distinct captions (U, L, Ct) with their mask, and each item's caption row (N,)."""

    table: TextFeatures
    rows: Tensor
    captions: list[str]

    @classmethod
    def from_captions(cls, captions: list[str], encoder: TextEncoder) -> "ItemText":
        distinct = list(dict.fromkeys(captions))
        where = {c: i for i, c in enumerate(distinct)}
        return cls(pad_features(encoder.features(distinct)), torch.tensor([where[c] for c in captions]), captions)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def channels(self) -> int:
        return int(self.table.words.shape[-1])

    def batch(self, idx) -> TextFeatures:
        return self.table.index(self.rows[torch.as_tensor(idx)])


def load_item_text(data, source, encoder: TextEncoder) -> ItemText:
    """One caption per item of `data` from `source` (ssattn.text.read_captions), encoded by `encoder`."""
    return ItemText.from_captions(read_captions(source, item_names(data)), encoder)
