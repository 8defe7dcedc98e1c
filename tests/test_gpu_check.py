"""benchmarks/gpu_check.sh (the one-command GPU check) and its headline benchmark, on CPU.

The dry run must print the whole plan and run nothing: python, pip, timeout and
nvidia-smi are replaced by stubs that record any call.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STAGES = ("build", "smoke", "tests", "headline", "text", "benches")


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    called = tmp_path / "called"
    for tool in ("python", "python3", "pip", "timeout", "nvidia-smi"):
        stub = stubs / tool
        stub.write_text(f"#!/bin/sh\necho {tool} >> {called}\nexit 1\n")
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not called.exists(), f"the dry run called {called.read_text()}"
    assert not (tmp_path / "out").exists()
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines if ln.split() and ln.split()[0] in STAGES] == list(STAGES)
    assert "TORCH_CUDA_ARCH_LIST=9.0" in proc.stdout  # sm_90 only
    assert " -x " in next(ln for ln in lines if ln.startswith("smoke"))
    assert "headline_attention.py" in proc.stdout
    assert "bench_text_attention.py" in next(ln for ln in lines if ln.startswith("text"))


def test_unknown_argument_is_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "--fast"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr


def test_headline_benchmark_quick_mode_checks_and_times(tmp_path):
    """The headline script end to end (interpreter, one tiny stage, fwd+bwd): checked, then timed."""
    from ssattn import _backends

    if _backends.kernel_module("attention") is None or not _backends.triton_interpreting():
        pytest.skip("needs the Triton interpreter")
    from ssattn import _checks

    checks = _checks._VALUE_CHECKS
    spec = importlib.util.spec_from_file_location("headline_attention", REPO / "benchmarks" / "headline_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "headline.md"
    table = mod.main(["--quick", "--modes", "fwd+bwd", "--out", str(out)])
    (_, _, _, rows), = table
    timed = {name for name, _, ms, _ in rows if ms is not None}
    assert {"ssattn single-pass", "ssattn two-pass", "chain sdpa-math", "core sdpa-math"} <= timed
    assert all("check" in note for _, _, ms, note in rows if ms is not None)
    assert "| ssattn single-pass ms |" in out.read_text()
    assert _checks._VALUE_CHECKS == checks  # the script turned value checks off for timing only
