"""DeMe, Decouple-Then-Merge (Ma et al., CVPR 2025): one fine-tune per timestep range, then a task-vector merge.

Decouple: [0, T) is cut into N ranges; each range r fine-tunes its own copy theta_r of the pretrained
theta with (a) timesteps drawn from all of [0, T) with probability P and from the range otherwise
(optionally in antithetic pairs), (b) a consistency loss lambda * ||eps_r(x_t, t) - eps_theta(x_t, t)||^2
against the frozen pretrained model, (c) optional identity-initialised 1x1 channel projections after
every down block, the mid block and every up block. Merge: theta + sum_r w_r (theta_r - theta), with
given weights or a grid search scored by a callback (default: denoising loss on held-out data).

As a parallel strategy the world is split into N groups (or, with fewer processes than ranges, each
process takes several ranges one after another); a group trains its range with data parallelism
inside the group and never talks to the others until the merge, where each group's leader sends its
weights to rank 0. Each range's randomness depends only on (seed, range), so the result is the same
whatever the grouping.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pase.errors import PaseError

Range = tuple[int, int]
StateDict = dict[str, torch.Tensor]


class DeMeError(PaseError):
    """A DeMe setting that cannot work (ranges, weights, groups)."""


@dataclass(frozen=True)
class DeMeConfig:
    ranges: tuple[Range, ...]
    p_global: float = 0.3
    antithetic: bool = False
    consistency: float = 1.0
    adapters: bool = False
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        check_ranges(self.ranges, self.num_train_timesteps)
        if not 0.0 <= self.p_global <= 1.0:
            raise DeMeError(f"--p-global {self.p_global} is a probability: use a value in [0, 1] (the paper: 0.3)")
        if self.consistency < 0:
            raise DeMeError(f"--consistency {self.consistency} must be >= 0 (the paper: 1.0)")


def uniform_ranges(count: int, num_train_timesteps: int = 1000) -> tuple[Range, ...]:
    if not 1 <= count <= num_train_timesteps:
        raise DeMeError(f"--ranges {count}: use 1 to {num_train_timesteps} timestep ranges (the paper: 4 or 8)")
    bounds = [round(i * num_train_timesteps / count) for i in range(count + 1)]
    return tuple(zip(bounds[:-1], bounds[1:]))


def parse_bounds(text: str, num_train_timesteps: int = 1000) -> tuple[Range, ...]:
    """``0,100,400,1000`` -> ((0, 100), (100, 400), (400, 1000))."""
    try:
        bounds = [int(part) for part in text.split(",")]
    except ValueError:
        raise DeMeError(f"--range-bounds {text!r}: give increasing integers from 0 to T, e.g. 0,250,500,1000") from None
    ranges = tuple(zip(bounds[:-1], bounds[1:]))
    check_ranges(ranges, num_train_timesteps)
    return ranges


def check_ranges(ranges: Sequence[Range], num_train_timesteps: int) -> None:
    if not ranges or ranges[0][0] != 0 or ranges[-1][1] != num_train_timesteps or \
            any(lo >= hi for lo, hi in ranges) or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        raise DeMeError(f"timestep ranges {list(ranges)} must be non-empty, contiguous and cover [0, "
                        f"{num_train_timesteps}) in increasing order")


# ---------------------------------------------------------------- sampling and loss
@dataclass(frozen=True)
class RangeSampler:
    """Timesteps for range [lo, hi): each sample comes from all of [0, T) with probability ``p_global``.

    Antithetic: the second half of the batch mirrors the first inside the interval each was drawn
    from (t -> lo + hi - 1 - t in the range, t -> T - 1 - t globally)."""

    low: int
    high: int
    p_global: float
    num_train_timesteps: int = 1000
    antithetic: bool = False

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        drawn = (batch + 1) // 2 if self.antithetic else batch
        is_global = torch.rand(drawn, generator=generator) < self.p_global
        in_range = torch.randint(self.low, self.high, (drawn,), generator=generator)
        anywhere = torch.randint(0, self.num_train_timesteps, (drawn,), generator=generator)
        t = torch.where(is_global, anywhere, in_range)
        if not self.antithetic:
            return t
        mirror = torch.where(is_global, self.num_train_timesteps - 1 - t, self.low + self.high - 1 - t)
        return torch.cat([t, mirror])[:batch]


def frozen_copy(model: nn.Module) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------- channel-wise projections
def _project_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    if isinstance(output, tuple):
        return (module.deme_projection(output[0]), *output[1:])
    return module.deme_projection(output)


def add_channel_projections(model: nn.Module) -> list[str]:
    """Identity-initialised 1x1 convs (no bias) on the main output of every down block, the mid block and every
    up block of a diffusers UNet; returns the new parameter names. They stay in the merged model."""
    config = getattr(model, "config", None)
    if config is None or not all(hasattr(model, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        raise DeMeError("channel projections (--adapters) need a diffusers UNet (down_blocks, mid_block, up_blocks); "
                        f"{type(model).__name__} has none of that structure: run without --adapters")
    channels = list(config.block_out_channels)
    blocks = [(block, c) for block, c in zip(model.down_blocks, channels)]
    if model.mid_block is not None:
        blocks.append((model.mid_block, channels[-1]))
    blocks += [(block, c) for block, c in zip(model.up_blocks, reversed(channels))]
    names = []
    for block, width in blocks:
        if hasattr(block, "deme_projection"):
            raise DeMeError("the model already has DeMe channel projections")
        weight = next(block.parameters())
        projection = nn.Conv2d(width, width, 1, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            projection.weight.copy_(torch.eye(width, dtype=weight.dtype).view(width, width, 1, 1))
        block.add_module("deme_projection", projection)
        block.register_forward_hook(_project_output)
        names.append(next(n for n, m in model.named_modules() if m is projection) + ".weight")
    return names


# ---------------------------------------------------------------- merge
def task_vectors(base: StateDict, tuned: Sequence[StateDict]) -> list[StateDict]:
    """tau_r = theta_r - theta over the floating-point tensors (integer buffers are not merged)."""
    vectors = []
    for index, state in enumerate(tuned):
        if set(state) != set(base):
            raise DeMeError(f"range {index}'s weights have other keys than the pretrained model "
                            f"(e.g. {sorted(set(state) ^ set(base))[:3]}); were adapters on for one but not the other?")
        vector = {}
        for key, value in base.items():
            if state[key].shape != value.shape:
                raise DeMeError(f"range {index}: {key} has shape {tuple(state[key].shape)}, pretrained "
                                f"{tuple(value.shape)}")
            if value.is_floating_point():
                vector[key] = state[key] - value
        vectors.append(vector)
    return vectors


def merge(base: StateDict, vectors: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """theta + sum_r w_r tau_r; tensors that are not floating point are the pretrained ones."""
    if len(weights) != len(vectors):
        raise DeMeError(f"{len(weights)} merge weight(s) for {len(vectors)} ranges; give one weight per range")
    merged = {}
    for key, value in base.items():
        total = value.clone()
        for weight, vector in zip(weights, vectors):
            if weight and key in vector:
                total.add_(vector[key], alpha=float(weight))
        merged[key] = total
    return merged


@dataclass
class GridResult:
    weights: tuple[float, ...]
    score: float
    scores: list[tuple[tuple[float, ...], float]] = field(default_factory=list)  # every candidate, as tried


def grid_search(base: StateDict, vectors: Sequence[StateDict], values: Sequence[float],
                score: Callable[[StateDict], float]) -> GridResult:
    """Try every weight vector in values^N (lower score is better); ties keep the first found."""
    best: GridResult | None = None
    scores = []
    for weights in itertools.product(values, repeat=len(vectors)):
        value = float(score(merge(base, vectors, weights)))
        scores.append((tuple(weights), value))
        if best is None or value < best.score:
            best = GridResult(tuple(weights), value)
    assert best is not None
    best.scores = scores
    return best


# ---------------------------------------------------------------- the parallel layout
@dataclass(frozen=True)
class GroupLayout:
    """Which processes train which ranges: ``groups[g]`` ranks train ``ranges_of[g]`` (one after another)."""

    groups: tuple[tuple[int, ...], ...]
    ranges_of: tuple[tuple[int, ...], ...]

    def group_of(self, rank: int) -> int:
        return next(g for g, ranks in enumerate(self.groups) if rank in ranks)

    def leader(self, range_index: int) -> int:
        return next(self.groups[g][0] for g, ranges in enumerate(self.ranges_of) if range_index in ranges)


def group_layout(world: int, ranges: int) -> GroupLayout:
    """World >= N: N equal groups, one range each (world must be a multiple of N). World < N: every
    process is its own group and takes ranges rank, rank + world, ..."""
    if world >= ranges:
        if world % ranges:
            raise DeMeError(f"{world} processes do not split into {ranges} equal DeMe groups: use a multiple of "
                            f"{ranges} processes, or a number of ranges that divides {world}")
        size = world // ranges
        return GroupLayout(tuple(tuple(range(g * size, (g + 1) * size)) for g in range(ranges)),
                           tuple((g,) for g in range(ranges)))
    return GroupLayout(tuple((r,) for r in range(world)),
                       tuple(tuple(range(r, ranges, world)) for r in range(world)))


def range_seed(seed: int, range_index: int) -> int:
    return seed + 7919 * (range_index + 1)

