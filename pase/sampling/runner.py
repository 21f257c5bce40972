"""``pase sample``: build a zoo model with seeded weights, pick a sampler, run it on this rank's share.

Launched plainly it runs as one process; under ``torchrun`` every rank runs the same loop and the
network calls are split across ranks (``distributed.Evaluator``). With ``check`` the sequential
sampler is run too and the relative error of the parallel sample against it is reported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from pase.errors import PaseError
from pase.models.pase_unet import PaseUNetConfig
from pase.models.zoo import resolve_model
from pase.process_group import Launch, pick_device
from pase.sampling.core import SamplerCore, build_core
from pase.sampling.denoiser import UNetDenoiser
from pase.sampling.distributed import Evaluator
from pase.sampling.paradigms import paradigms
from pase.sampling.sequential import Progress, SampleResult, batch_parallel, sequential
from pase.sampling.srds import srds

SAMPLERS = ("sequential", "paradigms", "srds", "batch")
DEFAULT_TOL = {"paradigms": 0.1, "srds": 0.01}


@dataclass
class SampleConfig:
    model: str = "unet-tiny"
    sampler: str = "paradigms"
    scheduler: str = "ddpm"
    steps: int = 100
    window: int = 16
    tol: float | None = None  # None: DEFAULT_TOL of the sampler
    blocks: int | None = None
    pipelined: bool = False
    samples: int = 1
    seed: int = 0
    size: int | None = None  # spatial size override (the model's own when None)
    guidance_scale: float = 1.0
    clip_sample: bool = False
    check: bool = False

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise PaseError(f"unknown --sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.samples < 1:
            raise PaseError(f"--samples must be >= 1, not {self.samples}")
        if self.steps < 1:
            raise PaseError(f"--steps must be >= 1, not {self.steps}")
        check_size(self.model, self.size)

    @property
    def tolerance(self) -> float:
        return DEFAULT_TOL.get(self.sampler, 0.0) if self.tol is None else self.tol


def check_size(model: str, size: int | None) -> None:
    """A spatial ``size`` the model can run: positive, and a multiple of its total downsampling (the skip
    tensors of a UNet's levels must line up)."""
    if size is None:
        return
    if size < 1:
        raise PaseError(f"--size must be >= 1, not {size}")

    spec = resolve_model(model)
    if spec.family == "diffusers.UNet2DConditionModel":
        return  # it passes each skip's size to its upsamplers: any size runs
    if spec.family == "pase.PaseUNet":
        levels = PaseUNetConfig(**spec.config).channels
    else:
        levels = spec.config.get("block_out_channels") or ()
    multiple = 2 ** max(0, len(levels) - 1)
    if size % multiple:
        raise PaseError(f"--size {size}: {model} halves the size {len(levels) - 1} times, so it must be a multiple "
                        f"of {multiple} (e.g. {max(multiple, size // multiple * multiple)})")


def build_denoiser(name: str, seed: int, guidance_scale: float = 1.0, device: torch.device | str = "cpu"
                   ) -> tuple[UNetDenoiser, tuple[int, int, int]]:
    """The zoo model with weights seeded by ``seed`` (the same on every rank), and its (C, H, W)."""
    spec = resolve_model(name)
    keyword = [i.name for i in spec.inputs if i.keyword]
    if keyword:
        raise PaseError(f"{name!r} needs extra conditioning inputs ({', '.join(keyword)}) that `pase sample` does "
                        "not provide; sample a UNet2DModel or an SD-1.x style UNet2DConditionModel")
    names = [i.name for i in spec.inputs]
    if names[:2] != ["sample", "timestep"] or len(spec.inputs[0].shape) != 4:
        raise PaseError(f"{name!r} does not take (sample (B, C, H, W), timestep (B,)) as its first inputs; "
                        "`pase sample` needs a diffusion UNet")
    torch.manual_seed(seed)
    with torch.device(device):
        model = spec.build()
    context = None
    if "encoder_hidden_states" in names:  # a stand-in prompt embedding: no text encoder ships with pase
        shape = next(i for i in spec.inputs if i.name == "encoder_hidden_states").concrete(1)
        context = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    _, channels, height, width = spec.inputs[0].concrete(1)
    return UNetDenoiser(model, context, guidance_scale), (channels, height, width)


def make_core(config: SampleConfig) -> SamplerCore:
    return build_core(config.scheduler, config.steps, clip_sample=config.clip_sample)


def run_sampler(name: str, core: SamplerCore, evaluator: Evaluator, x_t: torch.Tensor, noise: torch.Tensor,
                config: SampleConfig, progress: Progress | None = None) -> SampleResult:
    if name == "sequential":
        return sequential(core, evaluator, x_t, noise, progress)
    if name == "batch":
        return batch_parallel(core, evaluator, x_t, noise, progress)
    if name == "paradigms":
        return paradigms(core, evaluator, x_t, noise, config.window, config.tolerance, progress=progress)
    return srds(core, evaluator, x_t, noise, config.blocks, config.tolerance, pipelined=config.pipelined,
                progress=progress)


def device_for_rank() -> torch.device:
    return pick_device((Launch.from_torchrun() or Launch()).local_rank)


def sample(config: SampleConfig, progress: Progress | None = None) -> tuple[SampleResult, float | None]:
    """Run ``config`` on this rank; returns the result and, with ``check``, the relative error of the
    sample against sequential sampling from the same x_T and noise."""
    config.validate()
    device = device_for_rank()
    denoiser, (channels, height, width) = build_denoiser(config.model, config.seed, config.guidance_scale, device)
    if config.size is not None:
        height = width = config.size
    core = make_core(config).to(device)
    x_t, noise = core.initial_and_noise((config.samples, channels, height, width), config.seed)
    x_t, noise = x_t.to(device), noise.to(device)
    evaluator = Evaluator(denoiser)
    _warm_up(denoiser, x_t, core)
    result = run_sampler(config.sampler, core, evaluator, x_t, noise, config, progress)
    result.extra["config"] = asdict(config)
    error = None
    if config.check:
        reference = sequential(core, evaluator, x_t, noise)
        error = float((result.sample - reference.sample).flatten(1).norm(dim=1).max()
                      / reference.sample.flatten(1).norm(dim=1).clamp(min=1e-30).max())
    return result, error


def _warm_up(denoiser: UNetDenoiser, x_t: torch.Tensor, core: SamplerCore) -> None:
    """One untimed call, so lazy initialisation (kernels, allocator) does not land in the measured time."""
    denoiser(x_t[:1], core.timesteps[:1])


def summary(result: SampleResult, error: float | None) -> dict[str, Any]:
    out = result.summary()
    out["rel_error_vs_sequential"] = error
    out.update({k: result.extra[k] for k in ("compute_seconds", "gather_seconds") if k in result.extra})
    return out
