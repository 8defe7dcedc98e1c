"""On-disk cache of guidance grids, keyed by image content and guide settings.

Layout::

    CACHE_DIR/<settings id>/settings.json        the guide settings (JSON)
    CACHE_DIR/<settings id>/<ab>/<sha256>.pt      one entry per image content hash

The settings id hashes every setting that changes the stored grids (method,
model ids and revisions, prompts / captioner question, input size, joint
prompts, dtype) and the entry format. gamma, delta, the map size and the
max/mean combination are applied when a map is rendered from the grids
(exactly, through ssattn.guidance_pyramid), so they are not part of the key:
a sweep over them reuses the cache.

An entry is a torch.save'd dict with its key and a checksum of its content;
a truncated or corrupt file, or one written under other settings, is
reported as missing (and logged) so that it is recomputed. Writes go to a
temporary file in the same folder and are renamed into place (os.replace),
so a reader or an interrupted run never sees half an entry; ranks writing
the same entry at once just replace each other's identical file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("ssattn.guidance")

FORMAT = 1


def _canonical(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def settings_id(settings: dict) -> str:
    """Short stable hash of the settings (and the entry format)."""
    return hashlib.sha256(f"ssattn-guidance-v{FORMAT}:{_canonical(settings)}".encode()).hexdigest()[:16]


def _checksum(grids: torch.Tensor, prompts, image_size) -> str:
    h = hashlib.sha256()
    g = grids.detach().to("cpu", torch.float32).contiguous()
    h.update(str(tuple(g.shape)).encode())
    h.update(g.numpy().tobytes())
    h.update(json.dumps([prompts, list(image_size)]).encode())
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)  # no fsync: a crash leaves an old or no entry, and the checksum catches the rest
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_settings(folder: Path) -> dict:
    """The settings stored in folder/settings.json (ValueError naming the file when it is unreadable)."""
    path = folder / "settings.json"
    try:
        settings = json.loads(path.read_text())["settings"]
        if not isinstance(settings, dict):
            raise TypeError("'settings' is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"guidance cache settings file {str(path)!r} is unreadable ({type(exc).__name__}: {exc}); "
                         "delete that settings folder to recompute its guidance, or restore the file") from None
    return settings


@dataclass
class Entry:
    """Cached guidance of one image: normalised grids (P, gh, gw) in [0, 1] and the prompts used."""

    image_sha256: str
    image_size: tuple[int, int]
    grids: torch.Tensor
    prompts: list[str]

    def render(self, sizes=None, *, gamma: float = 2.0, delta: float = 0.2, combine: str = "max",
               backend: str = "auto") -> list[torch.Tensor]:
        """Pyramid of (1, H_l, W_l) maps; sizes defaults to [the image's size]."""
        from .base import render_maps

        return render_maps(self.grids, sizes or [self.image_size], gamma=gamma, delta=delta, combine=combine,
                           backend=backend)


class GuidanceCache:
    """Entries of one guide's settings under cache_dir."""

    def __init__(self, cache_dir, settings: dict):
        self.root = Path(cache_dir)
        self.settings = dict(settings)
        self.id = settings_id(self.settings)
        self.dir = self.root / self.id
        self.hits = self.misses = self.rejected = 0

    @classmethod
    def open_existing(cls, cache_dir, which: str | None = None) -> "GuidanceCache | None":
        """The cache of the one settings folder in cache_dir (or the one named `which`); None if there is none."""
        root = Path(cache_dir)
        found = sorted(p.parent for p in root.glob("*/settings.json")) if root.is_dir() else []
        if which is not None:
            found = [p for p in found if p.name == which]
            if not found:
                raise FileNotFoundError(f"no guidance settings {which!r} in {str(root)!r}")
        if not found:
            return None
        if len(found) > 1:
            listing = "; ".join(f"{p.name}: {_read_settings(p).get('method')}" for p in found)
            raise ValueError(f"{str(root)!r} holds guidance for several settings ({listing}); "
                             "pass the guide (or the settings id) to choose one")
        cache = cls(root, _read_settings(found[0]))
        if cache.id != found[0].name:
            raise ValueError(f"settings.json in {str(found[0])!r} does not match its folder name (format changed?)")
        return cache

    def write_settings(self) -> None:
        path = self.dir / "settings.json"
        if not path.exists():
            text = json.dumps({"format": FORMAT, "id": self.id, "settings": self.settings}, indent=2, default=str)
            atomic_write_bytes(path, text.encode())

    def path(self, image_sha256: str) -> Path:
        return self.dir / image_sha256[:2] / f"{image_sha256}.pt"

    def key(self, image_sha256: str) -> str:
        return f"{self.id}/{image_sha256}"

    def get(self, image_sha256: str) -> Entry | None:
        """The entry, or None when it is missing, corrupt or stale (those are logged and counted)."""
        path = self.path(image_sha256)
        if not path.exists():
            self.misses += 1
            return None
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            ok = (isinstance(d, dict) and d.get("format") == FORMAT and d.get("key") == self.key(image_sha256)
                  and d.get("checksum") == _checksum(d["grids"], d["prompts"], d["image_size"]))
        except Exception as exc:  # truncated zip, unpickling error, missing field...
            log.warning("guidance cache entry %s is unreadable (%s: %s); recomputing", path, type(exc).__name__, exc)
            ok, d = False, None
        if not ok:
            if d is not None:
                log.warning("guidance cache entry %s is stale or corrupt (key/checksum mismatch); recomputing", path)
            self.rejected += 1
            return None
        self.hits += 1
        return Entry(image_sha256, tuple(d["image_size"]), d["grids"], list(d["prompts"]))

    def put(self, image_sha256: str, grids: torch.Tensor, prompts, image_size) -> Entry:
        # A copy of its own: an image's grids are often a view of the whole batch's tensor, and
        # torch.save writes a view's entire storage.
        grids = grids.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
        if grids.dim() != 3:
            raise ValueError(f"grids must have shape (P, gh, gw), got {tuple(grids.shape)}")
        prompts = [str(p) for p in prompts]
        image_size = [int(image_size[0]), int(image_size[1])]
        self.write_settings()
        d = {"format": FORMAT, "key": self.key(image_sha256), "image_size": image_size, "grids": grids,
             "prompts": prompts, "checksum": _checksum(grids, prompts, image_size)}
        import io

        buf = io.BytesIO()
        torch.save(d, buf)
        atomic_write_bytes(self.path(image_sha256), buf.getvalue())
        return Entry(image_sha256, tuple(image_size), grids, prompts)
