"""``pase.distributed(plan)``: the process group for a plan, and helpers a training loop needs.

```
with pase.distributed(plan) as run:            # under torchrun (or one process: world of 1)
    model = run.parallelize(model)
    loader = run.data_loader(dataset, batch_size=plan.batch)   # global batch; each rank gets its chunk
    ...
```

The backend is NCCL when CUDA devices are visible, gloo otherwise. The context owns the process
group only when it created it, and tears it down in the order that avoids gloo's exit hang
(reference/cpu_feasibility.md 4b: drop DDP, collect, barrier, destroy).
"""
from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pase.errors import PaseError
from pase.planning.plan import Plan


def pick_backend() -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"


@dataclass
class Run:
    """One rank of a distributed run of ``plan``."""

    plan: Plan | None
    backend: str
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False
    models: list[nn.Module] = field(default_factory=list)

    def parallelize(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """``pase.parallelize(model, plan)`` with this run's plan and device."""
        from pase.runtime.parallel import parallelize

        if self.plan is None:
            raise PaseError("this run has no plan: open it with pase.distributed(plan)")
        result = parallelize(model, self.plan, device=self.device, **kwargs)
        self.models.append(result)
        return result

    @property
    def local_batch(self) -> int:
        if self.plan is None:
            raise PaseError("this run has no plan, so no batch: pass batch_size")
        return self.plan.batch // self.world_size

    def data_loader(self, dataset: Any, batch_size: int | None = None, *, shuffle: bool = True, seed: int = 0,
                    **kwargs: Any) -> torch.utils.data.DataLoader:
        """A loader giving this rank its chunk of each global batch of ``batch_size`` (default: the plan's)."""
        from torch.utils.data import DataLoader, DistributedSampler

        batch_size = batch_size or (self.plan.batch if self.plan else None)
        if not batch_size or batch_size % self.world_size:
            raise PaseError(f"the global batch {batch_size} must be a positive multiple of the {self.world_size} "
                            "ranks")
        sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle,
                                     seed=seed, drop_last=True)
        return DataLoader(dataset, batch_size=batch_size // self.world_size, sampler=sampler, drop_last=True,
                          **kwargs)

    def mean(self, value: torch.Tensor | float) -> float:
        """The mean of a per-rank scalar over all ranks (e.g. the global batch's loss)."""
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def close(self) -> None:
        self.models.clear()
        gc.collect()
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _start(plan: Plan | None, backend: str | None, timeout_s: float) -> Run:
    created = False
    if not dist.is_initialized():
        backend = backend or pick_backend()
        if "RANK" not in os.environ:  # a single process outside torchrun: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        created = True
    backend = dist.get_backend()
    rank, world = dist.get_rank(), dist.get_world_size()
    if plan is not None:
        from pase.runtime.checks import check_world

        try:
            check_world(plan, world)
        except PaseError:
            if created:
                dist.destroy_process_group()
            raise
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Run(plan, backend, rank, world, device, owns_group=created)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def distributed(plan: Plan | str | Path | None = None, *, backend: str | None = None,
                timeout_s: float = 600.0) -> Iterator[Run]:
    """Join (or start) the process group for ``plan`` (a Plan or a plan file); refuse a plan made for
    another world size before any work starts."""
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    run = _start(plan, backend, timeout_s)
    try:
        yield run
    finally:
        run.close()


__all__ = ["Run", "distributed", "pick_backend"]
