"""Run a guide over a folder of images once and fill the cache (what `ssattn guide` does).

DataLoader workers hash each file, skip it when the cache already holds a
valid entry (so an interrupted run resumes where it stopped), and otherwise
decode and preprocess it on the CPU; the main process runs the models on
batches (on the GPU when there is one) and writes entries atomically. Under
torchrun each rank takes every world_size-th file of the sorted list.
Unreadable files are reported and skipped; they never stop the run.
Overlays of images larger than KEEP_MAX_SIDE (2048 px) on the long side
are written at that size. Each image's overlay is named after its whole file
name (overlay_path), so a.png, a.jpg and a.bmp get three; an overlay that
cannot be written is reported and skipped like an unreadable file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._progress import progress_bar
from ..images import ImageLoadError, file_sha256, list_images, load_image, resize_image
from .cache import Entry, GuidanceCache

log = logging.getLogger("ssattn.guidance")


@dataclass
class Stats:
    computed: int = 0
    cached: int = 0
    failed: list = field(default_factory=list)  # (path, reason)
    overlay_failed: list = field(default_factory=list)  # (path, reason): guidance cached, no overlay
    seconds: dict = field(default_factory=lambda: {"model": 0.0, "write": 0.0, "overlay": 0.0, "total": 0.0})

    @property
    def total(self) -> int:
        return self.computed + self.cached + len(self.failed)


# Images kept for the captioner or an overlay are shrunk to this long side: a batch of 48-MP
# originals would hold gigabytes, and LLaVA looks at 336 px anyway.
KEEP_MAX_SIDE = 2048


def _fit(image: torch.Tensor, max_side: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    return resize_image(image, (max(1, round(h * scale)), max(1, round(w * scale))))


class _Items(torch.utils.data.Dataset):
    # Holds only what workers need (not the guide: its models must not be copied into every worker).
    def __init__(self, files, cache: GuidanceCache, input_size, keep_original: bool):
        self.files, self.cache, self.input_size, self.keep_original = files, cache, tuple(input_size), keep_original

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        item = {"path": str(path)}
        try:
            item["sha"] = sha = file_sha256(path)
            entry = self.cache.get(sha)
            if entry is not None and not self.keep_original:
                item["entry"] = entry
                return item
            image = load_image(path)
        except (ImageLoadError, OSError) as exc:
            item["error"] = str(exc)
            return item
        item["entry"] = entry
        item["size"] = tuple(image.shape[-2:])
        if entry is None:
            item["pixels"] = resize_image(image, self.input_size)
        if self.keep_original:
            item["image"] = _fit(image, KEEP_MAX_SIDE)
        return item


def _write_all(cache: GuidanceCache, jobs) -> None:
    for sha, grids, prompts, size in jobs:
        cache.put(sha, grids, prompts, size)


def _collate(items):
    # Stacked in the worker, so the main process only copies one (pinned) batch to the device.
    px = [it.pop("pixels") for it in items if "pixels" in it]
    return {"items": items, "pixels": torch.stack(px) if px else None}


def shard(files: list, rank: int, world_size: int) -> list:
    """This rank's files: every world_size-th of the sorted list, starting at rank."""
    return files[rank::world_size]


# Longest file name most file systems take, in bytes.
NAME_MAX = 255


def overlay_path(overlay_dir, rel: Path) -> Path:
    """Where the overlay of the image at rel (relative to IMAGES_DIR) goes: its full name + ".png".

    The whole name (extension included) keeps a.png, a.jpg and a.bmp apart. A name that would
    exceed NAME_MAX bytes is shortened and given a hash of the full relative path, so it stays unique.
    """
    name = rel.name + ".png"
    if len(name.encode()) > NAME_MAX:
        tag = "~" + hashlib.sha256(str(rel).encode()).hexdigest()[:16] + ".png"
        keep = rel.name.encode()[:NAME_MAX - len(tag.encode())].decode(errors="ignore")
        name = keep + tag
    return Path(overlay_dir) / rel.parent / name


def write_overlay(path: Path, image: torch.Tensor, guidance: torch.Tensor, alpha: float = 0.6) -> None:
    """PNG of the map blended over the image: red where it is weak, yellow at its peak (scaled to its max for display)."""
    import numpy as np
    from PIL import Image

    m = guidance.float().clamp(0, 1)[0]
    m = m / m.max() if m.max() > 0 else m
    heat = torch.stack([torch.ones_like(m), m, torch.zeros_like(m)])
    out = (1 - alpha * m) * image.float() + alpha * m * heat
    arr = (out.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short temporary name: the final name may already be NAME_MAX bytes long.
    tmp = path.with_name(f".overlay-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.png")
    try:
        Image.fromarray(arr).save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def precompute(images_dir, cache_dir, guide, *, batch_size: int = 16, workers: int = 0, recursive: bool = False,
               overlay_dir=None, gamma: float = 2.0, delta: float = 0.2, combine: str = "max",
               rank: int = 0, world_size: int = 1, progress: bool = True, limit: int | None = None) -> Stats:
    """Fill cache_dir with the guide's grids for every image under images_dir (this rank's share)."""
    t_start = time.perf_counter()
    root = Path(images_dir)
    files = list_images(root, recursive=recursive)
    if not files:
        raise FileNotFoundError(f"no images in {str(root)!r} (looked for {', '.join(_exts())}"
                                f"{'' if recursive else '; pass --recursive to look in subfolders'})")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be None or an integer >= 0, got {limit!r}")
        files = files[:limit]
    mine = shard(files, rank, world_size)
    cache = GuidanceCache(cache_dir, guide.settings)
    if rank == 0:
        cache.write_settings()
    stats = Stats()
    device = getattr(guide, "device", torch.device("cpu"))
    loader = torch.utils.data.DataLoader(
        _Items(mine, cache, guide.input_size,
               keep_original=overlay_dir is not None or getattr(guide, "needs_original", False)),
        batch_size=batch_size, num_workers=workers, collate_fn=_collate, persistent_workers=False,
        pin_memory=torch.device(device).type == "cuda",  # pinned batches copy to the GPU asynchronously
    )
    # Entries are written by one background thread while the next batch runs on the model.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssattn-cache-writer")
    pending: list = []
    bar = progress_bar(len(mine), disable=not progress or rank != 0, unit="img", desc="guide")
    try:
        for batch in loader:
            items = batch["items"]
            todo = [it for it in items if "error" not in it and it.get("entry") is None]
            for it in items:
                if "error" in it:
                    log.warning("%s; skipped", it["error"])
                    stats.failed.append((it["path"], it["error"]))
                elif it.get("entry") is not None:
                    stats.cached += 1
            if todo:
                t0 = time.perf_counter()
                originals = [it["image"] for it in todo] if "image" in todo[0] else None
                grids, prompts = guide.grids(originals, preprocessed=batch["pixels"])
                stats.seconds["model"] += time.perf_counter() - t0
                jobs = [(it["sha"], g, p, it["size"]) for it, g, p in zip(todo, grids, prompts)]
                for it, (sha, g, p, size) in zip(todo, jobs):
                    it["entry"] = Entry(sha, tuple(size), g, list(p))
                pending.append(writer.submit(_write_all, cache, jobs))
                stats.computed += len(todo)
                while len(pending) > 2:  # bound the backlog; re-raises a failed write here
                    t0 = time.perf_counter()
                    pending.pop(0).result()
                    stats.seconds["write"] += time.perf_counter() - t0
            if overlay_dir is not None:
                t0 = time.perf_counter()
                for it in items:
                    if "error" in it:
                        continue
                    (m,) = it["entry"].render([tuple(it["image"].shape[-2:])], gamma=gamma, delta=delta,
                                              combine=combine)
                    target = overlay_path(overlay_dir, Path(it["path"]).relative_to(root))
                    try:
                        write_overlay(target, it["image"], m)
                    except (OSError, ValueError) as exc:  # e.g. a name the file system refuses
                        log.warning("no overlay for %s: %s", it["path"], exc)
                        stats.overlay_failed.append((it["path"], str(exc)))
                stats.seconds["overlay"] += time.perf_counter() - t0
            bar.update(len(items))
            bar.set_postfix(new=stats.computed, cached=stats.cached, failed=len(stats.failed))
    finally:
        # An interrupted run still finishes the entries already computed (each write is atomic).
        t0 = time.perf_counter()
        writer.shutdown(wait=True)
        stats.seconds["write"] += time.perf_counter() - t0
        bar.close()
    for f in pending:
        f.result()
    stats.seconds["total"] = time.perf_counter() - t_start
    return stats


def _exts():
    from ..images import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS
