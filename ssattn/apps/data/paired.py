"""Paired underwater datasets (degraded, reference) with cached guidance maps.

Accepted layouts under `root` (folder names case-insensitive, first match wins):

    input/ + target/        input/ + gt/          raw/ + reference/
    raw-890/ + reference-890/ (UIEB)             trainA/ + trainB/ (EUVP)
    degraded/ + reference/  degraded/ + clean/    lq/ + hq/

or any pair given as layout=("degraded_dir", "reference_dir"). Images are
paired by file stem ("12_img_.png" with "12_img_.jpg"); files without a
partner are left out with one warning.

Guidance comes from the cache written by `ssattn guide DEGRADED_DIR --out
CACHE_DIR` (the degraded images are the guide's input). An image without a
cache entry is computed on the fly with `guide` -- by default the embedded
saliency method, which needs no weights -- and stored in the cache when
there is one. When the cache holds a model's guidance (e.g. BLIP) and no
guide is given, a missing entry raises an error saying how to compute it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ssattn.guidance.base import SaliencyGuide, render_maps
from ssattn.guidance.cache import GuidanceCache
from ssattn.images import file_sha256, list_images, load_image, resize_image

log = logging.getLogger("ssattn.apps.data")

LAYOUTS = (
    ("input", "target"), ("input", "gt"), ("raw", "reference"), ("raw-890", "reference-890"),
    ("trainA", "trainB"), ("degraded", "reference"), ("degraded", "clean"), ("lq", "hq"),
)


def find_layout(root) -> tuple[Path, Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {str(root)!r} does not exist or is not a directory")
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for a, b in LAYOUTS:
        if a.lower() in subdirs and b.lower() in subdirs:
            return subdirs[a.lower()], subdirs[b.lower()]
    names = ", ".join(f"{a}/+{b}/" for a, b in LAYOUTS)
    raise FileNotFoundError(f"{str(root)!r} has no known paired layout (found subfolders: "
                            f"{sorted(subdirs) or 'none'}); expected one of {names}, or pass layout=(deg, ref)")


def pair_files(degraded_dir, reference_dir) -> list[tuple[Path, Path]]:
    deg = {p.stem: p for p in list_images(degraded_dir)}
    ref = {p.stem: p for p in list_images(reference_dir)}
    common = sorted(set(deg) & set(ref))
    lone = len(deg) + len(ref) - 2 * len(common)
    if lone:
        log.warning("%d image(s) without a partner left out (%d degraded, %d reference, %d pairs)",
                    lone, len(deg), len(ref), len(common))
    return [(deg[s], ref[s]) for s in common]


def _size_pair(size):
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
    return (h, w)


class PairedGuidanceDataset(Dataset):
    """Items (degraded (3, H, W), reference (3, H, W), guidance (1, H, W)), floats in [0, 1].

    size: None keeps each degraded image's size (the reference is resized to
    it if it differs); an int or (H, W) resizes both (bicubic, antialiased)
    and renders the guidance at that size exactly from the cached grids.
    gamma, delta, combine: how maps are rendered from the grids (SPEC 1).
    """

    def __init__(self, root, cache_dir=None, size=None, guide=None, *, layout=None, gamma: float = 2.0,
                 delta: float = 0.2, combine: str = "max"):
        if layout is not None:
            deg_dir, ref_dir = (Path(root) / layout[0], Path(root) / layout[1])
            for d in (deg_dir, ref_dir):
                if not d.is_dir():
                    raise FileNotFoundError(f"layout folder {str(d)!r} does not exist")
        else:
            deg_dir, ref_dir = find_layout(root)
        self.pairs = pair_files(deg_dir, ref_dir)
        if not self.pairs:
            raise FileNotFoundError(f"no image pairs (same file stem) in {str(deg_dir)!r} and {str(ref_dir)!r}")
        self.degraded_dir, self.reference_dir = deg_dir, ref_dir
        self.size = _size_pair(size)
        self.gamma, self.delta, self.combine = float(gamma), float(delta), combine
        render_maps(torch.zeros(1, 2, 2), [(2, 2)], gamma=gamma, delta=delta, combine=combine)  # validates early
        self.cache = None
        if cache_dir is not None:
            if guide is not None:
                self.cache = GuidanceCache(cache_dir, guide.settings)
            else:
                self.cache = GuidanceCache.open_existing(cache_dir)
                if self.cache is None or self.cache.settings.get("method") == "saliency":
                    default = SaliencyGuide(**({"grid": self.cache.settings.get("grid")} if self.cache else {}))
                    if self.cache is None or self.cache.settings == default.settings:
                        guide = default
                        self.cache = self.cache or GuidanceCache(cache_dir, guide.settings)
        elif guide is None:
            guide = SaliencyGuide()
        self.guide = guide
        self._sha: dict = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def _hash(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        sha = self._sha.get(key)
        if sha is None:
            sha = self._sha[key] = file_sha256(path)
        return sha

    def grids(self, index: int, image: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised grids (P, gh, gw) of the degraded image of pair `index` (cache, else computed)."""
        path = self.pairs[index][0]
        if self.cache is not None:
            sha = self._hash(path)
            entry = self.cache.get(sha)
            if entry is not None:
                return entry.grids
        if self.guide is None:
            raise RuntimeError(
                f"no cached guidance for {str(path)!r} in {str(self.cache.dir)!r} "
                f"(method {self.cache.settings.get('method')!r}); compute it first with "
                f"`ssattn guide {self.degraded_dir} --out {self.cache.root} ...` using the same settings, "
                "or pass guide= to compute missing maps on the fly")
        image = load_image(path) if image is None else image
        grids, prompts = self.guide.grids([image])
        if self.cache is not None:
            self.cache.put(sha, grids[0], prompts[0], tuple(image.shape[-2:]))
        return grids[0]

    def __getitem__(self, index: int):
        deg_path, ref_path = self.pairs[index]
        degraded = load_image(deg_path)
        reference = load_image(ref_path)
        grids = self.grids(index, degraded)
        size = self.size or tuple(degraded.shape[-2:])
        degraded = resize_image(degraded, size)
        reference = resize_image(reference, size)
        (guidance,) = render_maps(grids, [size], gamma=self.gamma, delta=self.delta, combine=self.combine)
        return degraded, reference, guidance.float()
