"""torchrun's environment as (rank, world size, device), and the process group that goes with it.

`torchrun --nproc_per_node N --no-python ssattn COMMAND ...` starts N copies of
the command with RANK, WORLD_SIZE and LOCAL_RANK set; each copy calls `setup`
once. The backend follows the device: NCCL on CUDA, gloo on CPU. The process
group gets a timeout so that a rank that stops answering ends the job with an
error instead of hanging the others.
"""

from __future__ import annotations

import datetime
import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None, *, timeout_s: float = 600.0) -> Context:
    """Read torchrun's environment, pick this rank's device, and initialise the process group when WORLD_SIZE > 1.

    device: None or "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), or a device name.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        dev = torch.device(f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # torch.distributed.nn binds group.WORLD as its functions' default group when it is imported, and DDP
        # imports it (through torch._dynamo). Imported after the group exists, it would hold the group to the
        # end of the interpreter: destroy_process_group() would leave gloo's threads running, and they could
        # free a collective's Python-owned tensors during interpreter shutdown (a crash at exit). Imported
        # now, its defaults are None.
        importlib.import_module("torch.distributed.nn")

        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=float(timeout_s)))
    return Context(rank, world, local, dev)


def current(device: torch.device) -> Context:
    """The Context of an already initialised process group (or of a single process)."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)
    return Context(0, 1, 0, device)


def teardown() -> None:
    """Destroy the process group (setup's): its backend's threads end here, while the interpreter still runs."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
