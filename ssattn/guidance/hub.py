"""Loading models by Hugging Face repository id or local folder, with errors that say what to do offline."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ALIGNER = "Salesforce/blip-itm-base-coco"
DEFAULT_CAPTIONER = "llava-hf/llava-1.5-7b-hf"


class ModelNotAvailableError(OSError):
    """A model (weights, config or processor) that cannot be loaded; the message names it and how to provide it."""


def _hub_state() -> str:
    try:
        from huggingface_hub import constants

        cache, offline = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    except Exception:  # pragma: no cover - huggingface_hub always comes with transformers
        cache, offline = os.environ.get("HF_HUB_CACHE", "?"), os.environ.get("HF_HUB_OFFLINE", "0")
    return f"HF_HUB_CACHE={cache}, HF_HUB_OFFLINE={int(bool(offline))}"


def not_available(what: str, model_id: str, exc: BaseException) -> ModelNotAvailableError:
    local = Path(str(model_id)).expanduser()
    if local.exists():
        hint = (f"the folder {str(local)!r} exists but does not hold a loadable {what} "
                "(expected config.json, the weights and the processor/tokenizer files, as save_pretrained writes them)")
    else:
        hint = (
            f"to provide it: on a machine with network run `hf download {model_id}` (or load it once with "
            "transformers), then copy its cache folder (HF_HOME, default ~/.cache/huggingface) here and set "
            f"HF_HOME (or HF_HUB_CACHE) to it with HF_HUB_OFFLINE=1; or save it with save_pretrained into a folder "
            "and pass that folder's path instead of the repository id"
        )
    return ModelNotAvailableError(f"cannot load the {what} {model_id!r}: {type(exc).__name__}: {exc}\n{hint} "
                                  f"({_hub_state()})")


def from_pretrained(loader, model_id, what: str, **kwargs):
    """loader.from_pretrained(model_id, **kwargs), turning 'not found' errors into ModelNotAvailableError."""
    if not model_id or not isinstance(model_id, (str, os.PathLike)):
        raise ValueError(f"the {what} must be a repository id or a folder path, got {model_id!r}")
    model_id = os.fspath(model_id)
    try:
        return loader.from_pretrained(model_id, **kwargs)
    except ModelNotAvailableError:
        raise
    except (OSError, ValueError) as exc:
        # huggingface_hub's "not in cache"/"repo not found"/bad-id errors are OSError or ValueError subclasses;
        # a ValueError raised while building a model that *was* found is a real bug: re-raise it as is.
        if isinstance(exc, ValueError) and not _looks_missing(exc):
            raise
        raise not_available(what, model_id, exc) from exc


def _looks_missing(exc: BaseException) -> bool:
    name = type(exc).__name__
    text = str(exc).lower()
    return ("validation" in name.lower() or "repo id" in text or "not found" in text or "does not appear" in text
            or "unrecognized" in text)


def revision_of(model_id) -> str | None:
    """The hub snapshot (commit) that from_pretrained(model_id) reads from the local cache; None for a folder."""
    if Path(os.fspath(model_id)).expanduser().exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(os.fspath(model_id), "config.json")
    except Exception:  # invalid id and the like: the loader has already reported it
        return None
    if isinstance(found, str):
        parts = Path(found).parts
        if "snapshots" in parts:
            return parts[parts.index("snapshots") + 1]
    return None


def model_ref(model_id) -> str:
    """How a model is named in cache settings: a local folder by its absolute path, a hub id as given."""
    p = Path(os.fspath(model_id)).expanduser()
    return str(p.resolve()) if p.exists() else os.fspath(model_id)
