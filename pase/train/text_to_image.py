"""Text-conditioned latent training, as diffusers' ``train_text_to_image.py`` and ``train_text_to_image_sdxl.py`` do
it, for SD-1.x/2.x and SDXL pipelines.

A pipeline folder's frozen parts (``tokenizer/``, ``text_encoder/``, ``vae/``, ``scheduler/``) turn captioned
images into the UNet's training inputs: the VAE's latent distribution (mean and standard deviation, scaled by
its ``scaling_factor``) and the text encoder's last hidden state. Both encoders run without gradients, in
the training precision (bf16 on GPUs under bf16 autocast, fp32 otherwise).

The latent is *sampled* from its distribution inside the objective, from the step's generator, not in the
encoder: so training from images and training from a ``pase cache`` of the same images draw the same numbers
and give the same run. The objective follows the pipeline's noise scheduler (its ``alphas_cumprod`` and
``prediction_type``, epsilon or v-prediction), with min-SNR weighting (``--snr-gamma``) and a noise offset as
in diffusers' script.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pase.errors import PaseError
from pase.models import folders
from pase.models.folders import LOW_MEMORY_LOAD, quiet_loading
from pase.train.loop import Objective, model_output

PREDICTION_TYPES = ("epsilon", "v_prediction")
PIPELINE_PARTS = ("tokenizer", "text_encoder", "vae", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
SDXL_INPUTS = ("text_embeds", "time_ids")  # the UNet's added_cond_kwargs


class TextToImageError(PaseError):
    """A pipeline folder pase cannot train from (a missing part, a kind of conditioning not supported)."""


def check_pipeline(pipeline: Path | None, model: str) -> Path:
    """The pipeline folder around a text-conditioned UNet, with every part training needs (SDXL's second
    tokenizer and text encoder too)."""
    if pipeline is None:
        raise TextToImageError(f"{model} is a text-conditioned UNet without its pipeline: training it needs the "
                               "tokenizer, text encoder, VAE and scheduler, so give the pipeline folder (with "
                               "model_index.json) as --model")
    wanted = PIPELINE_PARTS + (SDXL_PARTS if any((pipeline / part).is_dir() for part in SDXL_PARTS) else ())
    missing = [part for part in wanted if not (pipeline / part).is_dir()]
    if missing:
        raise TextToImageError(f"{pipeline} has no {', '.join(missing)} folder(s); a text-to-image pipeline folder "
                               f"as save_pretrained writes it has {', '.join(wanted)} and unet")
    return pipeline


def is_sdxl(pipeline: Path) -> bool:
    """Two text encoders (SDXL): the UNet takes both encoders' hidden states, the pooled text embedding and the
    size and crop ids."""
    return (pipeline / SDXL_PARTS[0]).is_dir()


def vae_scale_factor(pipeline: Path) -> int:
    """Pixels per latent along each side: 2 per VAE level after the first (8 for SD's VAE)."""
    factor = folders.vae_factor(pipeline)
    if factor is None:
        raise TextToImageError(f"cannot read {pipeline / 'vae' / 'config.json'}: the pipeline's VAE config is "
                               "missing or not JSON")
    return factor


def noise_scheduler(pipeline: Path) -> Any:
    """DDPM over the pipeline scheduler's training schedule (betas, timesteps, prediction type), as diffusers'
    training scripts load it whatever sampler the pipeline ships."""
    from diffusers import DDPMScheduler  # noqa: PLC0415 - diffusers takes 1-2 s to import

    with quiet_loading():
        return DDPMScheduler.from_pretrained(pipeline, subfolder="scheduler", local_files_only=True)


class Tokenize:
    """Captions -> token ids padded to each tokenizer's length: ``{"input_ids"}``, and ``"input_ids_2"`` for SDXL's
    second tokenizer (picklable: DataLoader workers run it)."""
    def __init__(self, pipeline: Path) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer is loaded
        from transformers import AutoTokenizer  # noqa: PLC0415 - transformers takes seconds to import

        names = ("tokenizer", "tokenizer_2") if is_sdxl(pipeline) else ("tokenizer",)
        with quiet_loading():
            self.tokenizers = [AutoTokenizer.from_pretrained(pipeline / name, local_files_only=True) for name in names]

    @property
    def length(self) -> int:
        return int(self.tokenizers[0].model_max_length)

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids" + (f"_{i + 1}" if i else ""): tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt").input_ids for i, tokenizer in enumerate(self.tokenizers)}


class FrozenEncoders(nn.Module):
    """The pipeline's VAE encoder and text encoder(s), frozen: a batch of pixels and token ids -> the latent
    distribution (scaled) and the UNet's conditioning, as the pipeline's own ``encode_prompt`` computes it:
    SD-1.x/2.x the text encoder's last hidden state; SDXL both encoders' penultimate hidden states side by side,
    the second's pooled projection (``text_embeds``) and ``time_ids`` (original size, crop top-left, target
    size)."""
    def __init__(self, pipeline: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from diffusers import AutoencoderKL  # noqa: PLC0415
        from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

        self.xl = is_sdxl(pipeline)
        with quiet_loading():
            self.vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae", local_files_only=True,
                                                     low_cpu_mem_usage=LOW_MEMORY_LOAD)
            self.text_encoder = CLIPTextModel.from_pretrained(pipeline / "text_encoder", local_files_only=True)
            self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                pipeline / "text_encoder_2", local_files_only=True) if self.xl else None
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.requires_grad_(False)
        self.eval()
        self.to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pixels = batch["pixel_values"].to(self.device, self.dtype)
        dist = self.vae.encode(pixels).latent_dist
        out = {"latent_mean": (dist.mean * self.scaling_factor).float(),
               "latent_std": (dist.std * self.scaling_factor).float()}
        ids = batch["input_ids"].to(self.device)
        if self.text_encoder_2 is None:
            out["encoder_hidden_states"] = self.text_encoder(ids)[0].float()
            return out
        first = self.text_encoder(ids, output_hidden_states=True)
        second = self.text_encoder_2(batch["input_ids_2"].to(self.device), output_hidden_states=True)
        out["encoder_hidden_states"] = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1).float()
        out["text_embeds"] = second.text_embeds.float()
        target = torch.full_like(batch["original_size"], pixels.shape[-1])
        out["time_ids"] = torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).float().to(
            self.device)
        return out


@dataclass(frozen=True)
class LatentLoss:
    """What the objective needs to know besides the scheduler: the target and the weighting."""
    prediction_type: str | None = None  # None: the pipeline scheduler's
    snr_gamma: float | None = None
    noise_offset: float = 0.0

    def validate(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise PaseError(f"--prediction-type {self.prediction_type!r}: choose {' or '.join(PREDICTION_TYPES)}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise PaseError(f"--snr-gamma {self.snr_gamma}: use a positive gamma (5.0 is the paper's)")
        if self.noise_offset < 0:
            raise PaseError(f"--noise-offset {self.noise_offset}: use 0 (off) or a small positive value, e.g. 0.05")


TimestepSampler = Callable[[int, torch.Generator], torch.Tensor]  # (count, generator) -> timesteps in [0, T)


def latent_objective(scheduler: Any, loss: LatentLoss, timesteps: TimestepSampler | None = None,
                     order_by_timestep: bool = False, teacher: nn.Module | None = None,
                     consistency: float = 0.0) -> Objective:
    """The text-to-image diffusion loss on a batch ``{"latent_mean", "latent_std", "encoder_hidden_states"}``:
    latents sampled from their distribution, noise (plus ``noise_offset`` times per-channel noise), timesteps
    uniform over the scheduler's, the target epsilon or v, MSE weighted by min(SNR, gamma) / SNR (epsilon) or
    / (SNR + 1) (v) when ``snr_gamma`` is set.

    The draws come, in that order, from one generator per sample seeded by the batch's ``seeds`` (one per row:
    the run's seed, the step and the item, see ``pase.train.streaming``), so that a sample gets the same noise
    whichever rank and batch position it lands on: one process and N processes run the same training; without
    ``seeds``, from ``generator`` for the whole batch.

    The fine-tuning strategies change three things: ``timesteps`` draws them from another distribution (DeMe's
    range sampler; each row's from its own generator), ``order_by_timestep`` sorts the batch's rows by timestep
    (TuneQDM's experts then take contiguous slices; the same loss, as the rows are in random order anyway), and
    ``teacher`` adds ``consistency`` times the MSE between the prediction and the frozen teacher's (DeMe)."""
    if consistency > 0 and teacher is None:
        raise PaseError("the consistency loss needs the frozen pretrained model (teacher)")
    from diffusers.training_utils import compute_snr  # noqa: PLC0415

    steps = int(scheduler.config.num_train_timesteps)
    draw_timesteps = timesteps or (lambda count, generator: torch.randint(0, steps, (count,), generator=generator))

    def prepare(batch: Any, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(the UNet's inputs: noised latents, timesteps, text embeddings and SDXL's pooled embeddings and time ids;
        the target, with each sample's min-SNR weight as one more channel when ``snr_gamma`` is set): the split a
        pipeline needs, stage 0 taking the inputs and the last stage the target."""
        mean, std = batch["latent_mean"], batch["latent_std"]
        rows = batch.get("seeds")
        generators = [torch.Generator().manual_seed(int(seed)) for seed in rows] if rows is not None else None
        per_row = (1, *mean.shape[1:])
        offset_shape = (1, mean.shape[1], 1, 1)

        def draw(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.randn((len(mean), *shape[1:]), generator=generator)

        if generators is None:
            eps, noise = draw(per_row), draw(per_row)
            offset = draw(offset_shape) if loss.noise_offset else None
            t = draw_timesteps(len(mean), generator)
        else:
            drawn = [_row_draws(g, per_row, offset_shape if loss.noise_offset else None, draw_timesteps)
                     for g in generators]
            eps, noise, t = (torch.cat([d[k] for d in drawn]) for k in range(3))
            offset = torch.cat([d[3] for d in drawn]) if loss.noise_offset else None
        eps, noise, t = eps.to(mean), noise.to(mean), t.to(mean.device)
        latents = mean + std * eps
        if offset is not None:
            noise = noise + loss.noise_offset * offset.to(mean)
        noisy = scheduler.add_noise(latents, noise, t)
        target = noise if loss.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        conditioning = (batch["encoder_hidden_states"], *(batch[key] for key in SDXL_INPUTS if key in batch))
        if order_by_timestep:
            order = torch.sort(t.cpu(), stable=True).indices.to(t.device)
            noisy, t, target = noisy[order], t[order], target[order]
            conditioning = tuple(c[order] for c in conditioning)
        if loss.snr_gamma is not None:
            snr = compute_snr(scheduler, t)
            weights = torch.minimum(snr, torch.full_like(snr, loss.snr_gamma))
            weights = weights / snr if loss.prediction_type == "epsilon" else weights / (snr + 1)
            column = weights.to(target.dtype).view(-1, 1, 1, 1).expand(-1, 1, *target.shape[2:])
            target = torch.cat([target, column], dim=1)
        return (noisy, t, *conditioning), target

    def criterion(prediction: Any, target: torch.Tensor) -> torch.Tensor:
        prediction = model_output(prediction)
        if loss.snr_gamma is None:
            return F.mse_loss(prediction.float(), target.float())
        weights = target[:, -1, 0, 0].float()
        per_sample = F.mse_loss(prediction.float(), target[:, :-1].float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weights).mean()

    def objective(model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        (noisy, t, context, *added), target = prepare(batch, generator)
        kwargs = {"added_cond_kwargs": dict(zip(SDXL_INPUTS, added))} if added else {}
        prediction = model(noisy, t, encoder_hidden_states=context, **kwargs)
        value = criterion(prediction, target)
        if consistency > 0 and teacher is not None:
            with torch.no_grad():
                taught = model_output(teacher(noisy, t, encoder_hidden_states=context, **kwargs))
            value = value + consistency * F.mse_loss(model_output(prediction).float(), taught.float())
        return value

    objective.prepare, objective.criterion = prepare, criterion  # type: ignore[attr-defined]
    return objective


def _row_draws(generator: torch.Generator, shape: tuple[int, ...], offset_shape: tuple[int, ...] | None,
               timesteps: TimestepSampler) -> tuple[torch.Tensor, ...]:
    """One sample's draws (drawn as latent noise, diffusion noise, offset noise, timestep): (latent noise, diffusion
    noise, timestep, offset noise)."""
    eps = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    offset = torch.randn(offset_shape, generator=generator) if offset_shape else torch.zeros(0)
    t = timesteps(1, generator)
    return eps, noise, t, offset


__all__ = ["FrozenEncoders", "LatentLoss", "PREDICTION_TYPES", "SDXL_INPUTS", "TextToImageError", "TimestepSampler",
           "Tokenize", "check_pipeline", "is_sdxl", "latent_objective", "noise_scheduler", "vae_scale_factor"]
