"""A DistributedSampler that can start an epoch part-way, so a resumed run continues mid-epoch on any world size.

Every epoch has one global order, `randperm(n)` seeded by (seed + epoch),
exactly DistributedSampler's, whatever the number of ranks. Rank r of W reads
the order from `start` on, taking every W-th sample (DistributedSampler with
drop_last=True, whose behaviour this is for start=0). Training steps that
consume W * k samples of the order advance `start` by W * k, so:

- with the same world size, a run resumed at `start` draws exactly the
  batches the uninterrupted run would have drawn;
- with another world size, it draws the rest of the same epoch order (no
  sample of the epoch is repeated or skipped), shared out among the new ranks.
"""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch (its order) and the position in that order where this pass begins."""
        if not 0 <= start <= len(self.dataset):
            raise ValueError(f"start must lie in [0, {len(self.dataset)}], got {start}")
        super().set_epoch(epoch)
        self.start = int(start)

    def epoch_order(self) -> torch.Tensor:
        """This epoch's order of all samples: the same on every rank and for every world size."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g)

    def __len__(self) -> int:
        return (len(self.dataset) - self.start) // self.num_replicas

    def __iter__(self):
        order = self.epoch_order()[self.start:]
        usable = len(self) * self.num_replicas  # an even share per rank; the tail of the epoch is dropped
        return iter(order[self.rank:usable:self.num_replicas].tolist())
