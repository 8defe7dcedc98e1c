"""Install layout, the CLI entry point, and CI running exactly the README's test command."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].rstrip().endswith("ssattn demo")
    assert commands[1].rstrip().endswith("pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, "CI must run the README's test command verbatim"


def test_kernels_ship_inside_ssattn(tmp_path):
    code = (
        "import pathlib, ssattn, ssattn.kernels\n"
        "print(pathlib.Path(ssattn.kernels.__file__).parent.parent == pathlib.Path(ssattn.__file__).parent)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True"]


def test_checkout_shadows_no_installed_package():
    """A package directory at the checkout's root is importable by its bare name wherever the root is on
    sys.path (pytest's pythonpath = ["."], `python -c` run from a checkout), and there it hides any installed
    package of that name. A top-level kernels/ hid Hugging Face's `kernels`, which transformers >= 5.25
    installs and imports, and so broke every transformers import in the suite."""
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["ssattn", "tests"], "only ssattn and the test package may live at the checkout's root"
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    origin = res.stdout.strip()
    assert origin == "None" or ROOT not in pathlib.Path(origin).resolve().parents[:2], origin  # not ROOT/kernels


def test_build_configuration_uses_nothing_setuptools_deprecates():
    """A setuptools deprecation names a date after which the build fails. A fresh machine installs the newest
    setuptools, so past that date the README's install would fail there (the license table: 2027-02-18)."""
    code = (
        "import warnings\n"
        "from setuptools.warnings import SetuptoolsDeprecationWarning\n"
        "warnings.simplefilter('error', SetuptoolsDeprecationWarning)\n"
        "from setuptools.dist import Distribution\n"
        "from setuptools.config.pyprojecttoml import apply_configuration\n"
        "apply_configuration(Distribution(), 'pyproject.toml')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


def test_cli_info_runs():
    res = subprocess.run([sys.executable, "-m", "ssattn", "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ssattn 0.1.0" in res.stdout and "native extension ssattn._C" in res.stdout


def test_readme_usage_example_runs():
    readme = (ROOT / "README.md").read_text()
    example = re.findall(r"```python\n(.+?)\n```", readme.split("## Using it", 1)[1], re.S)[0]
    namespace: dict = {}
    exec(compile(example, "README.md:Using it", "exec"), namespace)
    assert namespace["out"].shape == (2, 4, 1024, 32)
    assert namespace["loss"].ndim == 0 and bool(namespace["loss"].isfinite())


def test_readme_dropin_example_runs():
    readme = (ROOT / "README.md").read_text()
    example = re.findall(r"```python\n(.+?)\n```", readme.split("## Drop-in for an existing network", 1)[1], re.S)[0]
    namespace: dict = {}
    exec(compile(example, "README.md:Drop-in", "exec"), namespace)
    ss, model = namespace["ss"], namespace["model"]
    assert namespace["y"].shape == (2, 3, 32, 32)
    assert namespace["loss"].ndim == 0 and bool(namespace["loss"].isfinite())
    assert ss.model is model and ss.blocks["dec1"].out_proj.weight.abs().sum() > 0  # the optimizer saw the stages


def _setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ssattn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs no build: setup() runs only as __main__, as pip runs it
    return module


def test_the_cuda_kernels_are_built_only_where_they_can_run_or_are_asked_for():
    plan = _setup_module().cuda_plan
    # nvcc present but no GPU (the install that spent minutes compiling kernels that could not run): C++ only
    build, why = plan("13.0", False, {})
    assert not build and "no CUDA GPU visible" in why and "SSATTN_CUDA=1" in why
    assert plan("13.0", True, {})[0]                                   # a GPU here: for its architecture
    assert plan("13.0", False, {"SSATTN_CUDA": "1"}) == (True, "SSATTN_CUDA is set: building the CUDA kernels "
                                                               "for 8.0;9.0")  # a docker or cluster build
    assert plan("13.0", False, {"TORCH_CUDA_ARCH_LIST": "9.0"})[0]
    assert not plan("13.0", True, {"SSATTN_NO_CUDA": "1"})[0]
    assert not plan(None, True, {"SSATTN_CUDA": "1"})[0]               # a CPU build of torch cannot


def test_ci_compiles_the_cuda_sources_and_the_readme_says_how_to_skip_them():
    ci = (ROOT / ".ci" / "run").read_text()
    before = ci.split(_readme_commands()[1], 1)[0]
    assert "export SSATTN_CUDA=1" in before  # a CUDA compile error cannot land, though CI has no GPU
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "SSATTN_NO_CUDA=1" in quick and "SSATTN_CUDA=1" in quick
