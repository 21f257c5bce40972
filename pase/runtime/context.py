"""``pase.distributed(plan)``: the process group for a plan, and helpers a training loop needs.

```
with pase.distributed(plan) as run:            # under torchrun (or one process: world of 1)
    model = run.parallelize(model)
    loader = run.data_loader(dataset, batch_size=plan.batch)   # global batch; each rank gets its chunk
    ...
```

The group is ``pase.process_group``'s (NCCL when CUDA devices are visible, gloo otherwise). The context
owns it only when it created it, and then tears it down: drop the models, collect, a barrier bounded by
``timeout_s``, destroy (after an error without the barrier).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from pase.errors import PaseError
from pase.planning.plan import Plan
from pase.process_group import Launch, close_group, open_group, pick_backend
from pase.runtime.checks import check_world
from pase.runtime.parallel import parallelize

TIMEOUT_S = 600.0  # every collective, and the barrier at the end


@dataclass
class Run:
    """One rank of a distributed run of ``plan``."""
    plan: Plan | None
    backend: str
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False
    timeout_s: float = TIMEOUT_S
    models: list[nn.Module] = field(default_factory=list)

    def parallelize(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """``pase.parallelize(model, plan)`` with this run's plan and device."""
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

    def close(self, barrier: bool = True) -> None:
        """Drop the models; leave the process group if this run opened it (``barrier=False`` after an error,
        when some rank may never reach the barrier)."""
        self.models.clear()
        if self.owns_group:
            close_group(self.timeout_s, barrier=barrier)


def _start(plan: Plan | None, backend: str | None, timeout_s: float) -> Run:
    created = not dist.is_initialized()
    if created:  # outside torchrun, a single process is a world of one
        open_group(Launch.from_torchrun() or Launch.local(), backend, timeout_s=timeout_s)
    backend = dist.get_backend()
    rank, world = dist.get_rank(), dist.get_world_size()
    if plan is not None:
        try:
            check_world(plan, world)
        except PaseError:
            if created:
                close_group(timeout_s, barrier=False)
            raise
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Run(plan, backend, rank, world, device, owns_group=created, timeout_s=timeout_s)


@contextmanager
def distributed(plan: Plan | str | Path | None = None, *, backend: str | None = None,
                timeout_s: float = TIMEOUT_S) -> Iterator[Run]:
    """Join (or start) the process group for ``plan`` (a Plan or a plan file); refuse a plan made for
    another world size before any work starts."""
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    run = _start(plan, backend, timeout_s)
    try:
        yield run
    except BaseException:
        run.close(barrier=False)
        raise
    run.close()


__all__ = ["Run", "distributed", "pick_backend"]
