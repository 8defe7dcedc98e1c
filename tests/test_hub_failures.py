"""Model loading when a part is missing: the transformers extra, the download itself, progress bars in logs."""

import sys

import pytest

from ssattn.guidance import hub


@pytest.fixture
def no_transformers(monkeypatch):
    # A None entry makes `import transformers` fail as when it is not installed.
    monkeypatch.setitem(sys.modules, "transformers", None)


@pytest.mark.parametrize("system,extra", [
    ("text", "text"), ("clip", "routing"), ("vlm", "routing"), ("blip", "guidance"), ("llava", "guidance"),
    ("captioner", "caption"), ("tiny_captioner", "caption"), ("tiny_clip", "routing"), ("tiny_blip", "guidance"),
])
def test_a_missing_transformers_names_the_extra_to_install(no_transformers, tmp_path, system, extra):
    # Before: "No module named 'transformers'", which says nothing of ssattn's extras.
    def build():
        if system == "text":
            from ssattn.text import TextEncoder
            TextEncoder(str(tmp_path))
        elif system == "clip":
            from ssattn.routing import ClipClassifier
            ClipClassifier(str(tmp_path))
        elif system == "vlm":
            from ssattn.routing.vlm import VlmClassifier
            VlmClassifier(str(tmp_path))
        elif system == "blip":
            from ssattn.guidance.blip import BlipAligner
            BlipAligner(str(tmp_path))
        elif system == "llava":
            from ssattn.guidance.llava import LlavaCaptioner
            LlavaCaptioner(str(tmp_path))
        elif system == "captioner":
            from ssattn.caption import load_captioner
            load_captioner(str(tmp_path))
        elif system == "tiny_captioner":
            from ssattn.caption.testing import save_tiny_captioner
            save_tiny_captioner(tmp_path / "cap")
        elif system == "tiny_clip":
            from ssattn.routing.testing import save_clip
            save_clip(tmp_path / "clip")
        else:
            from ssattn.guidance.testing import save_blip
            save_blip(tmp_path / "blip")

    with pytest.raises(ModuleNotFoundError, match=rf"needs the transformers package: pip install 'ssattn\[{extra}\]'"):
        build()


class _ProxyError(Exception):
    """What an HTTP client raises when a proxy refuses the download (not an OSError)."""


_ProxyError.__module__ = "httpx2"


def test_a_download_refused_by_a_proxy_is_a_one_line_model_error(monkeypatch):
    # Before: "ssattn route: ProxyError: 404 Not Found", no model named, no way out given.
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)  # the proxy answers the connection

    class Loader:
        @staticmethod
        def from_pretrained(model_id, **kw):
            raise _ProxyError("404 Not Found")

    with pytest.raises(hub.ModelNotAvailableError) as err:
        hub.from_pretrained(Loader, "someone/model", "CLIP model")
    msg = str(err.value)
    assert "cannot load the CLIP model 'someone/model'" in msg and "_ProxyError: 404 Not Found" in msg
    assert "hf download someone/model" in msg and "\n" not in msg


def test_an_error_of_the_model_itself_is_not_called_missing(monkeypatch, tmp_path):
    class Loader:
        @staticmethod
        def from_pretrained(model_id, **kw):
            raise RuntimeError("size mismatch for weight")  # a real bug: shown as it is

    with pytest.raises(RuntimeError, match="size mismatch"):
        hub.from_pretrained(Loader, str(tmp_path), "CLIP model")


def test_transformers_loading_bars_are_off_in_a_log_and_restored(monkeypatch, tmp_path):
    # transformers' "Loading weights" bar redraws with carriage returns: in a log, one line per redraw.
    from transformers.utils import logging as hf_logging

    seen = []

    class Loader:
        @staticmethod
        def from_pretrained(model_id, **kw):
            seen.append(hf_logging.is_progress_bar_enabled())
            return "model"

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    hf_logging.enable_progress_bar()
    assert hub.from_pretrained(Loader, str(tmp_path), "CLIP model") == "model"
    assert seen == [False] and hf_logging.is_progress_bar_enabled()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    hub.from_pretrained(Loader, str(tmp_path), "CLIP model")
    assert seen == [False, True]


def test_http_request_logs_stay_out_of_a_commands_info_log(tmp_path, monkeypatch):
    import logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.INFO)  # what `guide` and `route` configure
    for name in ("httpx", "httpx2"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)

    class Loader:
        @staticmethod
        def from_pretrained(model_id, **kw):
            return "model"

    hub.from_pretrained(Loader, str(tmp_path), "CLIP model")
    assert all(logging.getLogger(n).getEffectiveLevel() >= logging.WARNING for n in ("httpx", "httpx2"))
