"""A cache of constant features (tensors keyed by content): in memory, and optionally on disk.

For features computed by a frozen model that never change during training:
the word features of a caption (ssattn.text), a captioner's features of a
reference image (ssattn.caption). The disk layout, atomic writes and
checksums are those of the guidance cache (ssattn.guidance.cache)::

    CACHE_DIR/<settings id>/settings.json      the settings (JSON), with the kind of feature
    CACHE_DIR/<settings id>/<ab>/<key>.pt       one entry: named tensors, its key and a checksum

A key is a content hash (`content_key`); the settings id hashes every
setting that changes the stored values (model, revision, lengths, dtype...)
and the kind. A corrupt, truncated or foreign entry is logged and reported as
missing, so that it is recomputed. Entries are stored on the CPU, as
float32 for floating tensors; `get` returns them as stored.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import OrderedDict
from pathlib import Path

import torch

from .cache import _canonical, _read_settings, atomic_write_bytes

log = logging.getLogger("ssattn.guidance")

FORMAT = 1


def content_key(*parts) -> str:
    """sha256 of the parts: str (UTF-8), bytes, or tensors (shape, dtype and values)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().to("cpu").contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of a large tensor
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _checksum(key: str, tensors: dict) -> str:
    return content_key(key, *[x for name in sorted(tensors) for x in (name, tensors[name])])


class FeatureCache:
    """Named tensors by key for one kind of feature and one set of settings.

    cache_dir=None keeps entries in memory only. `memory` bounds how many
    entries the in-memory layer holds (least recently used dropped first;
    None: no bound, 0: none held). hits / misses / rejected count lookups
    (a disk hit that fills memory counts once).
    """

    def __init__(self, kind: str, settings: dict, cache_dir=None, *, memory: int | None = None):
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty string, got {kind!r}")
        if memory is not None and (not isinstance(memory, int) or memory < 0):
            raise ValueError(f"memory must be None or a non-negative integer, got {memory!r}")
        self.kind = kind
        self.settings = dict(settings)
        self.id = hashlib.sha256(f"ssattn-{kind}-v{FORMAT}:{_canonical(self.settings)}".encode()).hexdigest()[:16]
        self.root = None if cache_dir is None else Path(cache_dir)
        self.dir = None if self.root is None else self.root / self.id
        self.memory = memory
        self._mem: OrderedDict[str, dict] = OrderedDict()
        self.hits = self.misses = self.rejected = 0

    def __len__(self) -> int:
        return len(self._mem)

    def path(self, key: str) -> Path:
        if self.dir is None:
            raise ValueError("this cache has no folder (cache_dir=None)")
        return self.dir / key[:2] / f"{key}.pt"

    def _remember(self, key: str, tensors: dict) -> None:
        if self.memory == 0:
            return
        self._mem[key] = tensors
        self._mem.move_to_end(key)
        while self.memory is not None and len(self._mem) > self.memory:
            self._mem.popitem(last=False)

    def get(self, key: str) -> dict | None:
        """The entry's tensors, or None when missing, corrupt or written under other settings."""
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key]
        if self.dir is None or not self.path(key).exists():
            self.misses += 1
            return None
        path = self.path(key)
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            ok = (isinstance(d, dict) and d.get("format") == FORMAT and d.get("key") == f"{self.id}/{key}"
                  and isinstance(d.get("tensors"), dict) and d.get("checksum") == _checksum(key, d["tensors"]))
        except Exception as exc:  # truncated zip, unpickling error, missing field...
            log.warning("%s cache entry %s is unreadable (%s: %s); recomputing", self.kind, path,
                        type(exc).__name__, exc)
            ok, d = False, None
        if not ok:
            if d is not None:
                log.warning("%s cache entry %s is stale or corrupt (key/checksum mismatch); recomputing",
                            self.kind, path)
            self.rejected += 1
            return None
        self.hits += 1
        self._remember(key, d["tensors"])
        return d["tensors"]

    def put(self, key: str, tensors: dict) -> dict:
        """Store (and return) the entry: detached CPU copies, floating tensors as float32."""
        if not isinstance(tensors, dict) or not tensors or not all(
                isinstance(n, str) and isinstance(t, torch.Tensor) for n, t in tensors.items()):
            raise ValueError("tensors must be a non-empty dict {name: Tensor}")
        # Copies of their own: a row of a batch's tensor is a view, and torch.save writes a view's storage.
        stored = {n: t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype)
                  .clone(memory_format=torch.contiguous_format) for n, t in tensors.items()}
        if self.dir is not None:
            settings = self.dir / "settings.json"
            if not settings.exists():
                text = json.dumps({"format": FORMAT, "kind": self.kind, "id": self.id, "settings": self.settings},
                                  indent=2, default=str)
                atomic_write_bytes(settings, text.encode())
            buf = io.BytesIO()
            torch.save({"format": FORMAT, "key": f"{self.id}/{key}", "tensors": stored,
                        "checksum": _checksum(key, stored)}, buf)
            atomic_write_bytes(self.path(key), buf.getvalue())
        self._remember(key, stored)
        return stored

    def stored_settings(self) -> dict | None:
        """The settings written in this cache's folder (None without a folder or before the first put)."""
        if self.dir is None or not (self.dir / "settings.json").exists():
            return None
        return _read_settings(self.dir)
