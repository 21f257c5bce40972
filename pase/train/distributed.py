"""torch.distributed for the training loop: gloo on CPU, NCCL on GPU, chosen from the machine.

Under ``torchrun`` (WORLD_SIZE > 1) ``distributed_session`` joins the process group from the
environment; alone it runs as a world of one without a process group. Teardown is explicit:
a barrier, then ``destroy_process_group`` (gloo can hang at exit without it).
"""
from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pase.errors import PaseError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@contextmanager
def distributed_session(timeout_s: float = 1800) -> Iterator[DistEnv]:
    """Join (and at the end leave) the torchrun process group; a world of one needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank)
    if world == 1 or dist.is_initialized():
        backend = dist.get_backend() if dist.is_initialized() else None
        yield DistEnv(dist.get_rank() if backend else 0, dist.get_world_size() if backend else 1, local_rank,
                      device, backend)
        return
    if "MASTER_ADDR" not in os.environ:
        raise PaseError(f"WORLD_SIZE is {world} but MASTER_ADDR is not set: launch with torchrun "
                        "(torchrun --nproc-per-node N -m pase ...)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield DistEnv(rank, world, local_rank, device, backend)
        gc.collect()  # drop DDP wrappers before the group goes (avoids a gloo hang at exit)
        dist.barrier()
    finally:  # after an error no barrier: the other ranks may never reach it (torchrun stops them)
        dist.destroy_process_group()
