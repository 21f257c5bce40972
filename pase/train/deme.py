"""DeMe fine-tuning as a training job: each timestep range trained by its process group, then gathered.

The method's pure parts (ranges, the range sampler, channel projections, task vectors, the merge and the
group layout) are ``strategies.deme``; this module runs them on the training loop.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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
from pase.weights import save_weights
from strategies.deme import (
    DeMeConfig,
    DeMeError,
    GroupLayout,
    RangeSampler,
    StateDict,
    add_channel_projections,
    frozen_copy,
    group_layout,
    range_seed,
)

RangeObjective = Callable[[nn.Module | None, RangeSampler, float], Objective]  # (teacher, sampler, consistency)


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
    objective_for: RangeObjective = deme_objective,
) -> tuple[dict[int, TrainResult], dict[int, StateDict], GroupLayout]:
    """Train this process's ranges; every range's weights end up on rank 0 (and its group's leader).
    ``single_group``: the whole world trains every range in turn (how DeMe runs under a plan).
    ``objective_for(teacher, sampler, consistency)``: a range's loss (on images by default; a text-to-image job
    passes its latent objective with the range's timesteps)."""
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
        objective = objective_for(teacher, RangeSampler(low, high, config.p_global, config.num_train_timesteps,
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
    return [save_weights(folder / f"range-{index}" / "weights.safetensors", state) for index, state in tuned.items()]


__all__ = ["deme_objective", "denoising_score", "save_range_weights", "train_ranges"]
