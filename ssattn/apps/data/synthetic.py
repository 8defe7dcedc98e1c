"""Synthetic underwater degradation of the photographs that ship with scikit-image.

Physical model (simplified underwater image formation, Jaffe-McGlamery as
used by e.g. Akkaynak & Treibitz; per colour channel c):

    I_c = J_c * t_c + B_c * (1 - t_c),     t_c = exp(-beta_c * d)

J the clean image (the reference), d a depth map in metres, beta_c the
attenuation coefficient (1/m) with beta_red > beta_green > beta_blue (red
light dies first under water), B_c the blue-green veiling light
(backscatter). Then a forward-scatter blur (Gaussian, sigma growing with
depth), a global contrast loss (haze), and sensor noise. The depth map is a
vertical gradient (the scene recedes towards the top) plus smooth noise.

Every draw comes from numpy's Generator seeded with (seed, index), so item i
of a dataset is the same on every machine and every call. Parameters
(uniform ranges per image):

    beta_c        red 0.35-0.70, green 0.08-0.20, blue 0.04-0.12   (1/m)
    depth         near 0.5-2 m (bottom row) to far 2.5-6 m (top row),
                  + smooth noise of amplitude 0.3-0.8 m
    B_c           red 0.02-0.12, green 0.30-0.60, blue 0.35-0.75
    blur sigma    0.2-0.6 px per metre of depth (blend of two blurs)
    haze          contrast scaled by 0.85-1.0 towards the mean
    noise         Gaussian, sigma 0.005-0.02
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Colour photographs in skimage.data that load offline (no pooch download).
SOURCES = ("astronaut", "coffee", "chelsea", "rocket")
# Held-out split: the right quarter of every photograph is test-only.
TEST_FRACTION = 0.25

RANGES = {
    "beta": ((0.35, 0.70), (0.08, 0.20), (0.04, 0.12)),
    "near": (0.5, 2.0),
    "far": (2.5, 6.0),
    "depth_noise": (0.3, 0.8),
    "backscatter": ((0.02, 0.12), (0.30, 0.60), (0.35, 0.75)),
    "blur_per_m": (0.2, 0.6),
    "haze": (0.85, 1.0),
    "noise": (0.005, 0.02),
}


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Tensor:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"skimage.data.{name} is not a colour photograph")
    return torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).float() / 255.0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int = 4) -> Tensor:
    """Noise in [-1, 1], smooth over about h/cells pixels (bicubic upsampling of a coarse grid)."""
    coarse = torch.from_numpy(rng.uniform(-1, 1, size=(1, 1, cells + 1, cells + 1))).float()
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp(-1, 1)[0, 0]


def _blur(x: Tensor, sigma: float) -> Tensor:
    if sigma < 0.05:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[0]
    y = F.conv2d(F.pad(x[None], (radius, radius, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return y[0]


def background_depth(rng: np.random.Generator, h: int, w: int) -> tuple[Tensor, float, float]:
    """Depth map (h, w) in metres: far at the top row, near at the bottom, plus smooth noise; and (near, far)."""
    near, far = float(rng.uniform(*RANGES["near"])), float(rng.uniform(*RANGES["far"]))
    rows = torch.linspace(far, near, h).view(h, 1).expand(h, w)
    depth = (rows + float(rng.uniform(*RANGES["depth_noise"])) * _smooth_noise(rng, h, w)).clamp_min(0.1)
    return depth, near, far


def degrade(clean: Tensor, rng: np.random.Generator, depth: Tensor | None = None) -> tuple[Tensor, dict]:
    """Underwater version of a clean image (3, H, W) in [0, 1]; returns (degraded, parameters).

    depth (H, W) in metres: the scene's depth map; None draws background_depth().
    """
    _, h, w = clean.shape
    u = lambda lo_hi: float(rng.uniform(*lo_hi))  # noqa: E731
    beta = torch.tensor([u(r) for r in RANGES["beta"]]).view(3, 1, 1)
    back = torch.tensor([u(r) for r in RANGES["backscatter"]]).view(3, 1, 1)
    if depth is None:
        depth, near, far = background_depth(rng, h, w)
    else:
        if tuple(depth.shape) != (h, w):
            raise ValueError(f"depth must have shape {(h, w)} (the image's), got {tuple(depth.shape)}")
        depth = depth.float().clamp_min(0.1)
        near, far = float(depth.min()), float(depth.max())
    t = torch.exp(-beta * depth)
    img = clean * t + back * (1 - t)
    # Forward scatter: blend a light and a strong blur by relative depth.
    k = u(RANGES["blur_per_m"])
    rel = ((depth - depth.min()) / (depth.max() - depth.min() + 1e-6))[None]
    img = _blur(img, k * float(depth.min())) * (1 - rel) + _blur(img, k * float(depth.max())) * rel
    haze = u(RANGES["haze"])
    img = img.mean(dim=(1, 2), keepdim=True) * (1 - haze) + img * haze
    sigma = u(RANGES["noise"])
    img = img + sigma * torch.from_numpy(rng.standard_normal(img.shape)).float()
    params = {"beta": beta.flatten().tolist(), "backscatter": back.flatten().tolist(), "near": near, "far": far,
              "blur_per_m": k, "haze": haze, "noise": sigma}
    return img.clamp(0, 1), params


def _crop(rng: np.random.Generator, size: int, split: str) -> tuple[Tensor, tuple]:
    name = SOURCES[int(rng.integers(len(SOURCES)))]
    photo = _photo(name)
    _, H, W = photo.shape
    cut = int(round(W * (1 - TEST_FRACTION)))
    # The crop covers 2-8x the output size in photo pixels (then resized), within the split's region.
    region_w = cut if split == "train" else W - cut
    limit = min(H, region_w)
    side = int(round(rng.uniform(min(2 * size, limit), min(8 * size, limit))))
    ch = cw = max(1, side)
    top = int(rng.integers(0, H - ch + 1))
    left = int(rng.integers(0, region_w - cw + 1)) + (0 if split == "train" else cut)
    patch = photo[:, top:top + ch, left:left + cw]
    patch = F.interpolate(patch[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if rng.random() < 0.5:
        patch = patch.flip(-1)
    return patch.clamp(0, 1), (name, top, left, ch, cw)


def check_set_args(size, n, split) -> None:
    """The arguments every synthetic set shares: image size, number of items, split."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


class SyntheticUnderwater(torch.utils.data.Dataset):
    """n synthetic underwater crops of size x size: items (degraded (3,S,S), reference (3,S,S), guidance (1,S,S)).

    split="train" crops the left three quarters of each photograph,
    split="test" the right quarter (no pixel of a test reference is seen in
    training). guidance is ssattn.guidance.embedded_guidance(degraded) with
    gamma/delta. Items are computed once and cached in memory.
    """

    def __init__(self, size: int = 64, n: int = 256, seed: int = 0, split: str = "train", *,
                 gamma: float = 2.0, delta: float = 0.2):
        check_set_args(size, n, split)
        self.size, self.n, self.seed, self.split = size, n, int(seed), split
        self.gamma, self.delta = gamma, delta
        self._cache: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.params: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.n

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, 0 if self.split == "train" else 1])

    def __getitem__(self, index: int):
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        index %= self.n
        if index not in self._cache:
            self.materialize([index])
        return self._cache[index]

    def materialize(self, indices=None) -> "SyntheticUnderwater":
        """Compute (and cache) items; guidance is computed for the whole batch at once."""
        from ssattn.guidance import embedded_guidance

        todo = [i for i in (range(self.n) if indices is None else indices) if i not in self._cache]
        if not todo:
            return self
        refs, degs = [], []
        for i in todo:
            rng = self._rng(i)
            ref, box = _crop(rng, self.size, self.split)
            deg, params = degrade(ref, rng)
            params["crop"] = box  # (photo, top, left, height, width) in the source photograph
            refs.append(ref)
            degs.append(deg)
            self.params[i] = params
        deg_b = torch.stack(degs)
        with torch.no_grad():
            guide = embedded_guidance(deg_b, gamma=self.gamma, delta=self.delta, backend="reference")[0]
        for j, i in enumerate(todo):
            self._cache[i] = (degs[j], refs[j], guide[j].contiguous())
        return self

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """All items stacked: (degraded (n,3,S,S), reference (n,3,S,S), guidance (n,1,S,S))."""
        self.materialize()
        items = [self._cache[i] for i in range(self.n)]
        return tuple(torch.stack(t) for t in zip(*items))
