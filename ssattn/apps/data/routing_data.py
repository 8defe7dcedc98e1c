"""Randomised degradations over varied content: what the embedded degradation classifier is fitted and tested on.

The classifier must hold up on photographs and on degradation generators it
never saw, so its data is drawn wide on purpose:

- content: crops of the photographs that ship with scikit-image (those that
  load offline): views of the scene (30-100% of the photograph's shorter
  side) or, in training, also crops shrunk 1-4x; flipped, turned,
  colour-jittered or made grey; in training also a softer lens or a
  defocused background (for every class alike) and procedural images (dead
  leaves, 1/f noise fields, possibly stretched into directional textures,
  gratings). Crops with almost no contrast are drawn again;
- each class with parameters drawn from wide ranges (`TRAIN`), several
  pipelines per class (reflection blended linearly, additively or in linear
  light, with or without a ghost; motion kernels as antialiased lines,
  rotated boxes or camera-shake paths; clean images sharp, slightly soft,
  sharpened, lightly JPEG'd); a reflection must be visible (VISIBLE);
- sizes from 48 px to 320 px, square or not.

Held out, for the tests and the benchmark:

- set (a) `heldout_set(..., ranges=TRAIN)`: the photographs `TEST_PHOTOS`,
  never cropped for a fit (leave-photos-out), with the training ranges;
- set (b) `heldout_set(..., ranges=OUTSIDE)`: the same photographs with every
  parameter drawn outside the training ranges (weaker and stronger noise,
  other JPEG qualities, blur, reflection strengths, blurs and ghost offsets,
  shorter and longer motion at angles the fit never saw, clean images
  downscaled further, softer, at other sizes).

Everything is drawn from numpy's Generator seeded with (seed, index), so
item i of a set is the same pixels on every machine.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssattn.routing.classes import PAPER_CLASSES

from .degradations import apply as apply_fixed, splat

# Photographs of skimage.data that load without a download (stereo_motorcycle: its left view). Not "clock":
# scikit-image's docstring says it is a motion-blurred photograph (the camera moved), so it is no clean content.
TEST_PHOTOS = ("chelsea", "coffee", "gravel", "moon")
TRAIN_PHOTOS = ("astronaut", "brick", "camera", "cell", "coins", "grass", "hubble_deep_field",
                "immunohistochemistry", "page", "retina", "rocket", "text", "motorcycle")
# A crop whose luma varies less than this shows nothing a degradation could be seen on: it is drawn again.
MIN_CONTRAST = 0.04
# The reflected layer's luma contrast over the scene's (alpha * std(R) / ((1 - alpha) * std(T))) must reach this.
VISIBLE = 0.3
# The training photographs in four parts: the fit calibrates its confidence on predictions for each part
# made by networks fitted on the other three (leave-photos-out, as the held-out sets are).
FOLDS = (("astronaut", "brick", "page", "hubble_deep_field"), ("camera", "grass", "text", "retina"),
         ("motorcycle", "immunohistochemistry", "cell"), ("rocket", "coins"))
# Share of procedural images among the training content (never among the held-out sets).
TEXTURE_SHARE = 0.3

Interval = tuple[float, float]


@dataclass(frozen=True)
class Ranges:
    """Where each parameter is drawn from: a union of intervals (uniform over their total length)."""

    name: str
    # noise_blur_jpeg
    blur: tuple[Interval, ...]           # Gaussian blur sigma (px)
    noise: tuple[Interval, ...]          # Gaussian noise sigma (of [0, 1])
    quality: tuple[Interval, ...]        # JPEG quality
    # reflection
    alpha: tuple[Interval, ...]          # weight of the reflected layer
    refl_blur: tuple[Interval, ...]      # blur sigma of the reflected layer (px)
    ghost_shift: tuple[Interval, ...]    # offset of the ghost copy (px)
    ghost_weight: tuple[Interval, ...]   # weight of the ghost copy
    # motion_blur
    length: tuple[Interval, ...]         # kernel length (px)
    angle: tuple[Interval, ...]          # direction (degrees, 0-180)
    # none
    soft: tuple[Interval, ...]           # Gaussian softening sigma of a clean image (px); 0 = as cropped
    zoom: tuple[Interval, ...]           # shrink factor of the crop (> 1 sharper; < 1 enlarged, softer)
    field: tuple[Interval, ...]          # the crop's share of the photograph's shorter side (a view of the scene)
    clean_quality: tuple[Interval, ...]  # JPEG quality of a clean image saved as JPEG
    # image sizes (pixels per side)
    side: tuple[Interval, ...]


# Angles of motion the fit never sees: 10-degree bands around 22.5 + 45k degrees (set (b) uses only these).
UNSEEN_ANGLES = tuple((c - 5.0, c + 5.0) for c in (22.5, 67.5, 112.5, 157.5))
SEEN_ANGLES = ((0.0, 17.5), (27.5, 62.5), (72.5, 107.5), (117.5, 152.5), (162.5, 180.0))

TRAIN = Ranges(
    "train",
    blur=((0.6, 2.4),), noise=((0.01, 0.06),), quality=((20, 70),),
    alpha=((0.15, 0.5),), refl_blur=((0.0, 4.0),), ghost_shift=((3.0, 14.0),), ghost_weight=((0.3, 1.0),),
    length=((5.0, 25.0),), angle=SEEN_ANGLES,
    soft=((0.0, 0.6),), zoom=((1.0, 4.0),), field=((0.3, 1.0),), clean_quality=((85, 98),),
    side=((48, 320),),
)
OUTSIDE = Ranges(
    "outside",
    blur=((0.3, 0.6), (2.4, 3.5)), noise=((0.004, 0.01), (0.06, 0.1)), quality=((8, 20), (70, 82)),
    alpha=((0.1, 0.15), (0.5, 0.6)), refl_blur=((4.0, 6.0),), ghost_shift=((1.5, 3.0), (14.0, 22.0)),
    ghost_weight=((0.15, 0.3),),
    length=((4.0, 5.0), (25.0, 35.0)), angle=UNSEEN_ANGLES,
    soft=((0.6, 0.8),), zoom=((4.0, 8.0), (0.7, 0.9)), field=((0.3, 1.0),), clean_quality=((80, 85),),
    side=((32, 48), (320, 640)),
)


def draw(rng: np.random.Generator, intervals: tuple[Interval, ...]) -> float:
    """Uniform over a union of intervals."""
    lengths = np.array([b - a for a, b in intervals], dtype=float)
    i = int(rng.choice(len(intervals), p=lengths / lengths.sum())) if len(intervals) > 1 else 0
    return float(rng.uniform(*intervals[i]))


def side_of(rng: np.random.Generator, intervals) -> int:
    return int(round(draw(rng, intervals)))


# ------------------------------------------------------------------ content
@functools.lru_cache(maxsize=None)
def photo(name: str) -> Tensor:
    """A scikit-image photograph as a float (3, H, W) tensor in [0, 1]."""
    import skimage.data

    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    img = np.asarray(img)
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0


def resize(x: Tensor, h: int, w: int) -> Tensor:
    """(C, H, W) -> (C, h, w): antialiased when shrinking, bicubic when enlarging."""
    if x.shape[-2:] == (h, w):
        return x
    shrink = h < x.shape[-2] and w < x.shape[-1]
    mode = "bilinear" if shrink else "bicubic"
    return F.interpolate(x[None], size=(h, w), mode=mode, align_corners=False, antialias=shrink)[0].clamp(0, 1)


def photo_crop(rng: np.random.Generator, h: int, w: int, photos, zoom, field=None) -> tuple[Tensor, str]:
    """A crop of a random photograph: covering a drawn fraction `field` of its shorter side (a view of the
    scene), or else shrunk by a factor drawn from `zoom`; never enlarged beyond the smallest zoom."""
    name = photos[int(rng.integers(len(photos)))]
    src = photo(name)
    _, ph, pw = src.shape
    z = draw(rng, zoom) if field is None else max(min(a for a, _ in zoom), draw(rng, field) * min(ph, pw) / min(h, w))
    z = min(z, ph / h, pw / w)  # never a crop larger than the photograph
    lowest = min(a for a, _ in zoom)
    if z < lowest:  # the photograph is too small for this size at any drawn zoom: a smaller image
        h, w = max(32, int(h * z / lowest)), max(32, int(w * z / lowest))
        z = min(lowest, ph / h, pw / w)
    ch, cw = max(2, int(round(h * z))), max(2, int(round(w * z)))
    top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    return resize(src[:, top:top + ch, left:left + cw], h, w), name


def _spectral_field(rng: np.random.Generator, h: int, w: int, beta: float, stretch: float, angle: float) -> Tensor:
    """A (h, w) Gaussian random field with power spectrum 1/f^beta, stretched by `stretch` along `angle`."""
    fy = torch.fft.fftfreq(h).view(-1, 1)
    fx = torch.fft.rfftfreq(w).view(1, -1)
    c, s = math.cos(angle), math.sin(angle)
    u, v = fx * c + fy * s, -fx * s + fy * c
    f = (u.square() * stretch ** 2 + v.square()).sqrt().clamp_min(1.0 / max(h, w))
    amp = f.pow(-beta / 2)
    phase = torch.from_numpy(rng.uniform(0, 2 * math.pi, amp.shape)).float()
    field = torch.fft.irfft2(torch.polar(amp, phase), s=(h, w))
    field = field - field.mean()
    return field / (field.std() + 1e-8)


def _palette(rng: np.random.Generator, t: Tensor) -> Tensor:
    """Map a (h, w) field to colour along a random path between 2-3 colours."""
    k = int(rng.integers(2, 4))
    cols = torch.from_numpy(rng.uniform(0, 1, (k, 3))).float()
    t = (t - t.min()) / (t.max() - t.min() + 1e-8) * (k - 1)
    i = t.floor().clamp(0, k - 2).long()
    f = (t - i)[None]
    return cols[i].permute(2, 0, 1) * (1 - f) + cols[i + 1].permute(2, 0, 1) * f


def dead_leaves(rng: np.random.Generator, h: int, w: int) -> Tensor:
    """Occluding discs and boxes of power-law sizes, each flat, shaded or textured, with antialiased edges."""
    img = torch.from_numpy(rng.uniform(0, 1, (3, 1, 1))).float().expand(3, h, w).clone()
    rmin, rmax = max(h, w) / 40, max(h, w) / 2.5
    n = int(rng.integers(30, 90))
    # radii with density ~ r^-3 (scale invariance), drawn by inverting the CDF
    u = rng.uniform(0, 1, n)
    radii = 1 / np.sqrt((1 - u) / rmin ** 2 + u / rmax ** 2)
    tex = _spectral_field(rng, h, w, float(rng.uniform(1.5, 2.5)), 1.0, 0.0)
    for r in sorted(radii, reverse=True):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        y0, y1 = max(0, int(cy - r) - 1), min(h, int(cy + r) + 2)
        x0, x1 = max(0, int(cx - r) - 1), min(w, int(cx + r) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        ys = torch.arange(y0, y1, dtype=torch.float32).view(-1, 1) + 0.5 - cy
        xs = torch.arange(x0, x1, dtype=torch.float32).view(1, -1) + 0.5 - cx
        if rng.random() < 0.6:  # a disc
            dist = (ys.square() + xs.square()).sqrt() - r
        else:  # a turned box
            a = rng.uniform(0, math.pi)
            du = xs * math.cos(a) + ys * math.sin(a)
            dv = -xs * math.sin(a) + ys * math.cos(a)
            dist = torch.maximum(du.abs() - r, dv.abs() - r * rng.uniform(0.3, 1.0))
        cover = (0.5 - dist).clamp(0, 1)  # signed distance -> antialiased coverage
        col = torch.from_numpy(rng.uniform(0, 1, (3, 1, 1))).float()
        kind = rng.random()
        if kind < 0.3:  # shaded: a linear gradient across the leaf
            fill = (col + 0.25 * (xs * rng.normal() + ys * rng.normal()) / (2 * r)).clamp(0, 1)
        elif kind < 0.55:  # textured: the shared 1/f field, modulating the colour (as shading does)
            fill = (col * (1 + rng.uniform(0.1, 0.5) * tex[y0:y1, x0:x1])).clamp(0, 1)
        else:
            fill = col
        patch = img[:, y0:y1, x0:x1]
        img[:, y0:y1, x0:x1] = patch + cover * (fill - patch)
    return img


def noise_texture(rng: np.random.Generator, h: int, w: int) -> Tensor:
    """A coloured 1/f field; often stretched into a directional texture (wood, hair, brushed metal)."""
    stretch = 1.0 if rng.random() < 0.4 else float(np.exp(rng.uniform(0.5, 2.5)))
    field = _spectral_field(rng, h, w, float(rng.uniform(1.4, 2.6)), stretch, float(rng.uniform(0, math.pi)))
    if rng.random() < 0.3:  # a sharper, cellular look
        field = field.sign() * field.abs().pow(float(rng.uniform(0.3, 0.7)))
    return _palette(rng, field)


def gratings(rng: np.random.Generator, h: int, w: int) -> Tensor:
    """Sums of square and sine gratings at random orientations and periods, over a smooth shading."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    t = torch.zeros(h, w)
    for _ in range(int(rng.integers(1, 4))):
        a, period = rng.uniform(0, math.pi), rng.uniform(3, 40)
        wave = torch.sin(2 * math.pi * (xs * math.cos(a) + ys * math.sin(a)) / period + rng.uniform(0, 6.3))
        t = t + (wave.sign() if rng.random() < 0.5 else wave) * rng.uniform(0.3, 1)
    t = t + _spectral_field(rng, h, w, 2.5, 1.0, 0.0) * rng.uniform(0, 1.5)
    img = _palette(rng, t)
    # square waves drawn at 4x and shrunk: edges as a lens would leave them
    return img if rng.random() < 0.5 else resize(resize(img, 4 * h, 4 * w), h, w)


def procedural(rng: np.random.Generator, h: int, w: int) -> Tensor:
    pick = rng.random()
    if pick < 0.5:
        img = dead_leaves(rng, h, w)
    elif pick < 0.8:
        img = noise_texture(rng, h, w)
    else:
        img = gratings(rng, h, w)
    # a little sensor noise, as every photograph has
    return (img + float(rng.uniform(0, 0.003)) * torch.from_numpy(rng.standard_normal(img.shape)).float()).clamp(0, 1)


def jitter(rng: np.random.Generator, x: Tensor) -> Tensor:
    """Flips, 90-degree turns, channel gains, saturation, gamma and contrast; sometimes grey."""
    if rng.random() < 0.5:
        x = x.flip(-1)
    if rng.random() < 0.5:
        x = x.flip(-2)
    if rng.random() < 0.5 and x.shape[-1] == x.shape[-2]:
        x = x.transpose(-1, -2)
    x = x * torch.from_numpy(rng.uniform(0.85, 1.15, (3, 1, 1))).float()
    grey = x.mean(0, keepdim=True)
    sat = 0.0 if rng.random() < 0.15 else float(rng.uniform(0.6, 1.3))
    x = grey + sat * (x - grey)
    m = x.mean()
    x = m + float(rng.uniform(0.9, 1.15)) * (x - m)
    return x.clamp(0, 1).pow(float(np.exp(rng.uniform(-0.25, 0.25)))).contiguous()


_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def content(rng: np.random.Generator, h: int, w: int, photos, ranges: Ranges, textures: float,
            augment: bool = False) -> tuple[Tensor, str]:
    """A clean (3, h, w) image (smaller where a photograph is too small): a jittered photograph crop, or (with
    probability `textures`) a procedural one."""
    turn = rng.random() < 0.5  # a turned crop: the photograph's other orientation
    hh, ww = (w, h) if turn else (h, w)
    for _ in range(20):
        if textures > 0 and rng.random() < textures:
            img, source = procedural(rng, hh, ww), "procedural"
        else:
            scene = ranges.field if (not augment or rng.random() < 0.5) else None
            img, source = photo_crop(rng, hh, ww, photos, ranges.zoom, scene)
        img = jitter(rng, img)
        img = optics(rng, img) if augment else img
        if float((img * _LUMA).sum(0).std()) >= MIN_CONTRAST:
            break
    return (img.transpose(-1, -2).contiguous() if turn else img), source


def optics(rng: np.random.Generator, x: Tensor) -> Tensor:
    """What lenses do to any photograph, whatever its class: a softer lens, a defocused background.
    Drawn for every class alike, so neither says which class an image is. (No veil: a uniform veil
    over a clean image is what a faint reflection looks like, and would teach that one is normal.)"""
    if rng.random() < 0.3:
        x = gaussian(x, float(rng.uniform(0.3, 0.7)))
    if rng.random() < 0.25:  # depth of field: a smooth region of the image out of focus
        h, w = x.shape[-2:]
        field = _spectral_field(rng, h, w, 4.0, 1.0, 0.0)
        mask = ((field - float(rng.uniform(-0.5, 0.5))) * 3).sigmoid()[None]
        x = x + mask * (gaussian(x, float(rng.uniform(1.5, 4.0))) - x)
    return x


# ------------------------------------------------------------------ degradations
def gaussian(x: Tensor, sigma: float, sigma_y: float | None = None, angle: float = 0.0) -> Tensor:
    """Gaussian blur of (3, H, W) (anisotropic when sigma_y differs: sigma along `angle`, sigma_y across)."""
    sy = sigma if sigma_y is None else sigma_y
    if max(sigma, sy) < 0.05:
        return x
    r = max(1, int(math.ceil(3 * max(sigma, sy))))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u, v = xx * c + yy * s, -xx * s + yy * c
    k = torch.exp(-0.5 * (u.square() / max(sigma, 0.05) ** 2 + v.square() / max(sy, 0.05) ** 2))
    return convolve(x, k / k.sum())


def convolve(x: Tensor, k: Tensor, pad: str = "reflect") -> Tensor:
    """(3, H, W) convolved with kernel (K, K), edges padded with `pad` (reflect needs K/2 < the image's sides)."""
    r = k.shape[-1] // 2
    if pad == "reflect" and r >= min(x.shape[-2:]):
        pad = "replicate"
    xp = F.pad(x[None], (r, r, r, r), mode=pad)
    return F.conv2d(xp, k.flip(-1, -2).expand(3, 1, -1, -1), groups=3)[0]


def jpeg(x: Tensor, quality: float, subsampling: int = 2) -> Tensor:
    """JPEG round trip through Pillow (subsampling 0 = 4:4:4, 2 = 4:2:0)."""
    from PIL import Image

    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=int(round(quality)), subsampling=subsampling)
    buf.seek(0)
    with Image.open(buf) as img:
        out = np.array(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(out).permute(2, 0, 1).float() / 255.0


def quantise(x: Tensor) -> Tensor:
    """8-bit quantisation: what every saved image goes through."""
    return (x.clamp(0, 1) * 255).round() / 255


def motion_kernel(rng: np.random.Generator, length: float, angle: float, style: str) -> Tensor:
    """A normalised motion kernel: 'line' (antialiased segment), 'box' (a row of ones, rotated), 'shake' (a path)."""
    radius = int(math.ceil(length / 2)) + 2
    size = 2 * radius + 1
    if style == "box":
        n = max(2, int(round(length)))
        k = torch.zeros(1, 1, size, size)
        k[0, 0, radius, radius - n // 2: radius - n // 2 + n] = 1.0
        c, s = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[c, s, 0.0], [-s, c, 0.0]], dtype=torch.float32)[None]  # rotate anticlockwise (y up)
        grid = F.affine_grid(theta, (1, 1, size, size), align_corners=False)
        k = F.grid_sample(k, grid, mode="bilinear", align_corners=False)[0, 0].clamp_min(0)
        return k / k.sum()
    if style == "shake":
        # a smooth random path whose total length is `length`, heading along `angle` on average
        steps = 64
        turn = np.cumsum(rng.normal(0, float(rng.uniform(0.05, 0.25)), steps))
        heading = angle + turn - turn.mean()
        dx, dy = np.cos(heading), -np.sin(heading)
        xs, ys = np.cumsum(dx), np.cumsum(dy)
        scale = length / steps
        xs, ys = (xs - xs.mean()) * scale, (ys - ys.mean()) * scale
        pts = torch.from_numpy(np.stack([xs, ys])).float()
    else:
        t = torch.linspace(-length / 2, length / 2, max(2, int(length * 8)))
        pts = torch.stack([t * math.cos(angle), -t * math.sin(angle)])
    x, y = pts[0] + radius, pts[1] + radius
    return splat(x.clamp(0, size - 1.001), y.clamp(0, size - 1.001), size)


def noise_blur_jpeg(rng: np.random.Generator, x: Tensor, r: Ranges) -> tuple[Tensor, dict]:
    p = {"blur": draw(rng, r.blur), "noise": draw(rng, r.noise), "quality": draw(rng, r.quality)}
    if r.name == "outside" and p["noise"] < 0.01 and p["quality"] > 70 and p["blur"] < 0.6:
        # all three weaker than ever trained on is hardly a degradation any more: make one of them stronger
        which = ("noise", "quality", "blur")[int(rng.integers(3))]
        p[which] = {"noise": draw(rng, ((0.06, 0.1),)), "quality": draw(rng, ((8, 20),)),
                    "blur": draw(rng, ((2.4, 3.5),))}[which]
    if rng.random() < 0.25:  # mildly anisotropic, as super-resolution pipelines draw it
        x = gaussian(x, p["blur"], p["blur"] * float(rng.uniform(0.6, 1.0)), float(rng.uniform(0, math.pi)))
    else:
        x = gaussian(x, p["blur"])
    if rng.random() < 0.3:  # down and up again: the low-resolution part of the family
        h, w = x.shape[-2:]
        f = float(rng.uniform(1.2, 2.0))
        x = resize(resize(x, max(8, int(h / f)), max(8, int(w / f))), h, w)
    shape = (1, *x.shape[1:]) if rng.random() < 0.3 else x.shape  # grey (luma) or colour noise
    n = torch.from_numpy(rng.standard_normal(shape)).float()
    if rng.random() < 0.3:  # signal-dependent (shot) noise of the same mean strength
        n = n * (x / 0.5).clamp_min(0.05).sqrt()
    x = (x + p["noise"] * n).clamp(0, 1)
    return jpeg(x, p["quality"], subsampling=0 if rng.random() < 0.3 else 2), p


def _luma_std(x: Tensor) -> float:
    return float((x * _LUMA).sum(0).std())


def reflection(rng: np.random.Generator, x: Tensor, second, r: Ranges) -> tuple[Tensor, dict]:
    """x seen through glass that reflects another image: `second()` draws it (again, until it can be seen)."""
    p = {"alpha": draw(rng, r.alpha), "blur": draw(rng, r.refl_blur), "model": ("linear", "additive", "gamma")[
        int(rng.choice(3, p=[0.5, 0.25, 0.25]))]}
    ghost = rng.random() < 0.6 or r.name == "outside"  # thick glass: a shifted, fainter second copy
    if ghost:
        d, angle = draw(rng, r.ghost_shift), float(rng.uniform(0, 2 * math.pi))
        shift = (int(round(d * math.sin(angle))), int(round(d * math.cos(angle))))
        p.update(ghost=draw(rng, r.ghost_weight), shift=shift if shift != (0, 0) else (0, 2))
    scene = _luma_std(x)
    for _ in range(10):
        refl = gaussian(second(), p["blur"])
        if ghost:
            refl = (refl + p["ghost"] * refl.roll(p["shift"], dims=(-2, -1))) / (1 + p["ghost"])
        # a reflection nobody could see is no example of one: the reflected image must show against the scene
        p["visibility"] = p["alpha"] * _luma_std(refl) / ((1 - p["alpha"]) * scene + 1e-6)
        if p["visibility"] >= VISIBLE:
            break
    else:  # no reflected image shows at this weight: the least weight in the ranges at which the last one does
        k = VISIBLE * scene / (_luma_std(refl) + 1e-6)
        need = k / (1 + k)
        p["alpha"] = min((max(need, lo) for lo, hi in r.alpha if hi >= need), default=max(hi for _, hi in r.alpha))
        p["visibility"] = p["alpha"] * _luma_std(refl) / ((1 - p["alpha"]) * scene + 1e-6)
    a = p["alpha"]
    if rng.random() < 0.3:  # the glass reflects unevenly: the weight varies across the image
        h, w = x.shape[-2:]
        ramp = torch.linspace(0, 1, w).view(1, 1, -1) if rng.random() < 0.5 else torch.linspace(0, 1, h).view(1, -1, 1)
        a = a * (0.6 + 0.8 * ramp)
    if p["model"] == "linear":
        out = (1 - a) * x + a * refl
    elif p["model"] == "additive":  # transmission plus reflection, clipped (as reflection-removal data is made)
        out = x * (1 - a * 0.5) + a * refl
    else:  # mixed in linear light
        out = ((1 - a) * x.pow(2.2) + a * refl.pow(2.2)).pow(1 / 2.2)
    return out.clamp(0, 1), p


def motion_blur(rng: np.random.Generator, x: Tensor, r: Ranges) -> tuple[Tensor, dict]:
    style = ("line", "box", "shake")[int(rng.choice(3, p=[0.45, 0.35, 0.2]))]
    p = {"length": draw(rng, r.length), "angle": draw(rng, r.angle), "style": style}
    k = motion_kernel(rng, p["length"], math.radians(p["angle"]), style)
    pad = "reflect" if rng.random() < 0.7 else "replicate"
    return convolve(x, k, pad).clamp(0, 1), p


def clean(rng: np.random.Generator, x: Tensor, r: Ranges) -> tuple[Tensor, dict]:
    p = {}
    pick = rng.random()
    if pick < 0.35:
        p["soft"] = draw(rng, r.soft)
        x = gaussian(x, p["soft"])
    elif pick < 0.5:  # in-camera sharpening (unsharp mask)
        p["sharpen"] = float(rng.uniform(0.2, 0.8))
        x = (x + p["sharpen"] * (x - gaussian(x, float(rng.uniform(0.8, 1.5))))).clamp(0, 1)
    if rng.random() < 0.3:
        p["quality"] = draw(rng, r.clean_quality)
        x = jpeg(x, p["quality"])
    return x, p


def degrade(rng: np.random.Generator, x: Tensor, kind: str, r: Ranges, second=None) -> tuple[Tensor, dict]:
    """One randomised degradation of a clean (3, H, W) image; `second()` draws what the glass reflects."""
    if kind == "noise_blur_jpeg":
        out, p = noise_blur_jpeg(rng, x, r)
    elif kind == "reflection":
        out, p = reflection(rng, x, second if second is not None else (lambda: x.flip(-1)), r)
    elif kind == "motion_blur":
        out, p = motion_blur(rng, x, r)
    elif kind == "none":
        out, p = clean(rng, x, r)
    else:  # underwater, low_light: the fixed generator at a random severity
        out, p = apply_fixed(x, kind, int(rng.integers(1, 6)), seed=int(rng.integers(2**31)))
    return quantise(out), p


# ------------------------------------------------------------------ sets
def item(seed: int, i: int, kind: str, photos, ranges: Ranges, textures: float, augment: bool = False
         ) -> tuple[Tensor, dict]:
    """Item i of a set: a clean image of a drawn size, degraded by `kind`."""
    rng = np.random.default_rng([int(seed), int(i), 27])
    h = side_of(rng, ranges.side)
    w = h if rng.random() < 0.4 else side_of(rng, ranges.side)
    x, source = content(rng, h, w, photos, ranges, textures, augment)
    h, w = x.shape[-2:]

    def second() -> Tensor:
        if rng.random() < 0.25:  # the scene itself, seen in the glass
            return jitter(rng, x.flip(-1).roll(h // 3, dims=-2))
        return resize(content(rng, h, w, photos, TRAIN, textures, augment)[0], h, w)

    out, p = degrade(rng, x, kind, ranges, second)
    return out, {"content": source, **p}


def make_set(n: int, seed: int, photos, ranges: Ranges, kinds=PAPER_CLASSES, textures: float = 0.0,
             augment: bool = False):
    """n images cycling through `kinds`: (list of (3, H, W) tensors of various sizes, labels (n,), parameters)."""
    images, labels, params = [], [], []
    for i in range(n):
        k = i % len(kinds)
        x, p = item(seed, i, kinds[k], photos, ranges, textures, augment)
        images.append(x)
        labels.append(k)
        params.append(p)
    return images, torch.tensor(labels), params


def training_set(n: int, seed: int, kinds=PAPER_CLASSES):
    """n training images cycling through `kinds`, each group of len(kinds) consecutive items from one part of
    FOLDS in turn: (images, labels (n,), parameters, fold of each image (n,))."""
    images, labels, params, folds = [], [], [], []
    for i in range(n):
        k, fold = i % len(kinds), (i // len(kinds)) % len(FOLDS)
        x, p = item(seed, i, kinds[k], FOLDS[fold], TRAIN, TEXTURE_SHARE, augment=True)
        images.append(x)
        labels.append(k)
        params.append(p)
        folds.append(fold)
    return images, torch.tensor(labels), params, torch.tensor(folds)


def heldout_set(n: int, seed: int, ranges: Ranges = TRAIN, kinds=PAPER_CLASSES, photos=TEST_PHOTOS):
    """Set (a) (ranges=TRAIN) or (b) (ranges=OUTSIDE) on photographs no fit saw."""
    return make_set(n, seed, photos, ranges, kinds, 0.0)
