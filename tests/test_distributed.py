"""`ssattn train` under torchrun: 2 gloo processes on CPU, a tiny -SS U-Net, a few steps.

Three launches in all (each costs a few seconds of process start-up): one
with several runs (uninterrupted, interrupted, accumulated, fp16, bf16, a
model with a stage it never runs), one
resuming the interrupted run, and the command line with a bad sample.
Single-process references run in this process.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from ssattn.apps.data.sampler import ResumableDistributedSampler
from ssattn.apps.training import train
from tests._ddp_worker import Recording, config, data_tensors, dtype, fresh_model

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")

WORKER = os.path.join(os.path.dirname(__file__), "_ddp_worker.py")
BATCH, STEPS = 2, 4  # 8 items, 2 ranks x 2: two steps per epoch, so 4 steps cross an epoch boundary
RUNS = [  # "float64_sgd": float64 and plain SGD, for the runs compared with a single process (assert_params)
    {"name": "straight", "steps": STEPS, "batch": BATCH, "float64_sgd": True},
    {"name": "part", "steps": STEPS, "batch": BATCH, "stop_at": 2, "float64_sgd": True},
    {"name": "accum", "steps": 2, "batch": 1, "accum": 2, "float64_sgd": True},
    {"name": "fp16", "steps": 2, "batch": 1, "accum": 2, "amp": "fp16"},
    {"name": "bf16", "steps": 1, "batch": 2, "amp": "bf16"},
    {"name": "unused", "steps": 1, "batch": 2, "unused": True},
    {"name": "unused-found", "steps": 1, "batch": 2, "unused": True, "find_unused": True},
]


def torchrun(*args, timeout=400):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def ssattn_command() -> str:
    """The installed `ssattn` script: next to this Python (a venv that is not activated), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "ssattn")
    found = beside if os.path.isfile(beside) else shutil.which("ssattn")
    if found is None:
        pytest.fail(f"the ssattn command is neither beside {sys.executable} nor on PATH: install the package")
    return found


def check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    check(torchrun(WORKER, out, json.dumps(RUNS)))
    shutil.copytree(os.path.join(out, "part"), os.path.join(out, "part-at-2"))  # before the resume overwrites it
    check(torchrun(WORKER, out, json.dumps([{"name": "part", "steps": STEPS, "batch": BATCH, "float64_sgd": True}])))

    def load(name):
        return [torch.load(os.path.join(out, f"{name}.rank{r}.pt")) for r in (0, 1)]

    return out, load


def steps_of(seen, per_step):
    return [seen[i:i + per_step] for i in range(0, len(seen), per_step)]


def single_process(run: dict, run_dir=None):
    run = {**run, "float64_sgd": True}
    data = Recording(data_tensors(dtype=dtype(run)))
    model = fresh_model(dtype=dtype(run))
    train(model, data, config(run), run_dir)
    return model, data.seen


def assert_params(a: dict, b: dict, exact: bool):
    """exact: the same bits (ranks of one job, a resumed run); else two "float64_sgd" runs that sum the same
    gradients in another order, compared by their updates with the bound below."""
    assert a.keys() == b.keys()
    if exact:
        for n in a:
            assert torch.equal(a[n], b[n]), n
        return
    # Plain SGD's update is lr * gradient. Everything upstream of the loss is float64, and the float32 parts
    # (the L1 term's sign / n, the guidance maps' resize) hold the same values per image, so the updates
    # differ by float64 rounding (~1e-16 of their size, times the network's depth) and at most float32
    # rounding of the maps (6e-8 relative): 1e-6 of the largest update bounds both. (Adam would turn a
    # rounding difference in a near-zero gradient component into a step of up to lr.) A wrong gradient (a
    # lost sample, a sum instead of a mean over ranks) changes updates by a sizeable fraction of their size.
    start = fresh_model(dtype=torch.float64).state_dict()
    scale = max(float((b[n] - start[n]).abs().max()) for n in b)
    assert scale > 0
    for n in a:
        torch.testing.assert_close(a[n] - start[n], b[n] - start[n], rtol=0.0, atol=1e-6 * scale, msg=n)


def test_ranks_read_disjoint_shards_reshuffled_every_epoch(runs):
    _, load = runs
    r0, r1 = (steps_of(r["seen"], BATCH) for r in load("straight"))
    assert len(r0) == len(r1) == STEPS
    for s in range(STEPS):
        assert not set(r0[s]) & set(r1[s]), s
    epochs = [sorted(sum(r0[e:e + 2] + r1[e:e + 2], [])) for e in (0, 2)]
    assert epochs[0] == epochs[1] == list(range(8))  # each epoch covers the data once
    assert r0[:2] + r1[:2] != r0[2:] + r1[2:]         # and in another order


def test_gradients_are_averaged_over_the_ranks(runs):
    _, load = runs
    r0, r1 = load("straight")
    assert_params(r0["params"], r1["params"], exact=True)
    assert r0["loss"] == r1["loss"]  # the logged loss is the mean over the ranks
    # Two ranks of 2 images are one process with their 4 images: the same data order, the mean gradient.
    model, seen = single_process({"steps": STEPS, "batch": 2 * BATCH})
    assert [sorted(s) for s in steps_of(seen, 2 * BATCH)] == [sorted(a + b) for a, b in zip(
        steps_of(r0["seen"], BATCH), steps_of(r1["seen"], BATCH))]
    assert_params(model.state_dict(), r0["params"], exact=False)


def test_only_rank_0_writes_one_checkpoint_with_every_ranks_state(runs):
    out, _ = runs
    run_dir = os.path.join(out, "straight")
    assert os.listdir(run_dir) == ["checkpoint.pt"]
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)  # tensors and plain values only
    assert ckpt["step"] == STEPS and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["sampler"] == {"epoch": 1, "offset": 8, "seed": 0}
    assert {"model", "optimizer", "scheduler", "history"} <= ckpt.keys()
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # each rank has its own stream


def test_resume_on_the_same_world_size_is_bit_for_bit(runs):
    _, load = runs
    straight, resumed = load("straight"), load("part")
    for a, b in zip(straight, resumed):
        assert_params(a["params"], b["params"], exact=True)
        assert a["loss"] == b["loss"]
        assert a["seen"][2 * BATCH:] == b["seen"]  # the resumed launch read exactly the batches of steps 3 and 4


def test_resume_on_another_world_size_continues_the_epoch_and_says_so(runs, caplog):
    out, load = runs
    caplog.set_level(logging.WARNING, logger="ssattn.apps.training")
    # The 2-process run stopped at step 2, resumed by one process taking both ranks' images per step.
    model, seen = single_process({"steps": STEPS, "batch": 2 * BATCH}, os.path.join(out, "part-at-2"))
    assert "saved by 2 process(es) on 1" in caplog.text and "bit for bit" in caplog.text
    r0, r1 = load("straight")
    later = [sorted(a + b) for a, b in zip(steps_of(r0["seen"], BATCH), steps_of(r1["seen"], BATCH))][2:]
    assert [sorted(s) for s in steps_of(seen, 2 * BATCH)] == later
    assert_params(model.state_dict(), r0["params"], exact=False)


def test_accumulation_under_ddp_matches_one_process_with_the_whole_batch(runs):
    _, load = runs
    r0, r1 = load("accum")
    assert_params(r0["params"], r1["params"], exact=True)
    model, _ = single_process({"steps": 2, "batch": 4})  # 2 ranks x 2 micro-batches of 1
    assert_params(model.state_dict(), r0["params"], exact=False)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_mixed_precision_under_ddp(runs, amp):
    out, load = runs
    r0, r1 = load(amp)
    assert_params(r0["params"], r1["params"], exact=True)
    assert all(torch.isfinite(torch.tensor(r0["loss"])))
    ckpt = torch.load(os.path.join(out, amp, "checkpoint.pt"), weights_only=True)
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    fresh = fresh_model().state_dict()
    assert any(not torch.equal(fresh[n], r0["params"][n]) for n in fresh)  # it trained


def test_teardown_ends_the_process_groups_threads(runs):
    # Threads of a process group that outlives teardown can free a collective's tensors while the interpreter
    # shuts down, which kills the rank at exit (std::terminate) after a run that succeeded.
    out, _ = runs
    for r in (0, 1):
        with open(os.path.join(out, f"threads-after-teardown.rank{r}.json")) as f:
            names = json.load(f)
        if names is None:
            pytest.skip("this system does not list a process's threads in /proc")
        assert not [n for n in names if "gloo" in n], names


def test_a_skipped_stage_needs_find_unused_parameters_and_says_so(runs):
    _, load = runs
    for rank in load("unused"):  # every rank stops after the first step, with the same message
        assert "2 parameter(s) got no gradient in the first step (idle.weight, idle.bias)" in rank["error"]
        assert "find_unused_parameters=True" in rank["error"]
    r0, r1 = load("unused-found")
    assert r0["error"] is None and len(r0["loss"]) == 1
    assert_params(r0["params"], r1["params"], exact=True)


def test_a_bad_sample_on_one_rank_ends_the_job_naming_the_rank(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("input", "target"):
        os.makedirs(tmp_path / "data" / sub)
    for i in range(4):
        ref = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(ref).save(tmp_path / "data" / "target" / f"{i}.png")
        Image.fromarray((ref * 0.5).astype(np.uint8)).save(tmp_path / "data" / "input" / f"{i}.png")
    # The image rank 1 reads in step 1 (pairs are sorted by name) is not an image. Step 1, not 0: DDP's
    # forward runs a collective of its own in the second step (it rebuilds its buckets), where a rank
    # that failed before its forward would leave the others waiting.
    bad = list(ResumableDistributedSampler(range(4), num_replicas=2, rank=1, seed=0))[1]
    (tmp_path / "data" / "input" / f"{bad}.png").write_bytes(b"not a png")
    proc = torchrun("--no-python", ssattn_command(), "train", "--data", str(tmp_path / "data"),
                    "--out", str(tmp_path / "run"), "--size", "16", "--steps", "2", "--batch-size", "1",
                    "--width", "4", "--levels", "dec3", "--no-progress", "--device", "cpu", "--dist-timeout", "60",
                    timeout=300)
    assert proc.returncode != 0
    assert f"rank 1 of 2 failed at step 1 (samples [{bad}]): ImageLoadError" in proc.stderr, proc.stderr[-4000:]
    assert f"{bad}.png" in proc.stderr
    assert "rank 0 of 2 failed" not in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_ssattn_command_found_on_path_when_not_beside_python(tmp_path, monkeypatch):
    # A Python whose scripts go elsewhere (pip install --user, a system Python): the script is found on PATH.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "ssattn"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(bin_dir))
    assert ssattn_command() == str(script)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(pytest.fail.Exception, match="ssattn command"):
        ssattn_command()
