"""README claims a newcomer relies on, checked against the code (issue 14)."""

import pathlib
import re
import tomllib

from ssattn.apps.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_gitignore_covers_the_demo_output_folder():
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    default = next(a.default for a in demo._actions if a.dest == "out")
    name = pathlib.PurePath(default).name
    ignored = [line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert name in ignored, f"the demo writes to {default!r}; .gitignore should list it"


def test_readme_says_how_to_install_with_a_cpu_only_torch():
    text = _section("Installing in detail")
    assert "5.8 GB" in text
    cpu = re.search(r"pip install torch==(\S+) torchvision==(\S+) --index-url https://download.pytorch.org/whl/cpu",
                    text)
    assert cpu, "the CPU-only install command"
    pinned = re.search(r"pip install torch==(\S+) torchvision==(\S+) ", _section("Quick start")).groups()
    assert cpu.groups() == pinned, "the CPU builds of the same torch and torchvision the quick start pins"


def test_readme_gpu_and_model_notes():
    text = _section("Installing in detail")
    for needle in ("nvcc", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "vgg19", "--vgg-weights", "llava-1.5-7b",
                   "14 GB", "--dtype float16"):
        assert needle in text, needle
    # the flags named there exist
    guide = build_parser()._subparsers._group_actions[0].choices["guide"]
    assert {"--dtype", "--batch-size", "--prompt", "--classes", "--captioner"} <= set(guide._option_string_actions)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert "--vgg-weights" in train._option_string_actions


def test_test_extra_has_what_the_suite_imports():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    names = {re.split(r"[<>=\[ ]", req, maxsplit=1)[0] for req in extra}
    assert {"pytest", "hypothesis"} <= names


def test_no_internal_paper_numbers_in_what_users_read():
    # The papers are "seed 000"-"seed 003" in the project's notes; a user knows them by the systems'
    # names (NaLSuper text guidance, the ClipCap-style caption regulariser, VLM degradation routing).
    number = re.compile(r"\bseeds?[ _-]?0\d\d\b", re.I)
    texts = {"README.md": README}
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "docs").rglob("*.md")})
    # the package's source: docstrings (help()) and error messages
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "ssattn").rglob("*.py")})
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    texts["ssattn --help"] = parser.format_help()
    texts.update({f"ssattn {name} --help": sub.format_help() for name, sub in subcommands.items()})
    assert len(subcommands) >= 6
    found = [f"{where}: {m.group(0)!r}" for where, text in texts.items() for m in number.finditer(text)]
    assert found == []


# Runs in a fresh interpreter, in an empty folder, offline: the blocks of "Installing in detail" (the
# models the examples use, then their tiny stand-ins) in one namespace, then every later example in a
# copy of it, so an example that leans on another example's variables fails.
EXAMPLES = """
import json, sys, traceback
base = {"__name__": "__readme__"}
failures = []
for title, code, setup in json.loads(sys.argv[1]):
    try:
        exec(compile(code, "README.md, " + title, "exec"), base if setup else dict(base))
    except BaseException:
        failures.append(title + ":\\n" + traceback.format_exc(limit=-4))
print(json.dumps(failures))
"""


def _python_examples() -> list[tuple[str, str, bool]]:
    """(where, code, is setup) for every ```python block of README.md, in order."""
    out, section = [], ""
    for part in re.split(r"(^## .*$)", README, flags=re.M):
        if part.startswith("## "):
            section = part[3:].strip()
            continue
        for code in re.findall(r"```python\n(.*?)\n```", part, re.S):
            out.append((f"{section}: {code.splitlines()[0][:60]}", code, section == "Installing in detail"))
    return out


def test_every_python_example_in_the_readme_runs_as_written_offline(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    examples = _python_examples()
    assert len(examples) >= 8 and sum(setup for *_, setup in examples) == 2
    # The one thing an example takes from the user rather than from the README: a dataset at the path it
    # names (data/uieb, with UIEB's folder names), here three small pairs.
    rng = np.random.default_rng(0)
    for sub in ("raw-890", "reference-890"):
        (tmp_path / "data" / "uieb" / sub).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "uieb" / sub / f"{i}.png")
    with socket.socket() as s:  # the hub's address: a local port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{port}",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", EXAMPLES, json.dumps(examples)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failures == [], "\n\n".join(failures)


def test_each_system_names_its_extra_and_the_extra_brings_transformers():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for title, extra in (("Guidance maps for a dataset", "guidance"), ("Degradation-aware routing", "routing"),
                         ("Text guidance", "text"), ("Caption-model feature regularisation", "caption")):
        assert f"`[{extra}]`" in _section(title), (title, extra)
        names = {re.split(r"[<>=\[ ]", req, maxsplit=1)[0] for req in extras[extra]}
        assert "transformers" in names, extra
    assert "`[text]`" in _section("Quick start") and "`[caption]`" in _section("Quick start")
