"""Loading models by Hugging Face repository id or local folder, with errors that say what to do offline."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

DEFAULT_ALIGNER = "Salesforce/blip-itm-base-coco"
DEFAULT_CAPTIONER = "llava-hf/llava-1.5-7b-hf"


class ModelNotAvailableError(OSError):
    """A model (weights, config or processor) that cannot be loaded; the message names it and how to provide it."""


# How long a machine without network waits for the Hub before it says so: one TCP connection, no retries
# (huggingface_hub's own retries took minutes and printed a warning per attempt).
CONNECT_TIMEOUT_S = 2.0


def require_transformers(extra: str, system: str) -> None:
    """A one-line error naming the extra to install when transformers is missing (found without importing it)."""
    try:
        found = sys.modules.get("transformers", True) is not None and importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ModuleNotFoundError(f"{system} needs the transformers package: pip install 'ssattn[{extra}]'",
                                  name="transformers")


def _hub_state() -> str:
    try:
        from huggingface_hub import constants

        cache, offline = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    except Exception:  # pragma: no cover - huggingface_hub always comes with transformers
        cache, offline = os.environ.get("HF_HUB_CACHE", "?"), os.environ.get("HF_HUB_OFFLINE", "0")
    return f"HF_HUB_CACHE={cache}, HF_HUB_OFFLINE={int(bool(offline))}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_repo_id(model_id: str) -> bool:
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(model_id)
    except Exception:
        return False
    return True


def not_available(what: str, model_id: str, exc: BaseException | str) -> ModelNotAvailableError:
    """The one-line error for a model that cannot be loaded: what it is, why, and how to provide it."""
    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {_one_line(exc)}"
    local = Path(str(model_id)).expanduser()
    if local.exists():
        hint = (f"the folder exists but does not hold a loadable {what} (expected config.json, the weights and the "
                f"processor/tokenizer files, as save_pretrained writes them): {reason}")
    elif not _is_repo_id(str(model_id)):
        hint = (f"there is no file or folder at that path, and it is not a Hugging Face repository id "
                f"(ORG/NAME)")
    else:
        hint = (f"no local folder of that name, and loading it as a hub id failed ({reason}); to provide it, run "
                f"`hf download {model_id}` "
                "on a machine with network and copy its "
                "Hugging Face cache here (set HF_HOME, or HF_HUB_CACHE, to it, and HF_HUB_OFFLINE=1), or pass "
                f"the path of a folder it was saved to with save_pretrained ({_hub_state()})")
    return ModelNotAvailableError(f"cannot load the {what} {str(model_id)!r}: {hint}")


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached now (offline mode, no network), or None when it can.

    One TCP connection to the Hub endpoint (HF_ENDPOINT), or to the HTTPS proxy when one is set, with a
    CONNECT_TIMEOUT_S timeout: a machine without network learns it in at most that long.
    """
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "it is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    endpoint = urlsplit(constants.ENDPOINT)
    target = endpoint
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        via = f" through the proxy {target.hostname}:{port}" if target is not endpoint else ""
        return (f"it is not in the local Hugging Face cache, and the Hub ({constants.ENDPOINT}) cannot be "
                f"reached{via} ({_one_line(exc) or type(exc).__name__})")
    return None


def _missing(exc: BaseException) -> bool:
    # huggingface_hub's "not in cache"/"repo not found"/bad-id errors are OSError or ValueError subclasses;
    # a ValueError raised while building a model that *was* found is a real bug.
    return isinstance(exc, OSError) or (isinstance(exc, ValueError) and _looks_missing(exc))


def _in_cache(model_id: str) -> bool:
    """Whether the local hub cache holds any snapshot of the repository (no network, no transformers import)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / ("models--" + model_id.replace("/", "--")) / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _loader(loader):
    if isinstance(loader, str):  # a transformers class by name: imported only once the model is known to be here
        try:
            import transformers
        except ImportError as exc:
            raise ModuleNotFoundError(
                f"loading a model needs the transformers package ({_one_line(exc)}): pip install the extra of the "
                "system you use, 'ssattn[guidance]', 'ssattn[text]', 'ssattn[caption]' or 'ssattn[routing]'",
                name="transformers") from exc

        return getattr(transformers, loader)
    return loader


@contextlib.contextmanager
def _loading_bars():
    """transformers draws a "Loading weights" bar with carriage returns; written to a log each redraw is a line.
    Shown on a terminal only, as ssattn's own progress (ssattn._progress)."""
    if sys.stderr.isatty():
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# Failures of the download itself (a proxy that refuses, a connection dropped mid-way) come as the HTTP
# client's own exceptions, which are not OSError: recognised by the module that defines them.
_NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3", "huggingface_hub")


def _quiet_http_logs() -> None:
    """The HTTP clients log each request at INFO ("HTTP Request: HEAD ..."), which a command's INFO log would
    show; unless the user set their level, they say only warnings."""
    for name in _NETWORK_MODULES[:4]:
        log = logging.getLogger(name)
        if log.level == logging.NOTSET:
            log.setLevel(logging.WARNING)


def _network_error(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.split(".")[0] in _NETWORK_MODULES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def from_pretrained(loader, model_id, what: str, **kwargs):
    """loader.from_pretrained(model_id, **kwargs), failing fast and in one line when the model is not here.

    loader: a transformers class, or its name ("AutoProcessor"), imported only after the model is found (a
    transformers import can take seconds). A local folder loads as it is. A hub id is looked up in the
    local cache first (no network); only when it is not there is the Hub asked, after hub_unreachable()
    says it can be reached, so a machine without network fails within CONNECT_TIMEOUT_S with one
    ModelNotAvailableError that says how to provide the model.
    """
    if not model_id or not isinstance(model_id, (str, os.PathLike)):
        raise ValueError(f"the {what} must be a repository id or a folder path, got {model_id!r}")
    _quiet_http_logs()
    model_id = os.fspath(model_id)
    if not Path(model_id).expanduser().exists():
        if not _is_repo_id(model_id):
            raise not_available(what, model_id, "not found")
        if _in_cache(model_id):
            try:
                with _loading_bars():
                    return _loader(loader).from_pretrained(model_id, local_files_only=True, **kwargs)
            except (OSError, ValueError) as exc:
                if not _missing(exc):
                    raise
        why = hub_unreachable()
        if why:
            raise not_available(what, model_id, why)
    try:
        with _loading_bars():
            return _loader(loader).from_pretrained(model_id, **kwargs)
    except (ModelNotAvailableError, ModuleNotFoundError):
        raise
    except Exception as exc:
        if isinstance(exc, (OSError, ValueError)) and _missing(exc) or _network_error(exc):
            raise not_available(what, model_id, exc) from exc
        raise


def snapshot(model_id: str, what: str) -> Path:
    """The local folder of a hub repository (huggingface_hub.snapshot_download), with from_pretrained's checks."""
    from huggingface_hub import snapshot_download

    _quiet_http_logs()
    if not _is_repo_id(model_id):
        raise not_available(what, model_id, "not found")
    if _in_cache(model_id):
        try:
            return Path(snapshot_download(model_id, local_files_only=True))
        except Exception:  # not completely in the cache
            pass
    why = hub_unreachable()
    if why:
        raise not_available(what, model_id, why)
    try:
        return Path(snapshot_download(model_id))
    except Exception as exc:  # bad id, repository not found, download failed
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
