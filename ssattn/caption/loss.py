"""CaptionFeatureLoss: the enhanced image and its reference must agree in a frozen captioner's feature spaces.

    loss = sum_s w_s * d(f_s(enhanced), f_s(reference))      (ssattn.caption_feature_loss)

The captioner is frozen (requires_grad False) and always in eval mode. It is
held outside the module tree: the loss has no parameters() and no
state_dict() entries, so an optimiser built from a model that owns the loss
never sees the captioner; `.to()` / `.cuda()` still move it. The reference
branch runs under no_grad, through the reference-feature cache when one is
given (so a step runs the captioner on the enhanced image only). The
captioner may run in bf16 under autocast (`amp_dtype`); the loss itself
accumulates in float32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .. import _checks
from ..functional import caption_feature_loss
from ..reference.caption_loss import DISTANCES
from .cache import FeatureCache, reference_cache, reference_key, weights_fingerprint
from .captioner import SPACES, Captioner


class CaptionFeatureLoss(nn.Module):
    """Consistency of enhanced and reference images in the visual, prefix and language spaces of a captioner.

    spaces: a subset of ("visual", "prefix", "language"), in any order; weights: one per space
    (default 1 each); distance: "l1", "l2" or "cosine" (docs/operations.md section 4).
    caption_length: with T > 0 and no tokens passed, the language space also covers T
    tokens of the reference image's own greedy caption, teacher-forced in both branches.
    cache: True for a reference-feature cache (in memory; on disk too with cache_dir), a
    FeatureCache of kind "caption-features" (ssattn.caption.cache.reference_cache), or
    None/False; cache_memory bounds the images it holds in memory (least recently used out
    first: data with random crops never repeats a reference; ~64 KB an image at ClipCap's
    sizes), None for no bound. amp_dtype: run the captioner under torch.autocast with this dtype (e.g.
    torch.bfloat16); None leaves the caller's autocast state as it is.
    """

    def __init__(self, captioner: Captioner, spaces=SPACES, distance: str = "l1", weights=None, *,
                 caption_length: int = 0, cache=True, cache_dir=None, cache_memory: int | None = 4096,
                 amp_dtype: torch.dtype | None = None, backend: str = "auto"):
        super().__init__()
        if not isinstance(captioner, Captioner):
            raise TypeError(f"captioner must be an ssattn.caption.Captioner, got {type(captioner).__name__}")
        spaces = (spaces,) if isinstance(spaces, str) else tuple(spaces)
        if not spaces or len(set(spaces)) != len(spaces) or any(s not in SPACES for s in spaces):
            raise ValueError(f"spaces must be distinct names from {list(SPACES)}, got {list(spaces)}")
        _checks.choice("distance", distance, DISTANCES)
        self.spaces, self.distance, self.backend = spaces, distance, backend
        self.weights = ([1.0] * len(spaces) if weights is None
                        else _checks.numbers_per_level("weights", weights, len(spaces)))
        if amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype!r}")
        self.amp_dtype = amp_dtype
        if isinstance(caption_length, bool) or not isinstance(caption_length, int) or caption_length < 0:
            raise ValueError(f"caption_length must be a non-negative integer, got {caption_length!r}")
        if caption_length and "language" not in spaces:
            raise ValueError("caption_length is for the 'language' space, which this loss does not have")
        self.caption_length = caption_length
        captioner.requires_grad_(False).eval()
        self.__dict__["captioner"] = captioner  # outside the module tree: no parameters(), no state_dict()
        if cache is True:
            cache = reference_cache(self.cache_settings(), cache_dir, memory=cache_memory)
        elif cache_dir is not None:
            raise ValueError("cache_dir is for the cache this loss builds (cache=True), not for cache=None/False "
                             "or a cache of your own")
        elif cache is not None and cache is not False and not isinstance(cache, FeatureCache):
            raise TypeError(f"cache must be True, False, None or a FeatureCache, got {type(cache).__name__}")
        self.cache = cache if isinstance(cache, FeatureCache) else None

    def cache_settings(self) -> dict:
        """What the reference features depend on: the captioner (settings and weights), spaces, autocast dtype."""
        return {"captioner": self.captioner.settings(), "weights": weights_fingerprint(self.captioner),
                "spaces": list(self.spaces), "amp_dtype": str(self.amp_dtype), "caption_length": self.caption_length}

    # The captioner follows .to()/.cuda()/.half() and stays in eval mode.
    def _apply(self, fn, *args, **kwargs):
        self.captioner._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.captioner.eval()
        return self

    def extra_repr(self) -> str:
        return f"spaces={self.spaces}, distance={self.distance!r}, weights={self.weights}"

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    def features(self, images: Tensor, tokens: Tensor | None = None) -> list[Tensor]:
        """The captioner's features of `images` in self.spaces (differentiable w.r.t. images)."""
        with self._autocast(images.device):
            f = self.captioner.features(images, self.spaces, tokens)
        return [f[s] for s in self.spaces]

    def _reference_entries(self, reference: Tensor, tokens: Tensor | None) -> dict:
        with self._autocast(reference.device):
            return self.captioner.features(reference, self.spaces, tokens, caption_length=self.caption_length)

    @torch.no_grad()
    def reference_features(self, reference: Tensor, tokens: Tensor | None = None):
        """(features in self.spaces, caption tokens or None) of the reference images, from the cache where it has them.

        Without `tokens` and with caption_length > 0, the tokens are each reference image's
        greedy caption (computed once and cached with its features).
        """
        if self.cache is None:
            f = self._reference_entries(reference, tokens)
            return [f[s] for s in self.spaces], f.get("tokens", tokens)
        # one device-to-host copy for the batch's keys
        host, host_tokens = reference.detach().cpu(), None if tokens is None else tokens.detach().cpu()
        keys = [reference_key(host[i], None if tokens is None else host_tokens[i]) for i in range(len(host))]
        found = [self.cache.get(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            idx = torch.tensor(todo, device=reference.device)
            computed = self._reference_entries(reference[idx], None if tokens is None else tokens[idx])
            for j, i in enumerate(todo):
                found[i] = self.cache.put(keys[i], {s: f[j:j + 1] for s, f in computed.items()})
        # stored on the CPU as float32: the loss promotes each pair to the wider dtype
        feats = [torch.cat([f[s] for f in found]).to(reference.device, non_blocking=True) for s in self.spaces]
        if tokens is None and "tokens" in found[0]:
            tokens = torch.cat([f["tokens"] for f in found]).to(reference.device)
        return feats, tokens

    def forward(self, enhanced: Tensor, reference: Tensor, tokens: Tensor | None = None) -> Tensor:
        """Scalar float32 loss for images (B, 3, H, W) in [0, 1]; tokens (B, T): teacher-forced caption tokens
        (e.g. the reference's caption), which take the place of caption_length's greedy caption."""
        _checks.tensor("enhanced", enhanced, ndim=4)
        _checks.tensor("reference", reference, ndim=4)
        if enhanced.shape[0] != reference.shape[0]:
            raise ValueError(f"enhanced and reference must have the same batch size, got {enhanced.shape[0]} "
                             f"and {reference.shape[0]}")
        if tokens is not None:
            _checks.tensor("tokens", tokens, ndim=2, floating=False)
            if tokens.shape[0] != enhanced.shape[0]:
                raise ValueError(f"tokens must be (B, T) with B = {enhanced.shape[0]}, got {tuple(tokens.shape)}")
            if "language" not in self.spaces:
                raise ValueError("tokens are only used by the 'language' space, which this loss does not have")
        ref, tokens = self.reference_features(reference, tokens)
        out = self.features(enhanced, tokens)
        return caption_feature_loss(out, ref, distance=self.distance, weights=self.weights, backend=self.backend)
