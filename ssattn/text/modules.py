"""NaLSuper text guidance modules (its TCM): image-word cross-attention and intra-modal attention.

Definitions: docs/operations.md, section 5. Every block is a residual update
with a zero-initialised output projection, so a new block is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _checks, functional
from .._heads import image_heads, project_image_out, residual_add, token_heads


def _head_dim(channels: int, heads: int, head_dim: int | None, name: str) -> int:
    for n, value in ((name, channels), ("heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{n} must be a positive integer, got {value!r}")
    if head_dim is None:
        if channels % heads:
            raise ValueError(f"{name} ({channels}) must be divisible by heads ({heads}) unless head_dim is given")
        return channels // heads
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
    return head_dim


def check_words(words: Tensor, mask: Tensor | None, weight: Tensor | None, *, batch: int | None, channels: int,
                check_values: bool = True) -> None:
    """words (B, L, Ct), mask (B, L) bool (True = padded), weight (B, L) in [0, 1]; errors name the argument."""
    _checks.tensor("words", words, ndim=3)
    B, L, Ct = words.shape
    if L < 1:
        raise ValueError(f"words must hold at least one word (B, L, Ct) with L >= 1, got {tuple(words.shape)}")
    if Ct != channels:
        raise ValueError(f"words must have {channels} features (B, L, {channels}), got {tuple(words.shape)}")
    if batch is not None and B != batch:
        raise ValueError(f"words has batch {B} but the image feature has batch {batch}")
    if mask is not None:
        _checks.tensor("mask", mask, ndim=2, floating=False)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = padded word), got {mask.dtype}")
        if tuple(mask.shape) != (B, L):
            raise ValueError(f"mask must be a bool tensor (B, L) = {(B, L)} (True = padded word), "
                             f"got shape {tuple(mask.shape)}")
    if weight is not None:
        _checks.tensor("weight", weight, ndim=2)
        if tuple(weight.shape) != (B, L):
            raise ValueError(f"weight must have shape (B, L) = {(B, L)}, got {tuple(weight.shape)}")
        if check_values:
            _checks.unit_interval("weight", weight)
    _checks.same_device(words=words, mask=mask, weight=weight)


class TextGuidedCrossAttention(nn.Module):
    """Image-word cross-attention (TCM, cross-modal): y = x + W_o(attention(W_q x, W_k words, W_v words)).

    x (B, C, H, W) gives the queries through a 1x1 projection; words (B, L, Ct)
    the keys and values through linear projections; mask (B, L) bool marks
    padded words; weight (B, L) optional per-word weights in [0, 1] with
    SPEC 2's weighted-key semantics (a word's weight scales its key and its
    value). W_o is a 1x1 projection without bias, zero-initialised: a new
    block, and any image whose words are all padded, give x unchanged.
    With L <= 128 words the attention runs the short-key kernel on CUDA.
    """

    def __init__(self, img_channels: int, text_channels: int, heads: int = 1, head_dim: int | None = None, *,
                 backend: str = "auto", scale: float | None = None, check_values: bool = True):
        super().__init__()
        self.head_dim = _head_dim(img_channels, heads, head_dim, "img_channels")
        _head_dim(text_channels, 1, None, "text_channels")
        self.img_channels, self.text_channels, self.heads = img_channels, text_channels, heads
        self.backend, self.scale, self.check_values = backend, _checks.scale(scale), bool(check_values)
        inner = heads * self.head_dim
        self.q_proj = nn.Conv2d(img_channels, inner, 1, bias=False)
        self.k_proj = nn.Linear(text_channels, inner, bias=False)
        self.v_proj = nn.Linear(text_channels, inner, bias=False)
        self.out_proj = nn.Conv2d(inner, img_channels, 1, bias=False)
        nn.init.zeros_(self.out_proj.weight)

    def extra_repr(self) -> str:
        return (f"img_channels={self.img_channels}, text_channels={self.text_channels}, heads={self.heads}, "
                f"head_dim={self.head_dim}, backend={self.backend!r}")

    def forward(self, x: Tensor, words: Tensor, mask: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
        _checks.tensor("x", x, ndim=4)
        _checks.nonempty_spatial("x", x)
        B, C, H, W = x.shape
        if C != self.img_channels:
            raise ValueError(f"x must have {self.img_channels} channels, got shape {tuple(x.shape)}")
        check_words(words, mask, weight, batch=B, channels=self.text_channels, check_values=self.check_values)
        _checks.same_device(x=x, words=words)
        _checks.parameter_dtype(self.q_proj.weight.dtype, x=x, words=words)
        h, d = self.heads, self.head_dim
        q = image_heads(self.q_proj(x), h, d)
        k, v = token_heads(self.k_proj(words), h, d), token_heads(self.v_proj(words), h, d)
        w = None if weight is None else weight.to(k.dtype)
        scale = self.scale if self.scale is not None else d ** -0.5
        functional._check_attention_args(q, k, v, w, mask, scale, check_values=False)
        out = functional._attention(q, k, v, w, mask, float(scale), self.backend)
        return residual_add(x, project_image_out(self.out_proj, out, B, H, W))


class IntraModalAttention(nn.Module):
    """Self-attention among the image tokens of one stage: y = x + W_o(attention(W_q x, W_k x, W_v x)).

    The SPEC 2 kernel with q, k and v from one feature and no weight; W_o
    zero-initialised (identity at construction). Its cost is quadratic in
    H*W: use it at low-resolution stages.
    """

    def __init__(self, channels: int, heads: int = 1, head_dim: int | None = None, *, backend: str = "auto",
                 scale: float | None = None):
        super().__init__()
        self.head_dim = _head_dim(channels, heads, head_dim, "channels")
        self.channels, self.heads = channels, heads
        self.backend, self.scale = backend, _checks.scale(scale)
        inner = heads * self.head_dim
        self.q_proj = nn.Conv2d(channels, inner, 1, bias=False)
        self.k_proj = nn.Conv2d(channels, inner, 1, bias=False)
        self.v_proj = nn.Conv2d(channels, inner, 1, bias=False)
        self.out_proj = nn.Conv2d(inner, channels, 1, bias=True)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, head_dim={self.head_dim}, backend={self.backend!r}"

    def forward(self, x: Tensor) -> Tensor:
        _checks.tensor("x", x, ndim=4)
        _checks.nonempty_spatial("x", x)
        B, C, H, W = x.shape
        if C != self.channels:
            raise ValueError(f"x must have {self.channels} channels, got shape {tuple(x.shape)}")
        _checks.parameter_dtype(self.q_proj.weight.dtype, x=x)
        h, d = self.heads, self.head_dim
        q, k, v = (image_heads(p(x), h, d) for p in (self.q_proj, self.k_proj, self.v_proj))
        scale = self.scale if self.scale is not None else d ** -0.5
        out = functional._attention(q, k, v, None, None, float(scale), self.backend)
        return residual_add(x, project_image_out(self.out_proj, out, B, H, W))


class WordSelfAttention(nn.Module):
    """Self-attention among the words (intra-modal, text): words + W_o(attention), padded words unchanged.

    Plain PyTorch (the reference attention): L is at most 77, so no kernel pays.
    W_o zero-initialised (identity at construction).
    """

    def __init__(self, text_channels: int, heads: int = 1):
        super().__init__()
        self.head_dim = _head_dim(text_channels, heads, None, "text_channels")
        self.text_channels, self.heads = text_channels, heads
        self.qkv = nn.Linear(text_channels, 3 * text_channels, bias=False)
        self.out_proj = nn.Linear(text_channels, text_channels, bias=True)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return f"text_channels={self.text_channels}, heads={self.heads}"

    def forward(self, words: Tensor, mask: Tensor | None = None) -> Tensor:
        check_words(words, mask, None, batch=None, channels=self.text_channels)
        _checks.parameter_dtype(self.qkv.weight.dtype, words=words)
        B, L, Ct = words.shape
        q, k, v = (token_heads(t, self.heads, self.head_dim) for t in self.qkv(words).chunk(3, dim=-1))
        out = functional.masked_cross_attention(q, k, v, key_padding_mask=mask, backend="reference")
        update = self.out_proj(out.transpose(1, 2).reshape(B, L, Ct))
        if mask is not None:
            update = update.masked_fill(mask[..., None], 0.0)
        return residual_add(words, update)


class TextConditioning(nn.Module):
    """NaLSuper's Textual Guidance Conditioning Mechanism for one stage: intra-modal, then cross-modal.

    words' = WordSelfAttention(words) (intra_text), x' = IntraModalAttention(x)
    (intra_image), y = TextGuidedCrossAttention(x', words', mask, weight).
    Each part starts as the identity, so the block does.
    """

    def __init__(self, img_channels: int, text_channels: int, heads: int = 1, head_dim: int | None = None, *,
                 intra_text: bool = True, intra_image: bool = False, backend: str = "auto",
                 scale: float | None = None, check_values: bool = True):
        super().__init__()
        self.cross = TextGuidedCrossAttention(img_channels, text_channels, heads, head_dim, backend=backend,
                                              scale=scale, check_values=check_values)
        self.word_attn = WordSelfAttention(text_channels, heads if text_channels % heads == 0 else 1) \
            if intra_text else None
        self.image_attn = IntraModalAttention(img_channels, heads, head_dim, backend=backend, scale=scale) \
            if intra_image else None
        self.img_channels, self.text_channels = img_channels, text_channels

    def forward(self, x: Tensor, words: Tensor, mask: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
        if self.word_attn is not None:
            words = self.word_attn(words, mask)
        if self.image_attn is not None:
            x = self.image_attn(x)
        return self.cross(x, words, mask, weight)
