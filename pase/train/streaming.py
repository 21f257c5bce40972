"""Batches streamed from a map-style data set: ``DistributedSampler`` epochs, ``DataLoader`` workers.

Each data-parallel rank takes its part of every epoch from a ``DistributedSampler`` (shuffled with the
run's seed, the epoch advanced with ``set_epoch``, the remainder dropped so that every rank takes as many
batches); a step's batch is the rank's next ``batch_per_rank`` indices. The schedule is a function of the
step number, so a run resumed at step ``s`` starts at the same epoch and position without reading the
batches before it. Workers read and decode (images, token ids, cached tensors); ``transform`` then runs in
the training process on its device (the frozen encoders), batch by batch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pase.train.data import DataError, LoaderFactory

Transform = Callable[[dict[str, Any]], dict[str, torch.Tensor]]


def _sampler(dataset: Dataset, dp_rank: int, dp_size: int, seed: int) -> DistributedSampler:
    return DistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=seed, drop_last=True)


def steps_per_epoch(dataset: Dataset, batch_per_rank: int, dp_size: int) -> int:
    steps = len(_sampler(dataset, 0, dp_size, 0)) // batch_per_rank
    if steps == 0:
        raise DataError(f"the data has {len(dataset)} items, fewer than one global batch of "  # type: ignore[arg-type]
                        f"{batch_per_rank * dp_size}; use a smaller --batch or more data")
    return steps


def batch_indices(dataset: Dataset, batch_per_rank: int, dp_rank: int, dp_size: int, seed: int,
                  start_step: int) -> Iterator[list[int]]:
    """This rank's indices for steps ``start_step, start_step + 1, ...`` (endless; epochs advance)."""
    sampler = _sampler(dataset, dp_rank, dp_size, seed)
    epoch_steps = steps_per_epoch(dataset, batch_per_rank, dp_size)
    epoch, skip = divmod(start_step, epoch_steps)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for step in range(skip, epoch_steps):
            yield order[step * batch_per_rank:(step + 1) * batch_per_rank]
        epoch, skip = epoch + 1, 0


def row_seed(seed: int, epoch: int, item: int) -> int:
    """The seed of one sample's random draws: a function of the run, the epoch and the item only (an item comes
    once per epoch), so the draws do not depend on how the epoch is cut into batches or micro-batches."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + item) % 2**63


class _Indexed(Dataset):
    """A data set of dicts read by ``(index, row seed)`` keys, whose items also carry their seed (collated into the
    batch's ``seed``); a data set with a ``sample(index, seed)`` method (random crops and flips) gets the seed."""
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        sample = getattr(self.dataset, "sample", None)
        item = sample(index, seed) if sample is not None else self.dataset[index]
        return {**item, "seed": seed}


def _seeded(schedule: Iterator[list[int]], seed: int, start_step: int, epoch_steps: int
            ) -> Iterator[list[tuple[int, int]]]:
    """Each batch of indices as ``(index, row_seed)`` keys."""
    for step, indices in enumerate(schedule, start=start_step):
        epoch = step // epoch_steps
        yield [(int(i), row_seed(seed, epoch, int(i))) for i in indices]


def streamed(transform: Transform | None = None, workers: int = 2) -> LoaderFactory:
    """A loop ``loader`` for map-style data sets of dicts: ``batch_indices`` through a ``DataLoader`` with
    ``workers`` processes, each collated batch passed through ``transform`` (None: as collated) and given
    ``seeds``, one per row (``row_seed``), for the objective's per-sample draws."""
    def factory(dataset: Any, batch_per_rank: int, dp_rank: int, dp_size: int, seed: int,
                start_step: int) -> Iterator[Any]:
        schedule = batch_indices(dataset, batch_per_rank, dp_rank, dp_size, seed, start_step)
        epoch_steps = steps_per_epoch(dataset, batch_per_rank, dp_size)
        keys = _seeded(iter(schedule), seed, start_step, epoch_steps)
        loader = DataLoader(_Indexed(dataset), batch_sampler=keys, num_workers=workers,  # type: ignore[arg-type]
                            persistent_workers=False, prefetch_factor=2 if workers else None)
        for batch in loader:
            seeds = batch.pop("seed").to(torch.int64)  # the keys' row seeds, drawn once per row in _seeded
            out = transform(batch) if transform is not None else batch
            yield {**out, "seeds": seeds}

    return factory


__all__ = ["batch_indices", "row_seed", "steps_per_epoch", "streamed"]
