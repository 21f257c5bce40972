"""Splitting one batched network call across ranks: every rank holds the model, evaluates its slice
of the rows (a ParaDiGMS window, SRDS blocks, or samples), and all-gathers the results.

All ranks run the same sampler loop on the same tensors; since the gathered outputs are bitwise
identical everywhere, every rank takes the same decisions (window slides, convergence) without
further messages. Rows stay whole, so a classifier-free-guidance pair (doubled inside the
denoiser) always travels together. Calls with fewer rows than ranks are computed replicated on
every rank: no communication, the same bits everywhere.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pase.process_group import DEFAULT_TIMEOUT_S, Launch, leaving_group, open_group
from pase.sampling.denoiser import Denoiser


@dataclass
class EvalStats:
    """Counters of the network calls a sampler made."""

    passes: int = 0  # sequential batched calls (the latency-critical path)
    rows: int = 0  # state-rows evaluated in total (x2 network batch under CFG), over all ranks
    rows_per_pass: list[int] = field(default_factory=list)
    compute_seconds: float = 0.0  # this rank's time inside the network
    gather_seconds: float = 0.0  # this rank's time in all_gather (including waiting for slower ranks)

    def timing(self) -> dict[str, float]:
        return {"compute_seconds": self.compute_seconds, "gather_seconds": self.gather_seconds}


class Evaluator:
    """``evaluator(x, t)`` = ``denoiser(x, t)``, with the rows split over the process group."""

    def __init__(self, denoiser: Denoiser, group: dist.ProcessGroup | None = None, split: bool = True) -> None:
        """``split=False`` keeps every call on this rank (a rank sampling its own samples)."""
        self.denoiser = denoiser
        self.group = group
        distributed = split and dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.stats = EvalStats()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        self.stats.passes += 1
        self.stats.rows += rows
        self.stats.rows_per_pass.append(rows)
        if self.world == 1 or rows < self.world:
            return self._compute(x, t)
        bounds = _split_bounds(rows, self.world)
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        local = self._compute(x[lo:hi], t[lo:hi])
        chunk = bounds[1] - bounds[0]  # the largest slice; all_gather needs equal sizes
        padded = torch.zeros((chunk, *x.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: hi - lo] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        started = time.perf_counter()
        dist.all_gather(parts, padded, group=self.group)
        self.stats.gather_seconds += time.perf_counter() - started
        return torch.cat([part[: bounds[r + 1] - bounds[r]] for r, part in enumerate(parts)])

    def _compute(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = self.denoiser(x, t)
        self.stats.compute_seconds += time.perf_counter() - started
        return out

    def reset(self) -> EvalStats:
        stats, self.stats = self.stats, EvalStats()
        return stats


def _split_bounds(rows: int, world: int) -> list[int]:
    """Row boundaries of ``world`` contiguous slices, largest first (as ``tensor_split``)."""
    base, extra = divmod(rows, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


def gather_samples(local: torch.Tensor, total: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Batch-parallel sampling's final step: each rank's samples, concatenated in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return local
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    bounds = _split_bounds(total, world)
    chunk = bounds[1] - bounds[0]
    padded = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: bounds[rank + 1] - bounds[rank]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[: bounds[r + 1] - bounds[r]] for r, part in enumerate(parts)])


def local_slice(total: int, group: dist.ProcessGroup | None = None) -> slice:
    """This rank's contiguous share of ``total`` items."""
    if not (dist.is_available() and dist.is_initialized()):
        return slice(0, total)
    bounds = _split_bounds(total, dist.get_world_size(group))
    rank = dist.get_rank(group)
    return slice(bounds[rank], bounds[rank + 1])


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes (``pase.process_group``: gloo on CPU, NCCL with CUDA); False
    when not launched by torchrun. ``session`` pairs it with the teardown."""
    launch = Launch.from_torchrun()
    if launch is None or launch.world_size <= 1 or dist.is_initialized():
        return dist.is_initialized()
    open_group(launch, timeout_s=timeout_s)
    return True


@contextmanager
def session(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[bool]:
    """``init_from_env`` for the block (yielding whether there is a process group), then leave the group as
    ``pase.process_group.leaving_group`` does (no barrier after an error)."""
    joined = init_from_env(timeout_s)
    with leaving_group(timeout_s):
        yield joined


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
