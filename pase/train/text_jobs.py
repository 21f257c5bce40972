"""The text-to-image side of ``pase train`` / ``pase finetune --strategy full``: a diffusers pipeline folder as
``--model``, captioned images or a ``pase cache`` folder as ``--data``.

``text_training`` turns the job's options into what ``fit`` takes (a streamed data set, its loader and the
latent objective) and checks everything that can be checked before the first step: the pipeline's parts,
the resolution against the VAE and the UNet, a cache's shapes against the model. ``export_model`` writes
what people load: ``OUT/unet/`` in diffusers format and, around it, the rest of the pipeline, so that
``StableDiffusionPipeline.from_pretrained(OUT)`` works.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch.utils.data import Dataset

from pase import atomic
from pase.errors import PaseError
from pase.models import folders
from pase.models.zoo import ModelSpec
from pase.train.captions import Augment, CaptionedImages, find_captioned
from pase.train.data import DataError, LoaderFactory
from pase.train.latent_cache import LatentCache, is_cache
from pase.train.loop import Objective
from pase.train.streaming import Transform, streamed
from pase.train.text_to_image import (
    FrozenEncoders,
    LatentLoss,
    TextToImageError,
    Tokenize,
    check_pipeline,
    is_sdxl,
    latent_objective,
    noise_scheduler,
    vae_scale_factor,
)
from pase.weights import plain_tensor

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class TextTraining:
    """What ``fit`` needs for a text-to-image job, and what identifies it for ``--resume``."""
    dataset: Dataset
    loader: LoaderFactory
    objective: Objective
    resolution: int
    source: str  # "images" or "cache"
    identity: dict[str, Any] = field(default_factory=dict)
    scheduler: Any = None  # the pipeline's training schedule (DDPMScheduler)
    loss: LatentLoss = LatentLoss("epsilon")  # settled: the prediction type resolved
    encode: Transform | None = None  # a batch of the data set -> the UNet's inputs (None: a cache holds them)

    def objective_with(self, **changes: Any) -> Objective:
        """This job's latent objective with a fine-tuning strategy's changes (``latent_objective``'s options)."""
        return latent_objective(self.scheduler, self.loss, **changes)


def is_text_conditioned(spec: ModelSpec) -> bool:
    return any(spec_input.name == "encoder_hidden_states" for spec_input in spec.inputs)


def pipeline_of(spec: ModelSpec) -> Path | None:
    """The pipeline folder a folder model came from (None for a UNet folder alone or a zoo model)."""
    if not folders.looks_like_folder(spec.name):
        return None
    return folders.unet_folder(spec.name)[1]


def text_training(spec: ModelSpec, data: str, image_size: int | None, loss: LatentLoss, device: torch.device,
                  dtype: torch.dtype = torch.float32, workers: int = 2, augment: Augment = Augment()) -> TextTraining:
    """The streamed data, loader and objective of a text-to-image job; every check before any weights load."""
    if not data.strip():  # "" would be the current folder: never what was meant
        raise DataError("--data is empty: give a folder of captioned images or a `pase cache` folder")
    pipeline = check_pipeline(pipeline_of(spec), spec.name)
    takes_pooled = any(spec_input.name == "text_embeds" for spec_input in spec.inputs)
    if takes_pooled != is_sdxl(pipeline):
        takes, has = ("takes", "one text encoder") if takes_pooled else ("does not take", "two text encoders")
        raise TextToImageError(f"{spec.name}: its UNet {takes} SDXL's pooled text embeddings and time ids, but the "
                               f"pipeline has {has}; use the pipeline folder the UNet belongs to")
    scheduler = noise_scheduler(pipeline)
    loss = LatentLoss(loss.prediction_type or scheduler.config.prediction_type, loss.snr_gamma, loss.noise_offset)
    loss.validate()
    sample = spec.inputs[0].shape
    latent_channels = int(sample[1])
    levels = len(spec.config.get("block_out_channels") or ()) or 1
    context = next(i for i in spec.inputs if i.name == "encoder_hidden_states").shape[1:]
    identity = {"prediction_type": loss.prediction_type, "snr_gamma": loss.snr_gamma,
                "noise_offset": loss.noise_offset}
    if augment.active:  # a resume must crop and flip alike
        identity.update(random_crop=augment.random_crop, random_flip=augment.random_flip)
    if is_cache(data):
        if augment.active:
            raise DataError(f"--random-crop and --random-flip need the images: the cache {data} holds the latents of "
                            "one centre crop of each; train from the image folder, or leave them out")
        cache = LatentCache(data)
        resolution = int(cache.manifest["resolution"])
        if image_size is not None and image_size != resolution:
            raise DataError(f"the cache {data} holds latents of {resolution}-pixel images, not --image-size "
                            f"{image_size}; write a cache at that size or leave --image-size out")
        latent = cache.shape("latent_mean")
        xl = takes_pooled
        if xl != ("text_embeds" in cache.manifest["shapes"]):
            raise DataError(f"the cache {data} was written {'with' if not xl else 'without'} SDXL's pooled text "
                            f"embeddings and time ids, which {spec.name} {'takes' if xl else 'does not take'}; cache "
                            "the data with this model's pipeline")
        if latent[0] != latent_channels or latent[1] % 2 ** (levels - 1) or cache.shape("encoder_hidden_states")[
                -1] != int(context[-1]):
            raise DataError(f"the cache {data} (latents {latent}, text embeddings "
                            f"{cache.shape('encoder_hidden_states')}) does not fit {spec.name}, which takes "
                            f"{latent_channels}-channel latents in multiples of {2 ** (levels - 1)} and "
                            f"{context[-1]}-wide text embeddings; cache the data with this model's pipeline")
        return TextTraining(cache, streamed(None, workers), latent_objective(scheduler, loss), resolution, "cache",
                            {**identity, "resolution": resolution}, scheduler, loss)
    resolution = text_cache_settings(spec, image_size)[1]
    items = find_captioned(Path(data))
    tokenize = Tokenize(pipeline)
    encoders = FrozenEncoders(pipeline, device, dtype)

    return TextTraining(CaptionedImages(items, resolution, tokenize, augment), streamed(encoders, workers),
                        latent_objective(scheduler, loss), resolution, "images", {**identity, "resolution": resolution},
                        scheduler, loss, encoders)


def text_cache_settings(spec: ModelSpec, image_size: int | None) -> tuple[Path, int]:
    """(the pipeline folder, the resolution in pixels) for ``pase cache`` of a text-to-image model."""
    if not is_text_conditioned(spec):
        raise PaseError(f"{spec.name} is not a text-conditioned UNet; pase cache encodes data for text-to-image "
                        "pipeline folders")
    pipeline = check_pipeline(pipeline_of(spec), spec.name)
    factor = vae_scale_factor(pipeline)
    levels = len(spec.config.get("block_out_channels") or ()) or 1
    resolution = image_size or int(spec.inputs[0].shape[-1]) * factor
    if resolution % (factor * 2 ** (levels - 1)):
        raise PaseError(f"--image-size {resolution}: use a multiple of {factor * 2 ** (levels - 1)} (the VAE's factor "
                        f"{factor} times the UNet's {2 ** (levels - 1)})")
    return pipeline, resolution


def export_model(out: Path, spec: ModelSpec, weights: dict[str, torch.Tensor], folder: str = "unet") -> list[Path]:
    """``OUT/<folder>/`` as diffusers' ``save_pretrained`` writes a UNet (its config and full weights), and with a
    pipeline as the model, the pipeline's other parts beside it (``model_index.json`` and its part folders,
    hard-linked where the file system allows, else copied), each file written atomically."""
    unet, pipeline = folders.unet_folder(spec.name)
    written = [atomic.copy_file(unet / "config.json", out / folder / "config.json"),
               atomic.write_bytes(out / folder / UNET_WEIGHTS,
                                  safetensors_save({k: plain_tensor(v) for k, v in weights.items()},
                                                   metadata={"format": "pt"}))]
    if pipeline is None or folder != "unet":
        return written
    index = json.loads((pipeline / "model_index.json").read_text())
    parts = [name for name, value in index.items() if not name.startswith("_") and name != "unet" and
             isinstance(value, list) and value[0] is not None and (pipeline / name).is_dir()]
    for part in parts:
        for source in sorted((pipeline / part).rglob("*")):
            if source.is_file():
                written.append(_link_or_copy(source, out / part / source.relative_to(pipeline / part)))
    written.append(atomic.copy_file(pipeline / "model_index.json", out / "model_index.json"))
    return written


def _link_or_copy(source: Path, target: Path) -> Path:
    """A frozen part's file in the output: a hard link (no space, instant) or, across file systems, a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.link")
    try:
        temporary.unlink(missing_ok=True)
        os.link(source, temporary)
        os.replace(temporary, target)
        return target
    except OSError:
        temporary.unlink(missing_ok=True)
        return atomic.copy_file(source, target)


__all__ = ["TextTraining", "export_model", "is_text_conditioned", "pipeline_of", "text_cache_settings",
           "text_training"]
