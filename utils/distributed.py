"""Data sharding across processes (torch.distributed); with one process the same code runs unsharded."""

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from utils.errors import UserError


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


def init_distributed(ddp: bool, timeout_s: float) -> tuple:
    """(world_size, rank, local_rank): one process without --ddp; under torchrun, the process group is set up from
    torchrun's environment (NCCL with CUDA, one GPU per local rank; gloo on the CPU)."""
    if not ddp:
        return 1, 0, 0
    missing = [name for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if name not in os.environ]
    if missing:
        raise UserError(f"--ddp 1 needs torchrun's environment ({', '.join(missing)} unset): launch with "
                        f"'torchrun --nproc_per_node N train.py --ddp 1 ...' (see README, Distributed training)")
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "gloo"
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"--ddp 1: {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this node but "
                            f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_world_size(), dist.get_rank(), local_rank


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_process_first(world_size: int, rank: int):
    """Rank 0 runs the block first (e.g. generating a dataset or building a cache) while the others wait."""
    if world_size > 1 and rank != 0:
        dist.barrier()
    yield
    if world_size > 1 and rank == 0:
        dist.barrier()
