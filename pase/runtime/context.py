"""``pase.distributed(plan)``: the process group for a plan, and helpers a training loop needs.

```
with pase.distributed(plan) as run:            # under torchrun (or one process: world of 1)
    model = run.parallelize(model)
    loader = run.data_loader(dataset)   # each rank its chunk of the plan's batch per micro-step
    ...
```

The group is ``pase.process_group``'s (NCCL when CUDA devices are visible, gloo otherwise). The context
owns it only when it created it, and then tears it down: drop the models, collect, a barrier bounded by
``timeout_s``, destroy (after an error without the barrier).
"""
from __future__ import annotations

import contextlib
import copy
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
from pase.process_group import Launch, close_group, leaving_group, open_group, pick_backend
from pase.runtime.accumulation import gradient_sync_paused
from pase.runtime.checks import check_world, meta_copy
from pase.runtime.parallel import parallelize
from pase.runtime.state import full_state_dict

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
    # per parallelized model: the original's structure on the meta device and its non-persistent buffers
    _originals: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)

    def parallelize(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """``pase.parallelize(model, plan)`` with this run's plan and device."""
        if self.plan is None:
            raise PaseError("this run has no plan: open it with pase.distributed(plan)")
        persistent = set(model.state_dict())
        transient = {name: buffer.detach().clone() for name, buffer in model.named_buffers() if name not in persistent}
        original = meta_copy(model)  # before parallelize replaces or shards its modules
        result = parallelize(model, self.plan, device=self.device, **kwargs)
        self.models.append(result)
        self._originals[id(result)] = (original, transient)
        return result

    def _parallel(self, model: nn.Module | None) -> nn.Module:
        if model is not None:
            return model
        if not self.models:
            raise PaseError("this run has parallelized no model yet: call run.parallelize(model) first")
        return self.models[-1]

    def state_dict(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The model's (default: the last parallelized) whole state dict at full size under its original names, on
        every rank: FSDP, channel and pipeline shards gathered, so ``torch.save`` / ``save_pretrained``-style
        writers get tensors a single process loads. A collective: every rank calls it."""
        return full_state_dict(self._parallel(model))

    @contextmanager
    def unwrap(self, model: nn.Module | None = None, rank: int = 0) -> Iterator[nn.Module | None]:
        """A plain copy of the model (default: the last parallelized) with its full weights, on ``rank`` alone (the
        others get None), e.g. to draw validation images there. Every rank enters the block: the weights are
        gathered on the way in, and the other ranks wait at the end of the block (within the run's timeout) instead
        of in a collective rank ``rank`` never joins."""
        parallel = self._parallel(model)
        if id(parallel) not in self._originals:
            raise PaseError("run.unwrap takes a model that this run parallelized")
        state = full_state_dict(parallel)
        plain = None
        if self.rank == rank:
            original, transient = self._originals[id(parallel)]
            plain = copy.deepcopy(original).to_empty(device=self.device)
            plain.load_state_dict(state, strict=True)
            for name, value in transient.items():
                plain.get_buffer(name).copy_(value)
        del state
        try:
            yield plain
        finally:
            del plain
            if self.world_size > 1:
                dist.barrier()

    @property
    def local_batch(self) -> int:
        """This rank's samples per forward: its chunk of one micro-step's global batch."""
        if self.plan is None:
            raise PaseError("this run has no plan, so no batch: pass batch_size")
        return self.plan.micro_batch // self.world_size

    @property
    def micro_steps(self) -> int:
        """Forward/backward passes per optimizer step (the plan's gradient accumulation; 1: none)."""
        return self.plan.micro_steps if self.plan is not None else 1

    def accumulating(self, model: nn.Module | None = None, micro_step: int = 0) -> contextlib.AbstractContextManager:
        """Wrap micro-step ``micro_step`` (0 to ``micro_steps - 1``) of an optimizer step: every one but the last
        adds its gradients locally without synchronising them (DDP's ``no_sync``, a tensor plan's paused gradient
        sync), as the plan priced; the last synchronises the sums. Divide each micro-step's loss by
        ``micro_steps`` so that the sum is the step's mean::

            for k in range(run.micro_steps):
                with run.accumulating(model, k):
                    (loss_fn(model(next(batches))) / run.micro_steps).backward()
            optimizer.step()
        """
        if not 0 <= micro_step < self.micro_steps:
            raise PaseError(f"micro_step {micro_step}: the plan runs micro-steps 0 to {self.micro_steps - 1}")
        if micro_step == self.micro_steps - 1:
            return contextlib.nullcontext()
        return gradient_sync_paused(self._parallel(model))

    def data_loader(self, dataset: Any, batch_size: int | None = None, *, shuffle: bool = True, seed: int = 0,
                    **kwargs: Any) -> torch.utils.data.DataLoader:
        """A loader giving this rank its chunk of each global batch of ``batch_size`` (default: the plan's batch per
        micro-step; a step takes ``micro_steps`` of them)."""
        batch_size = batch_size or (self.plan.micro_batch if self.plan else None)
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
        when some rank may never reach the barrier). ``pase.distributed`` does this itself on leaving its block."""
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
    another world size before any work starts. A group it started reports rank failures as ``pase.rank_faults``
    does: a failing rank's error reaches the others, which stop with ``PeerFailure`` naming it."""
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    run = _start(plan, backend, timeout_s)
    with leaving_group(timeout_s) if run.owns_group else contextlib.nullcontext():  # a group it started it ends
        try:
            yield run
        finally:
            run.models.clear()


__all__ = ["Run", "distributed", "pick_backend"]
