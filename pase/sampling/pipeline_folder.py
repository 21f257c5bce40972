"""Sampling a diffusers text-to-image pipeline folder (SD-1.x/2.x or SDXL layout): its tokenizer(s) and CLIP text
encoder(s) turn ``--prompt`` (and ``--negative-prompt``, "" by default, as diffusers does) into the UNet's context, the
samplers run on its latents with DDPM or DDIM over the folder's own noise schedule (betas, prediction type, timestep
spacing from ``scheduler/scheduler_config.json``), and its VAE decodes the result into images. An SDXL folder's UNet
also gets the second encoder's pooled embedding (``text_embeds``) and the size conditioning (``time_ids``: original
size, crop corner (0, 0), target size, all the drawn image's), and without ``--negative-prompt`` its unconditional
branch is all zeros when the folder says ``force_zeros_for_empty_prompt``, as ``StableDiffusionXLPipeline`` does.

With the same x_T, DDIM and ``--tol 0``, this gives what the folder's own ``StableDiffusionPipeline`` (or
``StableDiffusionXLPipeline``) draws with a ``DDIMScheduler`` from that config (tested). The folder's scheduler
class itself (PNDM, DPM-Solver, ...) is not driven: its multistep updates do not batch over timesteps as ParaDiGMS
and SRDS need.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pase import atomic
from pase.errors import PaseError
from pase.models import folders
from pase.models.zoo import folder_model


class FolderSamplingError(PaseError):
    """A folder ``pase sample`` cannot draw from, or options that do not fit it."""


def is_pipeline_folder(name: str) -> bool:
    """Is ``--model NAME`` a folder with ``model_index.json`` (or the ``unet/`` of one)?"""
    return folders.looks_like_folder(name) and ":" not in name and folders.unet_folder(name)[1] is not None


def pipeline_of(name: str) -> Path:
    """The pipeline folder, refusing a UNet folder alone and a pipeline without its text encoders, tokenizers, VAE or
    scheduler."""
    if not folders.looks_like_folder(name):
        raise FolderSamplingError(f"--prompt needs a diffusers pipeline folder as --model; {name!r} is a zoo model "
                                  "without a text encoder")
    pipeline = folders.unet_folder(name)[1]
    if pipeline is None:
        raise FolderSamplingError(f"{name} is a UNet folder without a pipeline around it: pase sample needs the "
                                  "pipeline folder (model_index.json, text_encoder/, tokenizer/, vae/, scheduler/)")
    parts = ["text_encoder", "tokenizer", "vae", "scheduler"] + (["text_encoder_2", "tokenizer_2"]
                                                                  if _index(pipeline).get("text_encoder_2") else [])
    missing = [part for part in parts if not (pipeline / part).is_dir()]
    if missing:
        raise FolderSamplingError(f"{pipeline} has no {', '.join(missing)} folder(s); pase sample needs the whole "
                                  "pipeline")
    return pipeline


def scheduler_config(name: str) -> dict[str, Any]:
    """The folder's scheduler config (what DDPM or DDIM is built from)."""
    path = pipeline_of(name) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FolderSamplingError(f"cannot read {path}: {exc}") from None
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _index(pipeline: Path) -> dict[str, Any]:
    try:
        index = json.loads((pipeline / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FolderSamplingError(f"cannot read {pipeline / 'model_index.json'}: {exc}") from None
    return index if isinstance(index, dict) else {}


@dataclass
class Conditioning:
    """One prompt as the UNet takes it: the context (1, L, E) and, for SDXL, ``added_cond_kwargs``."""
    context: torch.Tensor
    added: dict[str, torch.Tensor] | None = None


@dataclass
class FolderModel:
    """The UNet with the folder's weights, and the prompt's conditioning (and the negative prompt's, under
    guidance)."""
    unet: nn.Module
    cond: Conditioning
    uncond: Conditioning | None


def load_folder_model(name: str, prompt: str, negative_prompt: str | None, guided: bool, device: torch.device,
                      latent_size: tuple[int, int]) -> FolderModel:
    """UNet, tokenizer(s) and text encoder(s) from the folder; the prompt encoded as the pipeline's ``encode_prompt``
    does: SD-1.x/2.x the last hidden state of the padded, truncated token ids; SDXL both encoders' penultimate hidden
    states side by side, the second's pooled projection, and the size ids of a ``latent_size`` (H, W) image."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: PLC0415 - slow import

    pipeline = pipeline_of(name)
    index = _index(pipeline)
    xl = bool(index.get("text_encoder_2"))
    with folders.quiet_loading():
        tokenizers = [CLIPTokenizer.from_pretrained(pipeline / "tokenizer", local_files_only=True)]
        encoders = [CLIPTextModel.from_pretrained(pipeline / "text_encoder", local_files_only=True)]
        if xl:
            tokenizers.append(CLIPTokenizer.from_pretrained(pipeline / "tokenizer_2", local_files_only=True))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(pipeline / "text_encoder_2",
                                                                        local_files_only=True))
    encoders = [encoder.to(device).eval() for encoder in encoders]
    with torch.device(device):
        unet = folder_model(name).build()
    unet.to(device)
    size_ids = _size_ids(pipeline, latent_size) if xl else None
    with torch.inference_mode():
        cond = _encode(tokenizers, encoders, prompt, device, size_ids)
        uncond = None
        if guided and xl and negative_prompt is None and index.get("force_zeros_for_empty_prompt", True):
            uncond = Conditioning(torch.zeros_like(cond.context),
                                  {**(cond.added or {}), "text_embeds": torch.zeros_like((cond.added or {})[
                                      "text_embeds"])})
        elif guided:
            uncond = _encode(tokenizers, encoders, negative_prompt or "", device, size_ids)
    return FolderModel(unet, _cast(cond, unet.dtype), None if uncond is None else _cast(uncond, unet.dtype))


def _encode(tokenizers: list[Any], encoders: list[nn.Module], text: str, device: torch.device,
            size_ids: torch.Tensor | None) -> Conditioning:
    ids = [tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device) for tokenizer in tokenizers]
    if size_ids is None:  # SD-1.x/2.x
        return Conditioning(encoders[0](ids[0])[0])
    outputs = [encoder(i, output_hidden_states=True) for encoder, i in zip(encoders, ids)]
    context = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
    return Conditioning(context, {"text_embeds": outputs[-1][0], "time_ids": size_ids.to(device)})


def _size_ids(pipeline: Path, latent_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's ``time_ids`` for an image drawn whole at its own size: (H, W, 0, 0, H, W) in pixels."""
    try:
        blocks = json.loads((pipeline / "vae" / "config.json").read_text())["block_out_channels"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise FolderSamplingError(f"cannot read the VAE's block_out_channels from {pipeline / 'vae'}: {exc}") from None
    height, width = (side * 2 ** (len(blocks) - 1) for side in latent_size)
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


def _cast(conditioning: Conditioning, dtype: torch.dtype) -> Conditioning:
    added = {k: v.to(dtype) for k, v in conditioning.added.items()} if conditioning.added else None
    return Conditioning(conditioning.context.to(dtype), added)


def save_images(name: str, latents: torch.Tensor, path: Path) -> None:
    """Decode ``latents`` (S, C, H, W) with the folder's VAE and write them side by side as one PNG."""
    from diffusers import AutoencoderKL  # noqa: PLC0415 - diffusers takes 1-2 s to import
    from PIL import Image  # noqa: PLC0415

    with folders.quiet_loading():
        vae = AutoencoderKL.from_pretrained(pipeline_of(name) / "vae", local_files_only=True).eval()
    mean, std = (getattr(vae.config, key, None) for key in ("latents_mean", "latents_std"))
    latents = latents.to(vae.dtype).cpu()
    if mean is not None and std is not None:  # a VAE whose latents are standardised too (as the pipelines undo it)
        shape = (1, -1, 1, 1)
        latents = latents * torch.tensor(std).view(shape) / vae.config.scaling_factor + torch.tensor(mean).view(shape)
    else:
        latents = latents / vae.config.scaling_factor
    with torch.inference_mode():
        pixels = vae.decode(latents, return_dict=False)[0]
    images = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    row = np.concatenate(list((images * 255).round().astype("uint8")), axis=1)
    buffer = io.BytesIO()
    Image.fromarray(row).save(buffer, format="PNG")
    atomic.write_bytes(path, buffer.getvalue())


__all__ = ["Conditioning", "FolderModel", "FolderSamplingError", "is_pipeline_folder", "load_folder_model",
           "pipeline_of", "save_images", "scheduler_config"]
