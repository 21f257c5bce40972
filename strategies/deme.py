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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pase.errors import PaseError
from pase.runtime.state import full_state_dict
from pase.train.data import LoaderFactory, step_batches
from pase.train.distributed import DistEnv
from pase.train.loop import (
    DataGroup,
    LoopConfig,
    Objective,
    Parallelize,
    TrainResult,
    add_noise,
    ddpm_alphas_cumprod,
    default_parallelize,
    draw_noise,
    fit,
    model_output,
)

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


def deme_objective(teacher: nn.Module | None, sampler: RangeSampler, consistency: float) -> Objective:
    """||eps - eps_r(x_t, t)||^2 + lambda ||eps_r(x_t, t) - eps_theta(x_t, t)||^2, t from the range sampler."""
    alphas_cumprod = ddpm_alphas_cumprod(sampler.num_train_timesteps)
    if consistency > 0 and teacher is None:
        raise DeMeError("the consistency loss needs the frozen pretrained model (teacher)")

    def loss(model: nn.Module, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = draw_noise(x0, generator)
        t = sampler.sample(x0.shape[0], generator).to(x0.device)
        x_t = add_noise(x0, noise, t, alphas_cumprod)
        prediction = model_output(model(x_t, t))
        value = F.mse_loss(prediction, noise)
        if consistency > 0:
            with torch.no_grad():
                target = model_output(teacher(x_t, t))
            value = value + consistency * F.mse_loss(prediction, target)
        return value

    return loss


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


def denoising_score(model: nn.Module, held_out: torch.Tensor, batch: int = 16, seed: int = 1234,
                    num_train_timesteps: int = 1000, device: torch.device | str = "cpu",
                    ) -> Callable[[StateDict], float]:
    """A score callback: the epsilon loss of the merged weights on held-out images, with fixed noise and
    timesteps (uniform over [0, T)), so every candidate is judged on the same draws."""
    alphas_cumprod = ddpm_alphas_cumprod(num_train_timesteps)
    generator = torch.Generator().manual_seed(seed)
    x0 = held_out.to(device)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, num_train_timesteps, (len(x0),), generator=generator)
    x_t = add_noise(x0, noise.to(device), t.to(device), alphas_cumprod)

    @torch.no_grad()
    def score(state: StateDict) -> float:
        model.load_state_dict(state)
        model.eval()
        total = 0.0
        for start in range(0, len(x0), batch):
            part = slice(start, start + batch)
            prediction = model_output(model(x_t[part], t[part].to(device)))
            total += F.mse_loss(prediction, noise[part].to(device), reduction="sum").item()
        return total / noise.numel()

    return score


# ---------------------------------------------------------------- the parallel job
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


@dataclass
class DeMeResult:
    results: dict[int, TrainResult]  # per range trained on this process
    tuned: dict[int, StateDict]  # theta_r per range (all ranges on rank 0, own ranges on group leaders)
    merged: StateDict | None  # on rank 0
    weights: tuple[float, ...] | None
    grid: GridResult | None = None
    layout: GroupLayout | None = None


def range_seed(seed: int, range_index: int) -> int:
    return seed + 7919 * (range_index + 1)


def train_ranges(
    build_pretrained: Callable[[], nn.Module],
    dataset: torch.Tensor,
    config: DeMeConfig,
    loop: LoopConfig,
    env: DistEnv,
    *,
    parallelize: Parallelize = default_parallelize,
    loader: LoaderFactory = step_batches,
    job: dict[str, Any] | None = None,
    single_group: bool = False,
) -> tuple[dict[int, TrainResult], dict[int, StateDict], GroupLayout]:
    """Train this process's ranges; every range's weights end up on rank 0 (and its group's leader).
    ``single_group``: the whole world trains every range in turn (how DeMe runs under a plan)."""
    layout = GroupLayout((tuple(range(env.world)),), (tuple(range(len(config.ranges))),)) if single_group \
        else group_layout(env.world, len(config.ranges))
    process_groups = [dist.new_group(list(ranks)) if env.backend else None for ranks in layout.groups]
    mine = layout.group_of(env.rank)
    ranks = layout.groups[mine]
    data_group = DataGroup(process_groups[mine], ranks.index(env.rank), len(ranks), env.device, env.is_main)
    results: dict[int, TrainResult] = {}
    tuned: dict[int, StateDict] = {}
    for index in layout.ranges_of[mine]:
        low, high = config.ranges[index]
        model = build_pretrained()
        if config.adapters:
            add_channel_projections(model)
        teacher = frozen_copy(build_pretrained()).to(env.device) if config.consistency > 0 else None
        objective = deme_objective(teacher, RangeSampler(low, high, config.p_global, config.num_train_timesteps,
                                                         config.antithetic), config.consistency)
        range_loop = replace(loop, seed=range_seed(loop.seed, index), description=f"DeMe range {index} [{low}, {high})",
                             checkpoint_dir=loop.checkpoint_dir / f"range-{index}" if loop.checkpoint_dir else None)
        results[index] = fit(model, objective, dataset, range_loop, group=data_group, parallelize=parallelize,
                             loader=loader, job={**(job or {}), "range": [low, high]})
        state = full_state_dict(model) if env.backend else model.state_dict()  # gathers a plan's shards
        if data_group.rank == 0:
            tuned[index] = {k: v.detach().to("cpu").clone() for k, v in state.items()}
        del model, teacher
    if env.backend:
        _gather_to_rank0(tuned, layout, env)
    return results, tuned, layout


def _gather_to_rank0(tuned: dict[int, StateDict], layout: GroupLayout, env: DistEnv) -> None:
    """Each range's leader sends theta_r to rank 0 as one flat tensor (point to point; the groups never
    synchronised before this)."""
    template = next(iter(tuned.values()), None) if env.rank == 0 else None
    for index in range(sum(len(r) for r in layout.ranges_of)):
        leader = layout.leader(index)
        if leader == 0:
            continue
        if env.rank == leader:
            state = tuned[index]
            flat = torch.cat([v.reshape(-1).double() for v in state.values()]).to(env.device)  # exact for fp32
            dist.send(flat, dst=0)
        elif env.rank == 0:
            if template is None:
                raise DeMeError("rank 0 trained no range, so it cannot size the weights it receives")
            numel = sum(v.numel() for v in template.values())
            flat = torch.empty(numel, dtype=torch.float64, device=env.device)
            dist.recv(flat, src=leader)
            flat = flat.cpu()
            state, offset = {}, 0
            for key, value in template.items():
                state[key] = flat[offset:offset + value.numel()].view(value.shape).to(value.dtype)
                offset += value.numel()
            tuned[index] = state


def save_range_weights(folder: Path, tuned: dict[int, StateDict]) -> list[Path]:
    from pase.train.checkpoint import save_weights

    return [save_weights(folder / f"range-{index}" / "weights.safetensors", state) for index, state in tuned.items()]
