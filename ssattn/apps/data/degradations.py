"""Generated degradations for routing: a kind, a severity (1-5) and a seed; deterministic and offline.

Kinds (the routing paper's four classes, then two underwater ones):

    noise_blur_jpeg  Gaussian blur, then Gaussian noise, then JPEG (the
                     super-resolution family of degradations)
    reflection       a second, blurred and attenuated image added, with a
                     shifted ghost copy (the double reflection of thick glass)
    motion_blur      a random linear kernel (length and angle)
    none             the clean image, unchanged
    underwater       the colour cast + haze model of synthetic.degrade, mixed
                     in with weight severity / 5
    low_light        gamma darkening, exposure cut and sensor noise

Each parameter grows linearly with the severity and is jittered within its
level by numpy's Generator seeded with (seed, kind), so an image, a kind, a
severity and a seed always give the same pixels. JPEG goes through Pillow's
encoder in memory.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssattn.routing.classes import ALL_CLASSES, PAPER_CLASSES

from .synthetic import _blur, degrade as underwater_degrade

KINDS = ALL_CLASSES
SEVERITIES = (1, 2, 3, 4, 5)

# Photographs that ship inside scikit-image (PNG, so free of JPEG blocks), split by photograph:
# nothing of a test image's content is seen when a classifier is fitted on the train split.
TRAIN_SOURCES = ("astronaut", "coffee", "camera", "coins", "grass", "brick", "page", "immunohistochemistry")
TEST_SOURCES = ("chelsea", "moon", "gravel", "clock", "cell")


@functools.lru_cache(maxsize=None)
def _source(name: str) -> Tensor:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0


def clean_crop(rng: np.random.Generator, size: int, sources=TRAIN_SOURCES) -> Tensor:
    """A (3, size, size) crop of a random source photograph, shrunk 1.5-6x where the photo allows (never enlarged)."""
    photo = _source(sources[int(rng.integers(len(sources)))])
    _, h, w = photo.shape
    m = min(h, w)
    side = int(round(rng.uniform(min(1.5 * size, m), min(6 * size, m))))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    patch = photo[None, :, top:top + side, left:left + side]
    patch = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (patch.flip(-1) if rng.random() < 0.5 else patch).clamp(0, 1)


def _level(rng: np.random.Generator, severity: int, lo: float, hi: float) -> float:
    """A value between lo (severity 1) and hi (severity 5), jittered by a quarter of a level."""
    step = (hi - lo) / 4
    return float(lo + step * (severity - 1) + rng.uniform(-0.25, 0.25) * step)


def _jpeg(x: Tensor, quality: int) -> Tensor:
    from PIL import Image

    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as img:
        out = np.array(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(out).permute(2, 0, 1).float() / 255.0


def _noise(rng: np.random.Generator, shape, sigma: float) -> Tensor:
    return sigma * torch.from_numpy(rng.standard_normal(shape)).float()


def line_kernel(length: float, angle: float, oversample: int = 8) -> Tensor:
    """Normalised linear motion kernel (K, K): a segment of `length` px at `angle` radians, antialiased."""
    radius = int(math.ceil(length / 2)) + 1
    size = 2 * radius + 1
    t = torch.linspace(-length / 2, length / 2, max(2, int(length * oversample)))
    return splat(t * math.cos(angle) + radius, -t * math.sin(angle) + radius, size)


def splat(xs: Tensor, ys: Tensor, size: int) -> Tensor:
    """A normalised (size, size) kernel from points (xs, ys) on its pixel grid, each splatted bilinearly onto its
    four neighbours: a sub-pixel path (a line, a camera shake) without stair steps."""
    k = torch.zeros(size, size)
    x0, y0 = xs.floor(), ys.floor()
    for dx in (0, 1):
        for dy in (0, 1):
            w = (1 - (xs - x0 - dx).abs()) * (1 - (ys - y0 - dy).abs())
            k.index_put_(((y0 + dy).long(), (x0 + dx).long()), w, accumulate=True)
    return k / k.sum()


def _conv(x: Tensor, k: Tensor) -> Tensor:
    r = k.shape[-1] // 2
    c = x.shape[0]
    return F.conv2d(F.pad(x[None], (r, r, r, r), mode="reflect"), k.expand(c, 1, -1, -1), groups=c)[0]


def apply(clean: Tensor, kind: str, severity: int = 3, seed: int = 0, *, second: Tensor | None = None
          ) -> tuple[Tensor, dict]:
    """Degrade a clean image (3, H, W) in [0, 1]; returns (degraded in [0, 1], parameters).

    `second` is the image reflected in the glass (kind "reflection"); by
    default the clean image flipped and rolled, so one image is enough.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer 1-5, got {severity!r}")
    if not (isinstance(clean, Tensor) and clean.dim() == 3 and clean.shape[0] == 3):
        raise ValueError(f"clean must be an image tensor (3, H, W), got {getattr(clean, 'shape', type(clean))}")
    clean = clean.detach().float().cpu().clamp(0, 1)
    rng = np.random.default_rng([int(seed), KINDS.index(kind), int(severity)])
    s = severity
    if kind == "none":
        return clean.clone(), {}
    if kind == "noise_blur_jpeg":
        p = {"blur_sigma": _level(rng, s, 0.8, 2.2), "noise": _level(rng, s, 0.01, 0.05),
             "quality": int(round(_level(rng, s, 70, 15)))}
        x = _blur(clean, p["blur_sigma"])
        x = (x + _noise(rng, x.shape, p["noise"])).clamp(0, 1)
        return _jpeg(x, p["quality"]), p
    if kind == "reflection":
        r = second if second is not None else clean.flip(-1).roll(clean.shape[-2] // 3, dims=-2)
        if r.shape != clean.shape:
            raise ValueError(f"second must have the clean image's shape {tuple(clean.shape)}, got {tuple(r.shape)}")
        angle = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(4, 10)
        p = {"alpha": _level(rng, s, 0.2, 0.5), "sigma": float(rng.uniform(0.6, 2.0)), "ghost": float(rng.uniform(0.6, 1.0)),
             "shift": (int(round(dist * math.sin(angle))), int(round(dist * math.cos(angle))))}
        r = _blur(r.float().clamp(0, 1), p["sigma"])
        r = (r + p["ghost"] * r.roll(p["shift"], dims=(-2, -1))) / (1 + p["ghost"])
        return ((1 - p["alpha"]) * clean + p["alpha"] * r).clamp(0, 1), p
    if kind == "motion_blur":
        p = {"length": _level(rng, s, 5, 17), "angle": float(rng.uniform(0, math.pi))}
        return _conv(clean, line_kernel(p["length"], p["angle"])).clamp(0, 1), p
    if kind == "underwater":
        deg, p = underwater_degrade(clean, rng)
        w = s / 5
        p = {"weight": w, **p}
        return (clean * (1 - w) + deg * w).clamp(0, 1), p
    # low_light
    p = {"gamma": _level(rng, s, 1.3, 2.2), "exposure": _level(rng, s, 0.45, 0.12),
         "noise": _level(rng, s, 0.004, 0.015)}
    x = clean.pow(p["gamma"]) * p["exposure"]
    x = x + _noise(rng, x.shape, p["noise"]) * (x + 0.02).sqrt()  # shot noise grows with the signal
    return x.clamp(0, 1), p


class DegradationSet(torch.utils.data.Dataset):
    """Crops of the scikit-image photographs, each degraded by one kind at one severity: (image, class index).

    Items cycle through kinds x severities (index i has kind kinds[i % K],
    severity severities[(i // K) % S]); crops, reflections and parameters come
    from (seed, i). split="train" crops TRAIN_SOURCES, split="test" the other
    photographs, TEST_SOURCES.
    """

    def __init__(self, n: int = 200, size: int = 128, seed: int = 0, split: str = "train", *,
                 kinds=PAPER_CLASSES, severities=SEVERITIES):
        kinds, severities = tuple(kinds), tuple(severities)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        if not severities or any(s not in SEVERITIES for s in severities):
            raise ValueError(f"severities must be a non-empty subset of {SEVERITIES}, got {severities!r}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.n, self.size, self.seed, self.split = int(n), int(size), int(seed), split
        self.kinds, self.severities = kinds, severities
        self._cache: dict[int, tuple[Tensor, int]] = {}

    def __len__(self) -> int:
        return self.n

    def kind_and_severity(self, i: int) -> tuple[str, int]:
        k = len(self.kinds)
        return self.kinds[i % k], self.severities[(i // k) % len(self.severities)]

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} items")
        if i not in self._cache:
            rng = np.random.default_rng([self.seed, i, 0 if self.split == "train" else 1])
            sources = TRAIN_SOURCES if self.split == "train" else TEST_SOURCES
            clean, second = clean_crop(rng, self.size, sources), clean_crop(rng, self.size, sources)
            kind, sev = self.kind_and_severity(i)
            x, _ = apply(clean, kind, sev, seed=int(rng.integers(2**31)), second=second)
            self._cache[i] = (x, self.kinds.index(kind))
        return self._cache[i]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(images (n, 3, S, S), class indices into kinds (n,), severities (n,))."""
        items = [self[i] for i in range(self.n)]
        sev = torch.tensor([self.kind_and_severity(i)[1] for i in range(self.n)])
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]), sev
