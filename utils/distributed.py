"""torch.distributed for training under torchrun: the process group, data sharding, and the few collectives the
platform needs (gathers, flags, means); with one process the same calls run without torch.distributed."""

import logging
import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from utils.errors import UserError

logger = logging.getLogger(__name__)
HOST_GROUP = {"group": None}  # the process group of any_process: None, the default one, except under NCCL


class ResumableDistributedSampler(DistributedSampler):
    """torch's DistributedSampler (the same order for the same seed and epoch), plus:
    - training (`pad=True`): `start_epoch(epoch, samples_done)` leaves out the first `samples_done` samples of the
      epoch's global order, which the processes of a run (any number, any batch size) consumed together: process
      r of R takes the rest's samples r, r + R, ... (the tail that R does not divide is dropped), so a run resumed
      with another --batch_size or number of processes sees each sample of the epoch once. It yields (index,
      item seed) pairs for SeededItems: the seed depends only on (seed, epoch, index);
    - evaluation (`pad=False`): process r takes samples r, r + R, r + 2R, ... in order, so the shards are disjoint
      and cover the dataset exactly once (DistributedSampler pads with repeats instead)."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int, drop_last: bool, pad: bool):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.pad, self.samples_done = pad, 0

    def start_epoch(self, epoch: int, samples_done: int = 0) -> None:
        self.set_epoch(epoch)
        self.samples_done = samples_done

    def __iter__(self):
        if not self.pad:
            return iter(range(self.rank, len(self.dataset), self.num_replicas))
        order = torch.arange(len(self.dataset))
        if self.shuffle:
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        remaining = order[self.samples_done:]
        usable = len(remaining) // self.num_replicas * self.num_replicas
        indices = remaining[self.rank:usable:self.num_replicas]
        # the epoch's first item seed, 62 bits from (seed, epoch), plus the index: distinct within an epoch
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0]) >> 2
        return zip(indices.tolist(), (indices + epoch_seed).tolist(), strict=True)

    def __len__(self) -> int:
        if not self.pad:
            return len(range(self.rank, len(self.dataset), self.num_replicas))
        return max(0, len(self.dataset) - self.samples_done) // self.num_replicas


class SeededItems(Dataset):
    """A training dataset read by (index, item seed) keys (ResumableDistributedSampler's): item `index`, with
    torch's CPU generator seeded by the item seed while it is made, and restored after. Its random augmentation
    then depends only on (seed, epoch, index), not on which worker made it, how many there are or what they made
    before, so persistent workers keep a resumed run exact. (Augmentation must draw from torch's generator, as
    torchvision's transforms do.)"""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple):
        index, item_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(item_seed)  # the CPU's only: CUDA's streams are left alone
            return self.dataset[index]


def distributed_world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on at least one (e.g. a stop signal that reached one process).
    A host value, reduced on the CPU: in the default group under gloo, in a gloo side group under NCCL (made by
    init_distributed), so that train.py's check after every step does not wait for the GPU's queued work."""
    if not distributed_world():
        return flag
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=HOST_GROUP["group"])
    return bool(value.item())


def loss_normalizer(local_sum: torch.Tensor) -> torch.Tensor:
    """What a process divides its summed loss by: max(the sum of local_sum over all processes, 1) / the number of
    processes (no gradient flows through it). DDP averages the processes' gradients; with this normalizer that
    average is the gradient of one process that holds the global batch and divides by max(its sum, 1). (The mean
    over processes clamped at 1 would not be: with a global sum of 1.5 over 2 processes it divides by 1, not 0.75.)"""
    if not distributed_world():
        return local_sum.detach().clamp(min=1)
    total = local_sum.detach().clone()
    dist.all_reduce(total)
    return total.clamp(min=1) / dist.get_world_size()


def gather_to_main(items: list) -> list:
    """All processes' lists concatenated in rank order on rank 0 (an empty list elsewhere); the list itself
    without torch.distributed."""
    if not distributed_world():
        return items
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if dist.get_rank() == 0 else []


def gather_array_to_main(array: np.ndarray) -> np.ndarray:
    """All processes' (N_r, K) arrays concatenated in rank order on rank 0 ((0, K) elsewhere), sent as tensors
    (padded to the longest; no pickling); the array itself without torch.distributed."""
    if not distributed_world():
        return array
    device, rank, world_size = collective_device(), dist.get_rank(), dist.get_world_size()
    length = torch.tensor([len(array)], device=device)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    lengths = torch.cat(lengths).tolist()
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    padded = tensor.new_zeros((max(1, *lengths), *tensor.shape[1:]))  # at least one row: no empty messages
    padded[:len(tensor)] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size)] if rank == 0 else None
    dist.gather(padded, gathered, dst=0)
    if rank != 0:
        return array[:0]
    return torch.cat([part[:n] for part, n in zip(gathered, lengths, strict=True)]).cpu().numpy()


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
    max_restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if max_restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise UserError(f"torchrun --max_restarts {max_restarts}: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
                        f"torchrun's environment (run_train_ddp.sh and run_train_multinode.sh do), else restarted "
                        f"workers can read the dead workers' addresses from torchrun's shared store and fail to "
                        f"connect (PyTorch issue 135712)")
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "gloo"
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"--ddp 1: {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this node but "
                            f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if backend == "nccl":  # host flags (any_process) travel through gloo, off the GPU's stream
        HOST_GROUP["group"] = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_world_size(), dist.get_rank(), local_rank


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """The model with its BatchNorm layers synchronized across processes (statistics over the global batch);
    torch's SyncBatchNorm runs on CUDA only, so on the CPU the model is returned as it is, with a warning."""
    if device.type != "cuda":
        logger.warning("config.distributed.sync_batchnorm ignored: SyncBatchNorm needs CUDA (training on the %s)",
                       device.type)
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # and every other group
    HOST_GROUP["group"] = None
