"""Launched by tests/test_distributed.py under torchrun: runs ssattn's trainer on tiny random data, one or more runs
per launch, and saves what this rank saw (sample indices per step) and its parameters after each run.

    torchrun --nproc_per_node 2 tests/_ddp_worker.py OUT_DIR RUNS_JSON
RUNS_JSON: a list of {"name", "steps", "batch", "accum", "amp", "stop_at", "unused", "find_unused", "float64_sgd"}; run
NAME trains in OUT_DIR/NAME (resuming a checkpoint found there) and writes OUT_DIR/NAME.rankR.pt. A "float64_sgd" run
trains in float64 with plain SGD, so that it can be compared with a single process up to rounding (see
tests/test_distributed.py's assert_params).
"""

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def data_tensors(n: int = 8, size: int = 16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(n, 3, size, size, generator=g)
    deg = (ref * torch.tensor([0.3, 0.8, 0.9]).view(1, 3, 1, 1) + 0.05 * torch.rand(n, 3, size, size, generator=g))
    return tuple(t.to(dtype) for t in (deg.clamp(0, 1), ref, torch.rand(n, 1, size, size, generator=g)))


class Recording(torch.utils.data.Dataset):
    """The tensors, read item by item, remembering which items this rank read and in what order."""

    def __init__(self, tensors):
        self.tensors_, self.seen = tensors, []

    def __len__(self):
        return self.tensors_[0].shape[0]

    def __getitem__(self, i):
        self.seen.append(int(i))
        return tuple(t[i] for t in self.tensors_)


def dtype(run: dict):
    return torch.float64 if run.get("float64_sgd") else torch.float32


def fresh_model(unused: bool = False, dtype=torch.float32):
    from ssattn.models import unet_ss

    torch.manual_seed(0)
    model = unet_ss(width=4, levels=("dec3",))
    if unused:  # a stage this model never runs: DDP must be told (find_unused_parameters)
        model.idle = torch.nn.Linear(2, 2)
    return model.to(dtype)


def config(run: dict):
    from ssattn.apps.training import TrainConfig

    return TrainConfig(steps=run["steps"], batch_size=run["batch"], accum=run.get("accum", 1), lr=1e-2,
                       amp=run.get("amp", "none"), find_unused_parameters=run.get("find_unused", False),
                       optimizer="sgd" if run.get("float64_sgd") else "adam", progress=False)


def main(out: str, runs: list) -> None:
    from ssattn.apps.distributed import setup, teardown
    from ssattn.apps.training import train
    from ssattn.apps.training.trainer import RankFailure

    ctx = setup("cpu", timeout_s=120)
    for run in runs:
        data = Recording(data_tensors(dtype=dtype(run)))
        model = fresh_model(run.get("unused", False), dtype(run))
        try:
            hist, error = train(model, data, config(run), os.path.join(out, run["name"]), stop_at=run.get("stop_at")), None
        except RankFailure as exc:
            hist, error = {"loss": []}, str(exc)
        torch.save({"seen": data.seen, "params": model.state_dict(), "loss": hist["loss"], "error": error},
                   os.path.join(out, f"{run['name']}.rank{ctx.rank}.pt"))
    teardown()
    with open(os.path.join(out, f"threads-after-teardown.rank{ctx.rank}.json"), "w") as f:
        json.dump(thread_names(), f)


def thread_names() -> list[str] | None:
    """This process's threads by name (Linux's /proc), None where /proc does not list them."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    names = []
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(names)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
