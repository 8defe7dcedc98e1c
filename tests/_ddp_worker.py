"""Launched by tests/test_distributed.py under torchrun: runs ssattn's trainer on tiny random data, one or more runs
per launch, and saves what this rank saw (sample indices per step) and its parameters after each run.

    torchrun --nproc_per_node 2 tests/_ddp_worker.py OUT_DIR RUNS_JSON
RUNS_JSON: a list of {"name", "steps", "batch", "accum", "amp", "stop_at"}; run NAME trains in OUT_DIR/NAME
(resuming a checkpoint found there) and writes OUT_DIR/NAME.rankR.pt.
"""

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def data_tensors(n: int = 8, size: int = 16):
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(n, 3, size, size, generator=g)
    deg = (ref * torch.tensor([0.3, 0.8, 0.9]).view(1, 3, 1, 1) + 0.05 * torch.rand(n, 3, size, size, generator=g))
    return deg.clamp(0, 1), ref, torch.rand(n, 1, size, size, generator=g)


class Recording(torch.utils.data.Dataset):
    """The tensors, read item by item, remembering which items this rank read and in what order."""

    def __init__(self, tensors):
        self.tensors_, self.seen = tensors, []

    def __len__(self):
        return self.tensors_[0].shape[0]

    def __getitem__(self, i):
        self.seen.append(int(i))
        return tuple(t[i] for t in self.tensors_)


def fresh_model():
    from ssattn.models import unet_ss

    torch.manual_seed(0)
    return unet_ss(width=4, levels=("dec3",))


def config(run: dict):
    from ssattn.apps.training import TrainConfig

    return TrainConfig(steps=run["steps"], batch_size=run["batch"], accum=run.get("accum", 1), lr=1e-2,
                       amp=run.get("amp", "none"), progress=False)


def main(out: str, runs: list) -> None:
    from ssattn.apps.distributed import setup, teardown
    from ssattn.apps.training import train

    ctx = setup("cpu", timeout_s=120)
    for run in runs:
        data = Recording(data_tensors())
        model = fresh_model()
        hist = train(model, data, config(run), os.path.join(out, run["name"]), stop_at=run.get("stop_at"))
        torch.save({"seen": data.seen, "params": model.state_dict(), "loss": hist["loss"]},
                   os.path.join(out, f"{run['name']}.rank{ctx.rank}.pt"))
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
