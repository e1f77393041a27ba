"""Data sharding across processes (torch.distributed); with one process the same code runs unsharded."""

import torch.distributed as dist
from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """torch's DistributedSampler, plus:
    - `skip`: the number of this process's samples of the current epoch to leave out, to resume mid-epoch in the
      same order (the order depends only on the seed and the epoch);
    - `pad=False`, for evaluation: process r takes samples r, r + R, r + 2R, ... in order, so the shards are
      disjoint and cover the dataset exactly once (DistributedSampler pads with repeats instead)."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int, drop_last: bool, pad: bool):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.pad, self.skip = pad, 0

    def __iter__(self):
        indices = list(super().__iter__()) if self.pad else list(range(self.rank, len(self.dataset), self.num_replicas))
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        total = self.num_samples if self.pad else len(range(self.rank, len(self.dataset), self.num_replicas))
        return max(0, total - self.skip)


def gather_to_main(items: list) -> list:
    """All processes' lists concatenated in rank order on rank 0 (an empty list elsewhere); the list itself
    without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if dist.get_rank() == 0 else []
