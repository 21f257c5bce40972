"""The sampler core: batched noise-free updates, each row at its own timestep, and noise drawn up front.

ParaDiGMS and SRDS both evaluate the network on a batch of states that sit at *different*
timesteps and then apply the sampler's update row by row. ``SamplerCore`` owns that update
for DDPM (posterior mean, plus pre-drawn noise) and DDIM with eta = 0, and the DDIM jump
t -> s that SRDS uses as its coarse solver. The alpha table and config come from diffusers'
schedulers; the update itself is ours because diffusers' batched DDIM path
(``DDIMParallelScheduler.batch_step_no_noise``) uses alpha = 1 at the last step instead of
``final_alpha_cumprod`` and derives the previous timestep as t - T // N. We carry an explicit
previous-timestep table (``prev``) taken from the scheduler's own grid instead, so non-uniform
grids are stepped correctly too.

It must not know about devices, windows or blocks: those live in paradigms.py, srds.py and
distributed.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from pase.errors import PaseError

SCHEDULERS = ("ddpm", "ddim")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
FINAL = -1  # a "previous timestep" of -1 means past the end of the grid (final alpha)


@dataclass
class SamplerCore:
    """One sampler on one grid of N steps; every method works on rows with their own timesteps."""
    kind: str  # "ddpm" or "ddim"
    timesteps: torch.Tensor  # (N,) long, descending
    prev: torch.Tensor  # (N,) long: the timestep each step lands on; FINAL after the last
    alphas_cumprod: torch.Tensor  # (T,) float32
    final_alpha: torch.Tensor  # 0-dim: alpha-bar past the end (DDPM: 1, DDIM: final_alpha_cumprod)
    prediction_type: str = "epsilon"
    clip_range: float | None = None  # clamp the predicted x0 to +-clip_range (clip_sample)
    config: dict[str, Any] | None = None  # the diffusers scheduler config, for printing and saving

    def to(self, device: torch.device | str) -> SamplerCore:
        """A copy whose tables live on ``device`` (where the states are)."""
        return replace(self, timesteps=self.timesteps.to(device), prev=self.prev.to(device),
                       alphas_cumprod=self.alphas_cumprod.to(device), final_alpha=self.final_alpha.to(device))

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def is_ode(self) -> bool:
        """DDIM with eta = 0 adds no noise: the whole trajectory is a deterministic function of x_T."""
        return self.kind == "ddim"

    @property
    def uniform(self) -> bool:
        """True when the grid is evenly spaced (where diffusers' own t - T // N rule agrees with ``prev``)."""
        gaps = (self.timesteps[:-1] - self.prev[:-1]).unique()
        return gaps.numel() <= 1

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha-bar at raw timesteps ``t`` (FINAL allowed), shape (R,)."""
        t = torch.as_tensor(t, dtype=torch.long, device=self.alphas_cumprod.device)
        table = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, table, self.final_alpha.to(table.dtype))

    def variance(self, index: torch.Tensor | int | None = None) -> torch.Tensor:
        """DDPM posterior variance of step ``index`` (all steps when None): the noise of DDPM and the
        scale ParaDiGMS measures its tolerance against, for DDIM as well (as the reference does)."""
        device = self.timesteps.device
        idx = torch.arange(self.steps, device=device) if index is None else torch.as_tensor(index, device=device)
        a_t = self.alpha(self.timesteps[idx])
        a_s = self.alpha(self.prev[idx]) if self.kind == "ddim" else self._ddpm_prev_alpha(self.prev[idx])
        return ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).clamp(min=1e-20)

    def _ddpm_prev_alpha(self, s: torch.Tensor) -> torch.Tensor:
        table = self.alphas_cumprod[s.clamp(min=0)]
        return torch.where(s >= 0, table, torch.ones_like(table))

    # ------------------------------------------------------------------ updates
    def _x0_eps(self, output: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted x0 (clipped when configured) and epsilon from the model output."""
        b_t = 1 - a_t
        if self.prediction_type == "epsilon":
            x0, eps = (x - b_t ** 0.5 * output) / a_t ** 0.5, output
        elif self.prediction_type == "sample":
            x0 = output
            eps = (x - a_t ** 0.5 * x0) / b_t ** 0.5
        else:  # v_prediction
            x0 = a_t ** 0.5 * x - b_t ** 0.5 * output
            eps = a_t ** 0.5 * output + b_t ** 0.5 * x
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0, eps

    def jump(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """DDIM (eta = 0) from timestep ``t`` straight to ``s`` per row: SRDS's coarse solver, and
        the DDIM step itself when ``s`` is the next grid point. O(R * D)."""
        a_t = _rows(self.alpha(t), x)
        a_s = _rows(self.alpha(s), x) if self.kind == "ddim" else _rows(self._ddpm_prev_alpha(s), x)
        x0, eps = self._x0_eps(output, x, a_t)
        return a_s ** 0.5 * x0 + (1 - a_s) ** 0.5 * eps

    def step(self, output: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The noise-free update of grid step ``index`` per row (DDPM posterior mean, or DDIM)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.timesteps.device)
        t, s = self.timesteps[index], self.prev[index]
        if self.kind == "ddim":
            return self.jump(output, x, t, s)
        a_t = _rows(self.alpha(t), x)
        a_s = _rows(self._ddpm_prev_alpha(s), x)
        b_t, b_s = 1 - a_t, 1 - a_s
        alpha_step = a_t / a_s
        x0, _ = self._x0_eps(output, x, a_t)
        return (a_s ** 0.5 * (1 - alpha_step) / b_t) * x0 + (alpha_step ** 0.5 * b_s / b_t) * x

    # ------------------------------------------------------------------ noise
    def initial_and_noise(self, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x_T and the scaled noise sigma_j z_j of every step, (N, *shape), drawn up front from one
        generator in step order, exactly as diffusers' sequential ``DDPMScheduler.step(generator=g)``
        draws them (x_T first, then one draw per step with t > 0). Every rank draws the same."""
        generator = torch.Generator().manual_seed(seed)
        x_t = torch.randn(shape, generator=generator)
        noise = torch.zeros((self.steps, *shape))
        if self.kind == "ddpm":
            std = (self.variance() ** 0.5).cpu()  # the core may already live on a GPU; the draws are on the CPU
            for j in range(self.steps):
                if int(self.timesteps[j]) > 0:
                    noise[j] = std[j] * torch.randn(shape, generator=generator)
        return x_t, noise


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(R,) per-row values broadcast against a (R, ...) batch."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


DEFAULT_TRAIN_STEPS = 1000  # diffusers' DDPM/DDIM default num_train_timesteps (every zoo model's)


def check_steps(kind: str, steps: int, train_steps: int = DEFAULT_TRAIN_STEPS) -> None:
    """A clear error for an unknown scheduler or a step count outside 1..``train_steps``; needs no diffusers, so
    ``sample-plan`` can price samplers without importing it."""
    if kind not in SCHEDULERS:
        raise PaseError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")
    if not 1 <= steps <= train_steps:
        raise PaseError(f"--steps {steps} must be between 1 and the scheduler's {train_steps} training timesteps")


def make_scheduler(kind: str, steps: int, **config: Any):  # noqa: ANN201 - a diffusers SchedulerMixin
    """A diffusers DDPM or DDIM scheduler built from a plain config (keys the class does not take, such as another
    scheduler's, are ignored), with ``steps`` set."""
    from diffusers import DDIMScheduler, DDPMScheduler  # noqa: PLC0415 - diffusers takes 1-2 s to import; sample-plan prices samplers without schedulers

    check_steps(kind, 1)
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    from diffusers.utils import logging as diffusers_logging  # noqa: PLC0415

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "config attributes ... will be ignored": expected for a folder's
    try:
        scheduler = cls.from_config(config)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    check_steps(kind, steps, scheduler.config.num_train_timesteps)
    scheduler.set_timesteps(steps)
    return scheduler


def core_from_scheduler(scheduler: Any) -> SamplerCore:
    """Wrap a diffusers DDPMScheduler/DDIMScheduler (after ``set_timesteps``) as a ``SamplerCore``."""
    from diffusers import DDIMScheduler, DDPMScheduler  # noqa: PLC0415 - as above

    if isinstance(scheduler, DDIMScheduler):
        kind, final = "ddim", scheduler.final_alpha_cumprod
    elif isinstance(scheduler, DDPMScheduler):
        kind, final = "ddpm", torch.tensor(1.0)
        if scheduler.config.variance_type not in ("fixed_small", None):
            raise PaseError(f"DDPM variance_type {scheduler.config.variance_type!r} is not supported; "
                            "use the default fixed_small")
    else:
        raise PaseError(f"{type(scheduler).__name__} is not supported; use a DDPMScheduler or DDIMScheduler")
    cfg = scheduler.config
    if cfg.get("thresholding"):
        raise PaseError("dynamic thresholding is not supported by the batched update; set thresholding=False")
    if cfg.prediction_type not in PREDICTIONS:
        raise PaseError(f"prediction_type {cfg.prediction_type!r}; choose one of {', '.join(PREDICTIONS)}")
    timesteps = scheduler.timesteps.to(torch.long)
    if (timesteps[1:] >= timesteps[:-1]).any():
        raise PaseError("the scheduler's timesteps are not strictly decreasing; pick another timestep_spacing")
    prev = torch.cat([timesteps[1:], torch.tensor([FINAL])])
    return SamplerCore(kind, timesteps, prev, scheduler.alphas_cumprod.to(torch.float32), torch.as_tensor(final),
                       cfg.prediction_type, float(cfg.clip_sample_range) if cfg.clip_sample else None, dict(cfg))


def build_core(kind: str, steps: int, **config: Any) -> SamplerCore:
    return core_from_scheduler(make_scheduler(kind, steps, **config))
