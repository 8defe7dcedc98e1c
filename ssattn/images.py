"""Image loading shared by the guidance precompute and the paired dataset.

Every image becomes an RGB float tensor (3, H, W) in [0, 1], whatever its
mode on disk: grayscale, palette, RGBA (alpha dropped, not composited, so
the colours the camera saw are kept), CMYK, and 16-bit or float images
(scaled by their own range, not clipped to 8 bits). PIL reads 16-bit colour
PNGs and TIFFs reduced to 8 bits, so those are decoded here (PNG: zlib and
the PNG filters in numpy; TIFF: tifffile, which scikit-image brings).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Decompression-bomb guard of PIL: refuse images above this many pixels (about 16k x 16k).
MAX_PIXELS = 268_000_000


class ImageLoadError(OSError):
    """An image file that cannot be read; the message names the file."""


def list_images(folder, recursive: bool = False) -> list[Path]:
    """Image files under `folder`, sorted by relative path (stable across machines and ranks)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist or is not a directory")
    pattern = "**/*" if recursive else "*"
    files = [p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Hash of the file's bytes: the cache key of an image does not depend on its name or place."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- 16-bit colour
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunks(data: bytes):
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        yield kind, data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IEND":
            return


def _unfilter(filtered: np.ndarray, types: np.ndarray, bpp: int) -> np.ndarray:
    """Undo the PNG row filters: (H, W, bpp) filtered bytes and each row's filter type -> the image's bytes.

    A byte depends on its left (a), upper (b) and upper-left (c) neighbours, so the pixels are
    reconstructed one anti-diagonal (row + column = const) at a time, each diagonal in one numpy step:
    H + W - 1 steps instead of H x W.
    """
    h, w, _ = filtered.shape
    out = np.zeros((h + 1, w + 1, bpp), dtype=np.int32)  # a zero row above and a zero column on the left
    f = filtered.astype(np.int32)
    for d in range(h + w - 1):
        r = np.arange(max(0, d - w + 1), min(h, d + 1))
        c = d - r
        a, b, ul = out[r + 1, c], out[r, c + 1], out[r, c]
        kind = types[r][:, None]
        p = a + b - ul
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - ul)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, ul))
        pred = np.select([kind == 1, kind == 2, kind == 3, kind == 4], [a, b, (a + b) >> 1, paeth], 0)
        out[r + 1, c + 1] = (f[r, c] + pred) & 0xFF
    return out[1:, 1:].astype(np.uint8)


def read_png16(path) -> np.ndarray | None:
    """(H, W, 3 or 4) uint16 of a non-interlaced 16-bit RGB(A) PNG; None for any other file."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(PNG_SIGNATURE):
        return None
    chunks = list(_png_chunks(data))
    if not chunks or chunks[0][0] != b"IHDR":
        return None
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if depth != 16 or colour not in (2, 6) or interlace:
        return None
    channels = 3 if colour == 2 else 4
    rows = np.frombuffer(zlib.decompress(b"".join(d for k, d in chunks if k == b"IDAT")), dtype=np.uint8)
    rows = rows[: h * (1 + w * 2 * channels)].reshape(h, 1 + w * 2 * channels)
    if rows[:, 0].max(initial=0) > 4:
        raise ValueError(f"PNG filter type {int(rows[:, 0].max())} is not one of 0-4")
    raw = _unfilter(rows[:, 1:].reshape(h, w, 2 * channels), rows[:, 0].astype(np.int32), 2 * channels)
    return raw.view(">u2").reshape(h, w, channels).astype(np.uint16)


# PIL's orientation transposes (ImageOps.exif_transpose), applied to the 16-bit channels one by one.
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                7: "TRANSVERSE", 8: "ROTATE_90"}


def _oriented(a: np.ndarray, orientation) -> np.ndarray:
    from PIL import Image

    method = _ORIENTATION.get(orientation)
    if method is None:
        return a
    turn = getattr(Image.Transpose, method)
    return np.stack([np.asarray(Image.fromarray(a[:, :, i]).transpose(turn)) for i in range(a.shape[2])], axis=2)


def _deep_colour(path, img) -> np.ndarray | None:
    """(H, W, C) uint16 of a 16-bit colour PNG or TIFF (which PIL reduces to 8 bits) as a viewer shows it, or None."""
    if img.mode not in ("RGB", "RGBA"):
        return None
    if img.format == "PNG":
        a = read_png16(path)
    elif img.format == "TIFF" and max(img.tag_v2.get(258, (8,)) or (8,)) == 16:
        try:
            import tifffile
        except ImportError:
            warnings.warn(f"{path}: a 16-bit colour TIFF is read at 8 bits (install tifffile to read all 16)",
                          stacklevel=3)
            return None
        a = np.asarray(tifffile.imread(path, key=0))
        a = a if a.dtype == np.uint16 and a.ndim == 3 and a.shape[2] in (3, 4) else None
    else:
        return None
    return None if a is None else _oriented(a, img.getexif().get(0x0112))


def _to_array(img) -> np.ndarray:
    """PIL image -> (H, W, 3): uint8 for 8-bit images (scaled later, in torch), else float32 in [0, 1]."""
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / top, 0.0, 1.0)
    elif mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
        if a.max(initial=0) > 1.0:  # float TIFFs in 0..255 or 0..65535
            a = a / (255.0 if a.max() <= 255.0 else 65535.0)
        a = np.clip(a, 0.0, 1.0)
    elif mode == "1":
        a = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    else:
        if mode not in ("RGB", "L"):
            # RGBA/LA/P/CMYK/YCbCr...: PIL's conversion drops alpha and expands palettes.
            img = img.convert("RGB")
        a = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy shares it
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    a = a[:, :, :3]
    return a if a.dtype == np.uint8 else a.astype(np.float32)


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _why_unreadable(exc: Exception) -> str:
    """The reason in words, without the path again (PIL's and the OS's messages repeat it)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image file"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # e.g. "No such file or directory"
    return str(exc)


def load_image(path) -> torch.Tensor:
    """Read an image file as an RGB float tensor (3, H, W) in [0, 1].

    Raises ImageLoadError naming the file when it is missing, truncated,
    not an image, or larger than MAX_PIXELS.
    """
    from PIL import Image, ImageOps

    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageLoadError(
                    f"image {path!r} has {img.width}x{img.height} pixels, more than the limit of {MAX_PIXELS}"
                )
            deep = _deep_colour(path, img)
            if deep is not None:
                arr = (deep[:, :, :3].astype(np.float64) / 65535.0).astype(np.float32)
            else:
                img = ImageOps.exif_transpose(img)  # camera orientation, as a viewer shows it
                img.load()
                arr = _to_array(img)
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError, zlib.error, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read image {path!r} ({_why_unreadable(exc)})") from exc
    return _to_tensor(arr)


def to_image_tensor(image) -> torch.Tensor:
    """PIL image or tensor (3, H, W) / (H, W) -> float (3, H, W) in [0, 1] (tensors are not rescaled)."""
    if isinstance(image, torch.Tensor):
        x = image
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[0] not in (1, 3, 4):
            raise ValueError(f"image tensors must have shape (3, H, W), (1, H, W) or (H, W), got {tuple(image.shape)}")
        if not x.is_floating_point():
            x = x.float() / (65535.0 if x.dtype in (torch.int32, torch.int64) and x.max() > 255 else 255.0)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x[:3].float()
    if hasattr(image, "mode") and hasattr(image, "size"):  # PIL image
        return _to_tensor(_to_array(image))
    raise TypeError(f"image must be a PIL image or a tensor, got {type(image).__name__}")


def resize_image(x: torch.Tensor, size) -> torch.Tensor:
    """Resize (3, H, W) or (B, 3, H, W) to size (h, w): bicubic, antialiased when shrinking, clamped to [0, 1]."""
    import torch.nn.functional as F

    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    h, w = int(size[0]), int(size[1])
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    return x.squeeze(0) if squeeze else x


def gaussian_blur(x, sigma: float, pad_mode: str = "reflect"):
    """Separable Gaussian blur of a (B, C, H, W) tensor (radius 3 sigma), edges padded with `pad_mode`."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = (g / g.sum()).view(1, 1, 1, -1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=pad_mode), g)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode=pad_mode), g.transpose(-1, -2))
