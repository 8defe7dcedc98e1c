"""ClipCap's mapping networks: a CLIP embedding (B, P) -> prefix embeddings (B, prefix_length, E) for GPT-2.

Parameter names follow ClipCap's `clip_project` module, so its checkpoints load
by name (ssattn.caption.clipcap): MLPMapper is its MLP (Linear, Tanh, Linear
through a hidden layer of (prefix_length * E) // 2), TransformerMapper its
transformer mapper (a linear map to clip_length tokens, learned constant
prefix tokens, pre-norm transformer layers; the output is the constants'
positions).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLPMapper(nn.Module):
    """P -> (prefix_length * E) // 2 -> prefix_length * E, tanh between (ClipCap's MLP)."""

    kind = "mlp"

    def __init__(self, clip_dim: int, embed_dim: int, prefix_length: int = 10):
        super().__init__()
        self.clip_dim, self.embed_dim, self.prefix_length = int(clip_dim), int(embed_dim), int(prefix_length)
        out = self.embed_dim * self.prefix_length
        self.model = nn.Sequential(nn.Linear(self.clip_dim, out // 2), nn.Tanh(), nn.Linear(out // 2, out))

    def settings(self) -> dict:
        return {"mapper": self.kind, "clip_dim": self.clip_dim, "embed_dim": self.embed_dim,
                "prefix_length": self.prefix_length}

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).view(x.shape[0], self.prefix_length, self.embed_dim)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.to_queries(x).view(b, n, h, c // h).transpose(1, 2)
        kv = self.to_keys_values(x).view(b, n, 2, h, c // h)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), _MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Transformer(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: float):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dim, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper (8 heads, MLP ratio 2, self-attention only)."""

    kind = "transformer"

    def __init__(self, clip_dim: int, embed_dim: int, prefix_length: int = 10, clip_length: int = 10,
                 num_layers: int = 8, heads: int = 8, mlp_ratio: float = 2.0):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by heads ({heads})")
        self.clip_dim, self.embed_dim = int(clip_dim), int(embed_dim)
        self.prefix_length, self.clip_length = int(prefix_length), int(clip_length)
        self.num_layers, self.heads, self.mlp_ratio = int(num_layers), int(heads), float(mlp_ratio)
        self.linear = nn.Linear(self.clip_dim, self.clip_length * self.embed_dim)
        self.prefix_const = nn.Parameter(torch.randn(self.prefix_length, self.embed_dim))
        self.transformer = _Transformer(self.embed_dim, self.heads, self.num_layers, self.mlp_ratio)

    def settings(self) -> dict:
        return {"mapper": self.kind, "clip_dim": self.clip_dim, "embed_dim": self.embed_dim,
                "prefix_length": self.prefix_length, "clip_length": self.clip_length,
                "num_layers": self.num_layers, "heads": self.heads, "mlp_ratio": self.mlp_ratio}

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x).view(x.shape[0], self.clip_length, self.embed_dim)
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat((x, const.to(x.dtype)), dim=1))[:, self.clip_length:]


def build_mapper(settings: dict) -> nn.Module:
    """A mapper from its settings() (the "mapper" key chooses the kind)."""
    s = dict(settings)
    kind = s.pop("mapper", "mlp")
    if kind == "mlp":
        return MLPMapper(s["clip_dim"], s["embed_dim"], s.get("prefix_length", 10))
    if kind == "transformer":
        return TransformerMapper(**s)
    raise ValueError(f"mapper must be 'mlp' or 'transformer', got {kind!r}")
