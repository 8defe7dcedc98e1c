"""A second degradation generator, written plainly with Pillow and scipy.ndimage as a user might: set (c).

It shares no code with ssattn.apps.data.routing_data (the generator the embedded classifier was fitted
on): other blur (Pillow's GaussianBlur), other motion kernels (a row of ones turned by
scipy.ndimage.rotate), a reflection without any visibility rule (a blurred other photograph blended in),
and clean images that are crops of 40-100% of a photograph resized with Lanczos. Content: the held-out
photographs only (TEST_PHOTOS), so no crop was seen in training.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageFilter

from ssattn.apps.data.routing_data import TEST_PHOTOS


def _photo(name: str) -> Image.Image:
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return Image.fromarray(a[..., :3].astype(np.uint8))


def plain_set(n: int, seed: int, photos=TEST_PHOTOS):
    """n images cycling noise_blur_jpeg, reflection, motion_blur, none: (list of (3, H, W) tensors, labels)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        kind = i % 4
        im = _photo(photos[rng.integers(len(photos))])
        w, h = im.size
        f = rng.uniform(0.4, 1.0)
        cw, ch = int(w * f), int(h * f)
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        im = im.crop((x0, y0, x0 + cw, y0 + ch))
        s = int(rng.integers(128, 321)) / max(cw, ch)
        im = im.resize((max(32, int(cw * s)), max(32, int(ch * s))), Image.LANCZOS)
        a = np.asarray(im).astype(np.float32) / 255
        if kind == 0:
            im = im.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.8, 2.5)))
            a = np.asarray(im).astype(np.float32) / 255 + rng.normal(0, rng.uniform(5, 20) / 255, a.shape)
            buf = io.BytesIO()
            Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).save(buf, "JPEG",
                                                                             quality=int(rng.integers(10, 50)))
            buf.seek(0)
            a = np.asarray(Image.open(buf).convert("RGB")).astype(np.float32) / 255
        elif kind == 1:
            other = _photo(photos[rng.integers(len(photos))]).resize(im.size, Image.BILINEAR)
            o = np.asarray(other.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.5, 4)))).astype(np.float32) / 255
            alpha = rng.uniform(0.2, 0.45)
            a = (1 - alpha) * a + alpha * o
        elif kind == 2:
            k = int(rng.integers(4, 11)) * 2 + 1
            kernel = np.zeros((k, k), np.float32)
            kernel[k // 2, :] = 1
            kernel = ndimage.rotate(kernel, rng.uniform(0, 180), reshape=False, order=1)
            kernel /= kernel.sum()
            a = np.stack([ndimage.convolve(a[..., c], kernel, mode="reflect") for c in range(3)], -1)
        a = np.round(np.clip(a, 0, 1) * 255) / 255
        images.append(torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1).contiguous())
        labels.append(kind)
    return images, torch.tensor(labels)
