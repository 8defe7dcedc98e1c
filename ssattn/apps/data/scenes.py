"""Synthetic underwater scenes with objects and their ground-truth masks.

Each scene is a textured seabed (sand with ripples, darker sediment patches
and algae) seen obliquely -- far at the top, near at the bottom, the depth
map of ``synthetic.background_depth`` -- with 1-4 foreground objects in the
water column in front of it:

    fish    ellipse body + forked tail, bright colours, stripes, lighter belly
    diver   torso, head, fins; dark suit with a yellow tank
    robot   rounded box with thrusters (an ROV or instrument); often small and
            of a colour close to the seabed's (the paper's hard "robot" class)
    rock    a lumpy blob of the seabed's hue, darker or lighter

Each object gets a depth between 35% and 95% of the nearest seabed depth behind it
(nearer objects occlude farther ones) and the whole scene is degraded with
the physical model of ``synthetic.degrade`` through that depth map, so
distant objects lose contrast and colour as the seabed does. The reference
is the clean scene; the mask marks every object pixel (labels give the
class). Shapes are drawn at 2x and area-averaged (anti-aliased edges); a
pixel is in the mask when objects cover at least half of it.

Everything comes from numpy's Generator seeded with (seed, index, split), so
a scene is the same on every machine and call, offline.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .synthetic import _smooth_noise, background_depth, check_set_args, degrade

CLASSES = ("background", "fish", "diver", "robot", "rock")
# Half-length of an object as a fraction of the scene side, per class.
SIZES = {"fish": (0.08, 0.20), "diver": (0.15, 0.28), "robot": (0.05, 0.11), "rock": (0.08, 0.18)}
# How often each class is drawn.
CLASS_WEIGHTS = {"fish": 0.35, "diver": 0.15, "robot": 0.25, "rock": 0.25}
OBJECTS_PER_SCENE = (1, 4)
# Object depth as a fraction of the seabed depth behind its centre.
DEPTH_FRACTION = (0.35, 0.95)
SUPERSAMPLE = 2
PEBBLES = (5, 25)


def _u(rng, lo, hi, n=None):
    return rng.uniform(lo, hi, n)


def _seabed(rng: np.random.Generator, h: int, w: int) -> Tensor:
    """Clean seabed radiance (3, h, w) in [0, 1]."""
    r = _u(rng, 0.55, 0.82)
    g = r * _u(rng, 0.82, 0.95)
    sand = torch.tensor([r, g, g * _u(rng, 0.62, 0.82)]).view(3, 1, 1)  # beige to grey-brown, never pink
    coarse = _smooth_noise(rng, h, w, cells=3)
    fine = _smooth_noise(rng, h, w, cells=12)
    ys = torch.linspace(0, 1, h).view(h, 1)
    xs = torch.linspace(0, 1, w).view(1, w)
    freq, tilt = _u(rng, 14, 30), _u(rng, -0.4, 0.4)
    ripples = torch.sin(2 * math.pi * freq * (ys + tilt * xs + 0.03 * coarse))
    shade = 1 + _u(rng, 0.08, 0.2) * coarse + _u(rng, 0.04, 0.1) * fine + _u(rng, 0.03, 0.08) * ripples
    img = sand * shade
    # Darker sediment / algae patches: the seabed is not one colour either.
    patch = (_smooth_noise(rng, h, w, cells=5) > _u(rng, 0.3, 0.7)).float()
    patch = F.avg_pool2d(patch[None, None], 5, stride=1, padding=2, count_include_pad=False)[0]
    algae = torch.tensor([_u(rng, 0.25, 0.45), _u(rng, 0.35, 0.55), _u(rng, 0.15, 0.30)]).view(3, 1, 1)
    img = img * (1 - 0.6 * patch) + 0.6 * patch * algae * shade
    # Pebbles and shells: small seabed clutter that is not an object (a distractor for guidance).
    n = int(rng.integers(*PEBBLES))
    cy, cx = torch.from_numpy(rng.uniform(0, 1, (2, n, 1, 1))).float()
    radius = torch.from_numpy(rng.uniform(0.006, 0.02, (n, 1, 1))).float()
    tone = torch.from_numpy(rng.uniform(0.6, 1.4, (n, 1, 1))).float()
    inside = ((ys[None] - cy) ** 2 + (xs[None] - cx) ** 2) <= radius ** 2
    factor = torch.where(inside, tone, torch.ones_like(tone)).prod(0)
    return (img * factor).clamp(0, 1)


def _frame(rng, h, w, cls):
    """Object coordinates (u along the body, v across) in units of its half-length, on the (h, w) grid."""
    s = _u(rng, *SIZES[cls])
    cx, cy = _u(rng, 0.1, 0.9), _u(rng, 0.15, 0.9)
    angle = _u(rng, -0.5, 0.5) if cls in ("fish", "robot") else _u(rng, -math.pi, math.pi)
    if cls == "diver":
        angle = _u(rng, -0.6, 0.6) + (0 if rng.random() < 0.5 else math.pi)
    if cls == "fish" and rng.random() < 0.5:
        angle += math.pi  # swimming left or right
    ys = (torch.arange(h, dtype=torch.float32) + 0.5).view(h, 1) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, w) / w
    dx, dy = (xs - cx) / s, (ys - cy) / s
    c, si = math.cos(angle), math.sin(angle)
    return dx * c + dy * si, -dx * si + dy * c, (cx, cy)


def _colour(rng, lo, hi) -> Tensor:
    return torch.tensor([_u(rng, lo[i], hi[i]) for i in range(3)]).view(3, 1, 1)


def _fish(rng, u, v, seabed_mean):
    body = (u / 1.0) ** 2 + (v / _u(rng, 0.3, 0.45)) ** 2 <= 1
    tail = (u >= 0.85) & (u <= 1.45) & (v.abs() <= 0.9 * (u - 0.8))
    shape = body | tail
    palette = [((0.85, 0.35, 0.0), (1.0, 0.6, 0.15)), ((0.8, 0.8, 0.1), (1.0, 1.0, 0.4)),
               ((0.6, 0.65, 0.7), (0.85, 0.9, 0.95)), ((0.1, 0.3, 0.7), (0.3, 0.5, 0.95))]
    lo, hi = palette[int(rng.integers(len(palette)))]
    base = _colour(rng, lo, hi)
    stripes = (torch.sin(u * _u(rng, 6, 14) + _u(rng, 0, 6.3)) > 0.3).float() * _u(rng, 0.0, 0.45)
    shade = 1 - stripes + 0.15 * (v > 0).float()
    return shape, base * shade


def _diver(rng, u, v, seabed_mean):
    torso = (u.abs() <= 0.6) & (v.abs() <= 0.22) | ((u.abs() - 0.6) ** 2 + v ** 2 <= 0.22 ** 2)
    head = (u + 0.88) ** 2 + v ** 2 <= 0.17 ** 2
    fins = (u >= 0.6) & (u <= 1.3) & ((v - 0.1).abs() <= 0.06) | (u >= 0.6) & (u <= 1.3) & ((v + 0.1).abs() <= 0.06)
    tank = (u >= -0.5) & (u <= 0.25) & (v.abs() <= 0.1)
    suit = _colour(rng, (0.03, 0.03, 0.05), (0.2, 0.2, 0.3))
    yellow = _colour(rng, (0.85, 0.75, 0.0), (1.0, 0.95, 0.2))
    colour = torch.where(tank, yellow, suit)
    return torso | head | fins, colour


def _robot(rng, u, v, seabed_mean):
    a, b, r = 1.0, _u(rng, 0.45, 0.75), 0.2
    qx, qy = (u.abs() - (a - r)).clamp_min(0), (v.abs() - (b - r)).clamp_min(0)
    box = (u.abs() <= a) & (v.abs() <= b) & (qx ** 2 + qy ** 2 <= r ** 2)
    thrusters = ((u.abs() - 0.6) ** 2 + (v - b - 0.1) ** 2 <= 0.15 ** 2)
    if rng.random() < 0.5:  # low contrast: the seabed's own colour, a little lighter or darker
        base = (seabed_mean * _u(rng, 0.75, 1.3)).clamp(0, 1)
    else:
        palette = [((0.85, 0.6, 0.0), (1.0, 0.85, 0.2)), ((0.85, 0.85, 0.85), (1.0, 1.0, 1.0)),
                   ((0.4, 0.4, 0.42), (0.6, 0.6, 0.62))]
        lo, hi = palette[int(rng.integers(len(palette)))]
        base = _colour(rng, lo, hi)
    panel = ((u * 5).floor() % 2 == 0).float() * _u(rng, 0.0, 0.25)
    return box | thrusters, base * (1 - panel)


def _rock(rng, u, v, seabed_mean):
    rho, phi = torch.sqrt(u ** 2 + v ** 2), torch.atan2(v, u)
    radius = torch.ones_like(phi) * 0.85
    for k in range(2, 6):
        radius = radius + _u(rng, 0.02, 0.12) * torch.cos(k * phi + _u(rng, 0, 2 * math.pi))
    shape = rho <= radius
    base = (seabed_mean * _u(rng, 0.45, 1.25) * torch.tensor([1.0, 1.0, _u(rng, 0.8, 1.1)]).view(3, 1, 1)).clamp(0, 1)
    h, w = u.shape
    texture = 1 + 0.15 * _smooth_noise(rng, h, w, cells=16) - 0.2 * (v / 0.85).clamp(-1, 1)  # lit from above
    return shape, base * texture


DRAW = {"fish": _fish, "diver": _diver, "robot": _robot, "rock": _rock}


def render_scene(rng: np.random.Generator, size: int) -> dict:
    """One clean scene: {"clean" (3,S,S), "labels" (S,S) int64, "mask" (1,S,S) float, "depth" (S,S), "objects"}."""
    H = W = size * SUPERSAMPLE
    clean = _seabed(rng, H, W)
    seabed_mean = clean.mean(dim=(1, 2), keepdim=True)
    depth_bg, _, _ = background_depth(rng, H, W)
    names = list(CLASS_WEIGHTS)
    probs = np.array([CLASS_WEIGHTS[n] for n in names])
    n_obj = int(rng.integers(OBJECTS_PER_SCENE[0], OBJECTS_PER_SCENE[1] + 1))
    objects = []
    for _ in range(n_obj):
        cls = names[int(rng.choice(len(names), p=probs / probs.sum()))]
        u, v, _ = _frame(rng, H, W, cls)
        shape, colour = DRAW[cls](rng, u, v, seabed_mean)
        # In front of the seabed everywhere it covers: a fraction of the nearest seabed depth behind it.
        behind = float(depth_bg[shape].min()) if bool(shape.any()) else float(depth_bg.min())
        objects.append((behind * _u(rng, *DEPTH_FRACTION), cls, shape, colour.expand(3, H, W).clamp(0, 1)))
    # Painter's order: far objects first, so nearer ones occlude them.
    objects.sort(key=lambda o: -o[0])
    depth = depth_bg.clone()
    labels = torch.zeros(H, W, dtype=torch.int64)
    for d, cls, shape, colour in objects:
        clean = torch.where(shape, colour, clean)
        depth = torch.where(shape, torch.full_like(depth, d), depth)
        labels = torch.where(shape, torch.full_like(labels, CLASSES.index(cls)), labels)
    fg = (labels > 0).float()
    k = SUPERSAMPLE
    coverage = F.avg_pool2d(fg[None, None], k)[0]
    # Labels at output size: the most common object class of each covered pixel (background below half).
    onehot = F.one_hot(labels, len(CLASSES)).permute(2, 0, 1).float()
    votes = F.avg_pool2d(onehot[None, 1:], k)[0]
    small_labels = torch.where(coverage[0] >= 0.5, votes.argmax(0) + 1, torch.zeros_like(votes[0], dtype=torch.int64))
    return {
        "clean": F.avg_pool2d(clean[None], k)[0].clamp(0, 1),
        "depth": F.avg_pool2d(depth[None, None], k)[0, 0],
        "labels": small_labels,
        "mask": (small_labels > 0).float()[None],
        "objects": [(cls, round(d, 3)) for d, cls, _, _ in objects],
    }


class UnderwaterScenes(torch.utils.data.Dataset):
    """n scenes of size x size: items (degraded (3,S,S), reference (3,S,S), guidance (1,S,S), mask (1,S,S)).

    guidance is the embedded default guide (ssattn.guidance.embedded_guidance)
    of the degraded image with gamma/delta, or the mask itself when
    guidance="oracle". `tensors()` gives the first three stacked (what the
    trainer takes), `masks()` the masks and `labels()` the class maps.
    """

    def __init__(self, size: int = 64, n: int = 64, seed: int = 0, split: str = "train", *,
                 gamma: float = 2.0, delta: float = 0.2, guidance: str = "embedded"):
        check_set_args(size, n, split)
        if guidance not in ("embedded", "oracle"):
            raise ValueError(f"guidance must be 'embedded' or 'oracle', got {guidance!r}")
        self.size, self.n, self.seed, self.split = size, n, int(seed), split
        self.gamma, self.delta, self.guidance = gamma, delta, guidance
        self._items: tuple[Tensor, ...] | None = None
        self.params: list[dict] = []

    def __len__(self) -> int:
        return self.n

    def _rng(self, index: int) -> np.random.Generator:
        # Stream 2/3: never the same draws as SyntheticUnderwater's (seed, index, 0/1).
        return np.random.default_rng([self.seed, index, 2 if self.split == "train" else 3])

    def _materialize(self) -> tuple[Tensor, ...]:
        if self._items is None:
            from ssattn.guidance import embedded_guidance

            refs, degs, masks, labels = [], [], [], []
            for i in range(self.n):
                rng = self._rng(i)
                scene = render_scene(rng, self.size)
                deg, params = degrade(scene["clean"], rng, scene["depth"])
                params["objects"] = scene["objects"]
                self.params.append(params)
                refs.append(scene["clean"])
                degs.append(deg)
                masks.append(scene["mask"])
                labels.append(scene["labels"])
            deg_b, mask_b = torch.stack(degs), torch.stack(masks)
            if self.guidance == "oracle":
                guide = mask_b.clone()
            else:
                with torch.no_grad():
                    guide = embedded_guidance(deg_b, gamma=self.gamma, delta=self.delta, backend="reference")[0]
            self._items = (deg_b, torch.stack(refs), guide.contiguous(), mask_b, torch.stack(labels))
        return self._items

    def __getitem__(self, index: int):
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        return tuple(t[index] for t in self._materialize()[:4])

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(degraded (n,3,S,S), reference (n,3,S,S), guidance (n,1,S,S))."""
        return self._materialize()[:3]

    def masks(self) -> Tensor:
        """Object masks (n, 1, S, S) in {0, 1}."""
        return self._materialize()[3]

    def labels(self) -> Tensor:
        """Class index per pixel (n, S, S), int64, CLASSES order (0 = background)."""
        return self._materialize()[4]
