"""torch.distributed for the training loop, through ``pase.process_group`` (gloo on CPU, NCCL on GPU).

Under ``torchrun`` (WORLD_SIZE > 1) ``distributed_session`` joins the process group from the
environment; alone it runs as a world of one without a process group. Teardown is explicit:
a barrier bounded by the timeout, then ``destroy_process_group`` (gloo can hang at exit without it).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pase.process_group import DEFAULT_TIMEOUT_S, Launch, pick_device, process_group


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


@contextmanager
def distributed_session(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistEnv]:
    """Join (and at the end leave) the torchrun process group; a world of one needs none."""
    launch = Launch.from_torchrun() or Launch()
    if dist.is_initialized():
        yield DistEnv(dist.get_rank(), dist.get_world_size(), launch.local_rank, pick_device(launch.local_rank),
                      dist.get_backend())
        return
    if launch.world_size == 1:
        yield DistEnv(0, 1, launch.local_rank, pick_device(launch.local_rank), None)
        return
    with process_group(launch, timeout_s=timeout_s) as device:
        yield DistEnv(launch.rank, launch.world_size, launch.local_rank, device, dist.get_backend())
