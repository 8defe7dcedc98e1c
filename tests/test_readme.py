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
