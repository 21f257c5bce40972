"""Sampling a diffusers text-to-image pipeline folder (SD-1.x/2.x layout): its tokenizer and CLIP text encoder turn
``--prompt`` (and ``--negative-prompt``, "" by default, as diffusers does) into the UNet's context, the samplers run
on its latents with DDPM or DDIM over the folder's own noise schedule (betas, prediction type, timestep spacing
from ``scheduler/scheduler_config.json``), and its VAE decodes the result into images.

With the same x_T, DDIM and ``--tol 0``, this gives what the folder's own ``StableDiffusionPipeline`` draws with a
``DDIMScheduler`` from that config (tested). The folder's scheduler class itself (PNDM, DPM-Solver, ...) is not
driven: its multistep updates do not batch over timesteps as ParaDiGMS and SRDS need.
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
    """The pipeline folder, refusing a UNet folder alone and SDXL (two text encoders)."""
    if not folders.looks_like_folder(name):
        raise FolderSamplingError(f"--prompt needs a diffusers pipeline folder as --model; {name!r} is a zoo model "
                                  "without a text encoder")
    pipeline = folders.unet_folder(name)[1]
    if pipeline is None:
        raise FolderSamplingError(f"{name} is a UNet folder without a pipeline around it: pase sample needs the "
                                  "pipeline folder (model_index.json, text_encoder/, tokenizer/, vae/, scheduler/)")
    index = json.loads((pipeline / "model_index.json").read_text())
    if "text_encoder_2" in index:
        raise FolderSamplingError(f"{pipeline} is an SDXL pipeline (two text encoders, pooled embeddings, size "
                                  "conditioning), which pase sample does not drive yet; sample it with diffusers")
    missing = [part for part in ("text_encoder", "tokenizer", "vae", "scheduler") if not (pipeline / part).is_dir()]
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


@dataclass
class FolderModel:
    """The UNet with the folder's weights, and the prompt's context (and the negative prompt's, under guidance)."""
    unet: nn.Module
    context: torch.Tensor  # (1, L, E)
    uncond_context: torch.Tensor | None


def load_folder_model(name: str, prompt: str, negative_prompt: str | None, guided: bool,
                      device: torch.device) -> FolderModel:
    """UNet, tokenizer and text encoder from the folder; the prompt encoded as the pipeline's ``encode_prompt``
    does (last hidden state of the padded, truncated token ids)."""
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: PLC0415 - transformers takes seconds to import

    pipeline = pipeline_of(name)
    with folders.quiet_loading():
        tokenizer = CLIPTokenizer.from_pretrained(pipeline / "tokenizer", local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(pipeline / "text_encoder", local_files_only=True).to(device).eval()
    with torch.device(device):
        unet = folder_model(name).build()
    unet.to(device)
    with torch.inference_mode():
        context = _encode(tokenizer, encoder, prompt, device)
        uncond = _encode(tokenizer, encoder, negative_prompt or "", device) if guided else None
    return FolderModel(unet, context.to(unet.dtype), None if uncond is None else uncond.to(unet.dtype))


def _encode(tokenizer: Any, encoder: nn.Module, text: str, device: torch.device) -> torch.Tensor:
    ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(device))[0]


def save_images(name: str, latents: torch.Tensor, path: Path) -> None:
    """Decode ``latents`` (S, C, H, W) with the folder's VAE and write them side by side as one PNG."""
    from diffusers import AutoencoderKL  # noqa: PLC0415 - diffusers takes 1-2 s to import
    from PIL import Image  # noqa: PLC0415

    with folders.quiet_loading():
        vae = AutoencoderKL.from_pretrained(pipeline_of(name) / "vae", local_files_only=True).eval()
    with torch.inference_mode():
        pixels = vae.decode(latents.to(vae.dtype).cpu() / vae.config.scaling_factor, return_dict=False)[0]
    images = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    row = np.concatenate(list((images * 255).round().astype("uint8")), axis=1)
    buffer = io.BytesIO()
    Image.fromarray(row).save(buffer, format="PNG")
    atomic.write_bytes(path, buffer.getvalue())


__all__ = ["FolderModel", "FolderSamplingError", "is_pipeline_folder", "load_folder_model", "pipeline_of",
           "save_images", "scheduler_config"]
