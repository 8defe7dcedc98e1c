"""The caption-model regulariser in training (`ssattn train --caption-loss WEIGHT --captioner ID_OR_DIR`).

`CaptionTerm` is weight * ssattn.caption.CaptionFeatureLoss(output, reference);
`WithCaption` adds it to the reconstruction loss, so the trainer's criterion
stays one callable (output, reference) -> loss with a describe(). The
captioner is frozen and outside every module tree here too: the optimiser,
built from the enhancement model's parameters, never sees it.
"""

from __future__ import annotations

import os

from torch import Tensor, nn

from ssattn.caption import CaptionFeatureLoss, load_captioner


class CaptionTerm(nn.Module):
    """weight * CaptionFeatureLoss(output, reference)."""

    def __init__(self, loss: CaptionFeatureLoss, weight: float):
        super().__init__()
        self.loss, self.weight = loss, float(weight)

    def describe(self) -> str:
        words = f", {self.loss.caption_length} caption tokens" if self.loss.caption_length else ""
        return f"{self.weight:g}*caption({self.loss.distance}: {'+'.join(self.loss.spaces)}{words})"

    def forward(self, output: Tensor, reference: Tensor) -> Tensor:
        return self.weight * self.loss(output, reference)


class WithCaption(nn.Module):
    """base(output, reference) + the caption term."""

    def __init__(self, base: nn.Module, term: CaptionTerm):
        super().__init__()
        self.base, self.term = base, term

    def describe(self) -> str:
        return f"{self.base.describe()} + {self.term.describe()}"

    def forward(self, output: Tensor, reference: Tensor) -> Tensor:
        return self.base(output, reference) + self.term(output, reference)


def caption_term(*, weight: float, captioner, distance: str = "l1", cache_dir=None, spaces=None,
                 caption_length: int = 0) -> CaptionTerm:
    """A CaptionTerm over the captioner at `captioner` (folder, hub id or ClipCap checkpoint, or a Captioner)."""
    cap = load_captioner(captioner) if isinstance(captioner, (str, os.PathLike)) else captioner
    kw = {} if spaces is None else {"spaces": spaces}
    return CaptionTerm(CaptionFeatureLoss(cap, distance=distance, cache_dir=cache_dir, caption_length=caption_length,
                                          **kw), weight)


def caption_criterion(base: nn.Module, **kw) -> WithCaption:
    """base + caption_term(**kw) (for scripts and benchmarks)."""
    return WithCaption(base, caption_term(**kw))
