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
from pase.sampling.pipeline_folder import (
    FolderSamplingError,
    is_pipeline_folder,
    load_folder_model,
    pipeline_of,
    scheduler_config,
)
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
    prompt: str | None = None  # a pipeline folder: what to draw (its text encoder encodes it)
    negative_prompt: str | None = None  # under guidance, what to steer away from ("" when None, as diffusers)

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise PaseError(f"unknown --sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.samples < 1:
            raise PaseError(f"--samples must be >= 1, not {self.samples}")
        if self.steps < 1:
            raise PaseError(f"--steps must be >= 1, not {self.steps}")
        check_size(self.model, self.size)
        folder = is_pipeline_folder(self.model)
        if self.prompt is not None or self.negative_prompt is not None:
            pipeline_of(self.model)  # refuses zoo models and UNet folders alone by name
        elif folder:
            raise FolderSamplingError(f"{self.model} is a text-to-image pipeline: say what to draw with --prompt")
        if self.negative_prompt is not None and self.guidance_scale == 1.0:
            raise FolderSamplingError("--negative-prompt acts through classifier-free guidance: give a "
                                      "--guidance-scale above 1 (e.g. 7.5)")

    @property
    def tolerance(self) -> float:
        return DEFAULT_TOL.get(self.sampler, 0.0) if self.tol is None else self.tol


MAX_SIZE = 4096  # pixels or latents per side, as training's --image-size


def check_size(model: str, size: int | None) -> None:
    """A spatial ``size`` the model can run: positive, and a multiple of its total downsampling (the skip
    tensors of a UNet's levels must line up)."""
    if size is None:
        return
    if size < 1:
        raise PaseError(f"--size must be >= 1, not {size}")
    if size > MAX_SIZE:
        raise PaseError(f"--size must be <= {MAX_SIZE}, not {size} (a {size}x{size} sample would not fit in memory)")

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
    """DDPM or DDIM over ``config.steps``: a pipeline folder's noise schedule, else diffusers' defaults."""
    if config.prompt is not None:
        folder = scheduler_config(config.model)
        clip = bool(folder.get("clip_sample")) or config.clip_sample
        return build_core(config.scheduler, config.steps, **{**folder, "clip_sample": clip})
    return build_core(config.scheduler, config.steps, clip_sample=config.clip_sample)


def build_folder_denoiser(config: SampleConfig, device: torch.device) -> tuple[UNetDenoiser, tuple[int, int, int]]:
    """The folder's UNet with the prompt's context (and the negative prompt's under guidance), and its latents'
    (C, H, W)."""
    assert config.prompt is not None
    _, channels, height, width = resolve_model(config.model).inputs[0].concrete(1)
    loaded = load_folder_model(config.model, config.prompt, config.negative_prompt, config.guidance_scale != 1.0,
                               device, (height, width))
    uncond = loaded.uncond
    denoiser = UNetDenoiser(loaded.unet, loaded.cond.context, config.guidance_scale,
                            None if uncond is None else uncond.context, loaded.cond.added,
                            None if uncond is None else uncond.added)
    return denoiser, (channels, height, width)


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
    if config.prompt is not None:
        denoiser, (channels, height, width) = build_folder_denoiser(config, device)
    else:
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
