"""Where captions come from: a user's text, a file per image, a table, or a VLM captioner.

read_captions(source, names) gives one caption per image name (the file
stem of each degraded image, or the dataset's item names):

- a folder: `<name>.txt` for each name (UTF-8, surrounding whitespace dropped);
- a `.json` file: an object {name: caption};
- a text file whose lines are `name<TAB>caption`: a table;
- any other text file: its whole text is the one caption of every image;
- any other string: the caption itself, for every image ("a fish over sand"). A string that
  looks like a path (it holds a path separator, or ends in a caption file's extension such as
  .txt or .json) and names nothing is an error instead, so a mistyped file name is not
  silently taken for a caption.

Missing names are an error that lists a few of them. caption_images(images,
captioner, cache_dir) asks a captioner (ssattn.guidance.LlavaCaptioner or
any object with `settings` and `__call__(images) -> list[str]`) and caches
the answers by image content and the captioner's settings (greedy decoding
is deterministic, so an answer never changes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..guidance.feature_cache import FeatureCache, content_key


def _clean(text: str, where: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError(f"{where} is empty: every image needs a non-empty caption")
    return text


def _missing(names, table: dict, source: str) -> None:
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"captions {source!r} have no entry for {len(missing)} of {len(names)} image(s), e.g. "
                         f"{missing[:3]}; known names: {sorted(table)[:3]}")


CAPTION_FILE_EXTENSIONS = (".txt", ".json", ".tsv", ".csv", ".jsonl")


def looks_like_a_path(text: str) -> bool:
    """Whether a --text value is meant as a file or folder: a path separator, or a caption file's extension."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in text for sep in separators) or text.lower().endswith(CAPTION_FILE_EXTENSIONS)


def read_captions(source, names) -> list[str]:
    """One caption per name, from `source` (see the module docstring)."""
    names = [str(n) for n in names]
    path = Path(source)
    if not path.exists() and isinstance(source, str):
        if looks_like_a_path(source):
            raise FileNotFoundError(
                f"captions {source!r}: no such file or folder (a caption given as text has no path separator and "
                f"no file extension such as {', '.join(CAPTION_FILE_EXTENSIONS[:2])})")
        return [_clean(source, "the caption text")] * len(names)
    if path.is_dir():
        found = {n: path / f"{n}.txt" for n in names}
        _missing(names, {n: p for n, p in found.items() if p.is_file()}, str(path))
        return [_clean(found[n].read_text(encoding="utf-8"), str(found[n])) for n in names]
    if not path.is_file():
        raise FileNotFoundError(f"captions {str(path)!r} is neither a folder of <name>.txt files nor a file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"captions {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(table, dict):
            raise ValueError(f"captions {str(path)!r} must hold a JSON object {{image name: caption}}")
        _missing(names, table, str(path))
        return [_clean(str(table[n]), f"{path}[{n!r}]") for n in names]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and all("\t" in ln for ln in lines):
        table = dict(ln.split("\t", 1) for ln in lines)
        table = {k.strip(): v for k, v in table.items()}
        _missing(names, table, str(path))
        return [_clean(table[n], f"{path} ({n!r})") for n in names]
    caption = _clean(text, str(path))
    return [caption] * len(names)


def caption_images(images, captioner, cache_dir=None) -> list[str]:
    """The captioner's answer for each image (C, H, W) in [0, 1], cached by image content and its settings."""
    images = list(images)
    cache = FeatureCache("captions", dict(captioner.settings), cache_dir)
    keys = [content_key(im.detach().float().cpu()) for im in images]
    found = {i: cache.get(k) for i, k in enumerate(keys)}
    todo = [i for i, entry in found.items() if entry is None]
    if todo:
        for i, caption in zip(todo, captioner([images[i] for i in todo])):
            found[i] = cache.put(keys[i], {"utf8": torch.tensor(list(caption.encode("utf-8")), dtype=torch.uint8)})
    return [bytes(found[i]["utf8"].tolist()).decode("utf-8") for i in range(len(images))]
