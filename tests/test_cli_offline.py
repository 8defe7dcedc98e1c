"""Without network and without the weights, every command that loads a model fails fast, in one line.

Each command runs the way a user's does, on an empty Hugging Face cache, with the Hub's address
(HF_ENDPOINT) at a local port where nothing listens: the same refusal a machine without network
gets, independent of this machine's real network.
"""

import json
import os
import socket
import subprocess
import sys

from tests.test_cli_errors import _images

# The commands whose models are missing here (default hub ids, and one given by name).
COMMANDS = {
    "clip": ["route", "{images}", "--out", "{out}/route", "--classifier", "clip", "--device", "cpu"],
    "vlm": ["route", "{images}", "--out", "{out}/vlm", "--classifier", "vlm", "--device", "cpu"],
    "blip": ["guide", "{images}", "--out", "{out}/guide", "--method", "blip", "--prompt", "fish", "--device", "cpu"],
    "llava": ["guide", "{images}", "--out", "{out}/llava", "--method", "blip", "--device", "cpu"],
    "text": ["train", "--data", "synthetic", "--out", "{out}/text", "--size", "16", "--n", "4", "--steps", "1",
             "--device", "cpu", "--no-progress", "--text", "a fish over sand"],
    "caption": ["train", "--data", "synthetic", "--out", "{out}/caption", "--size", "16", "--n", "4", "--steps", "1",
                "--device", "cpu", "--no-progress", "--caption-loss", "0.1", "--captioner", "someone/clipcap"],
}
MODELS = {"clip": "openai/clip-vit-base-patch32", "vlm": "llava-hf/llava-1.5-7b-hf",
          "blip": "Salesforce/blip-itm-base-coco", "llava": "llava-hf/llava-1.5-7b-hf",
          "text": "openai/clip-vit-base-patch32", "caption": "someone/clipcap"}

# Run in a fresh interpreter (huggingface_hub reads HF_ENDPOINT at import); each command's time is taken
# from main()'s start, after the interpreter has imported the CLI: the import is not the failure path.
RUNNER = """
import json, sys, time
from ssattn.apps.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    t = time.perf_counter()
    rc = main(argv)
    out.append([rc, time.perf_counter() - t])
    print("<end of command>", file=sys.stderr, flush=True)
print(json.dumps(out))
"""


def _closed_port() -> int:
    with socket.socket() as s:  # a port the OS just handed out and nothing listens on once it is closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_models_fail_in_one_line_within_seconds(tmp_path):
    images = _images(tmp_path / "imgs", n=1)
    argvs = [[a.format(images=images, out=tmp_path) for a in COMMANDS[k]] for k in COMMANDS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # Before: 150 s and 137 lines (huggingface_hub's retries, a warning each) for the CLIP classifier alone.
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = proc.stderr.split("<end of command>\n")[:-1]
    assert len(errors) == len(results) == len(COMMANDS), proc.stderr
    for name, (rc, seconds), err in zip(COMMANDS, results, errors):
        lines = err.splitlines()
        assert rc == 2 and len(lines) == 1, (name, err)
        assert MODELS[name] in lines[0] and "cannot be reached" in lines[0] and "hf download" in lines[0], lines[0]
        # The failure path makes one TCP connection (refused at once here; at most hub.CONNECT_TIMEOUT_S = 2 s
        # where a network drops packets) and imports no model code: about 0.1 s measured on a loaded 2-core
        # machine. 5 s is the bound the user was promised, far above that.
        assert seconds < 5.0, (name, seconds)


def test_a_path_that_does_not_exist_is_not_looked_up_on_the_hub(tmp_path):
    import pytest

    from ssattn.guidance.hub import ModelNotAvailableError, from_pretrained

    with pytest.raises(ModelNotAvailableError, match="'models/clip/': there is no file or folder at that path"):
        from_pretrained("AutoConfig", "models/clip/", "CLIP model")


def test_the_hub_is_reached_through_the_proxy_when_one_is_set(monkeypatch):
    from huggingface_hub import constants

    from ssattn.guidance import hub

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:%d" % listening.getsockname()[1])
        for name in ("no_proxy", "NO_PROXY", "http_proxy", "HTTP_PROXY"):
            monkeypatch.delenv(name, raising=False)
        assert hub.hub_unreachable() is None
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{_closed_port()}")
        assert "through the proxy 127.0.0.1" in hub.hub_unreachable()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        assert "HF_HUB_OFFLINE is set" in hub.hub_unreachable()
