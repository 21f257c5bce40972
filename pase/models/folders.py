"""Models from where users keep them: a diffusers pipeline folder (``model_index.json``, its ``unet/``) or a UNet
folder (``config.json`` and weights, as ``save_pretrained`` writes it).

The folder's config is read as JSON (no code runs because a file says so), and the model is built from it:
on the meta device from the config alone (capture and planning never read the weights), anywhere else with
``from_pretrained`` semantics (safetensors or ``.bin`` weights, an ``fp16`` / ``bf16`` variant when that is all
the folder has). Example inputs follow the config: the latent sample and timestep, and for a text-conditioned
UNet the text embeddings (the pipeline tokenizer's length, else CLIP's 77) and SDXL's pooled text embeddings
and time ids.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pase import paths
from pase.errors import UnknownModelError

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
VARIANTS = ("fp16", "bf16")  # weight-file variants diffusers' save_pretrained writes
CLIP_TEXT_LENGTH = 77
LOW_MEMORY_LOAD = importlib.util.find_spec("accelerate") is not None  # diffusers warns without it, loads plainly


def looks_like_folder(name: str) -> bool:
    """Is ``--model NAME`` meant as a path (an existing folder, or written as one)?"""
    return paths.is_dir(name) or name.startswith((".", "/", "~")) or ("/" in name and ":" not in name)


def unet_folder(name: str) -> tuple[Path, Path | None]:
    """(the UNet folder, the pipeline folder around it or None) for ``--model NAME``, or ``UnknownModelError``."""
    root = paths.expanded(name)
    if not paths.is_dir(root):
        raise UnknownModelError(f"model folder {name!r} does not exist; give a diffusers pipeline folder (with "
                                "model_index.json) or a UNet folder (config.json and weights)")
    if (root / "model_index.json").is_file():
        unet = root / "unet"
        if not (unet / "config.json").is_file():
            raise UnknownModelError(f"{root} is a diffusers pipeline folder without unet/config.json; pase plans and "
                                    "trains the pipeline's UNet")
        return unet, root
    if (root / "config.json").is_file():
        return root, None
    raise UnknownModelError(f"{root} has neither model_index.json (a diffusers pipeline folder) nor config.json (a "
                            "UNet folder, as save_pretrained writes it)")


def read_config(unet: Path) -> tuple[str, dict[str, Any]]:
    """(the UNet's class name, its constructor config without diffusers' private keys)."""
    try:
        raw = json.loads((unet / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UnknownModelError(f"cannot read {unet / 'config.json'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise UnknownModelError(f"{unet / 'config.json'} is not a JSON object")
    cls = raw.get("_class_name")
    if cls not in UNET_CLASSES:
        raise UnknownModelError(f"{unet / 'config.json'} describes a {cls!r}; pase plans and trains "
                                f"{' and '.join(UNET_CLASSES)} models")
    return str(cls), {k: v for k, v in raw.items() if not k.startswith("_")}


def weights_variant(unet: Path) -> str | None:
    """The variant to load: None when the folder has plain weights, else the one variant it has."""
    names = [p.name for p in unet.iterdir() if p.suffix in (".safetensors", ".bin")]
    if any(name.count(".") == 1 for name in names):  # diffusion_pytorch_model.safetensors
        return None
    found = [variant for variant in VARIANTS if any(f".{variant}." in name for name in names)]
    if not found:
        raise UnknownModelError(f"{unet} has a config but no weights (diffusion_pytorch_model.safetensors or a "
                                f"{'/'.join(VARIANTS)} variant); planning needs only the config, training the weights")
    return found[0]


def vae_factor(pipeline: Path) -> int | None:
    """Pixels per latent cell along each side: 2 per level of the pipeline's VAE after the first (8 for SD's);
    None without a readable VAE config."""
    try:
        config = json.loads((pipeline / "vae" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return 2 ** (len(config.get("block_out_channels") or [0]) - 1)


def text_length(pipeline: Path | None) -> int:
    """Tokens per prompt: the pipeline tokenizer's ``model_max_length``, else CLIP's 77."""
    config = pipeline / "tokenizer" / "tokenizer_config.json" if pipeline else None
    if config is not None and config.is_file():
        try:
            length = json.loads(config.read_text()).get("model_max_length")
        except (OSError, json.JSONDecodeError):
            length = None
        if isinstance(length, int) and 0 < length <= 4096:
            return length
    return CLIP_TEXT_LENGTH


def conditioning_inputs(cls: str, config: dict[str, Any], tokens: int) -> list[tuple[str, tuple[int | str, ...],
                                                                                     str | None]]:
    """(name, shape with "B", keyword) of each input beyond sample and timestep, or ``UnknownModelError`` for
    conditioning pase cannot make example inputs for."""
    if cls == "UNet2DModel":
        if config.get("class_embed_type") or config.get("num_class_embeds"):
            raise UnknownModelError("class-conditioned UNet2DModel folders are not supported yet (class_labels)")
        return []
    if config.get("class_embed_type") or config.get("num_class_embeds"):
        raise UnknownModelError("UNet2DConditionModel folders with class embeddings are not supported yet "
                                f"(class_embed_type {config.get('class_embed_type')!r})")
    width = config.get("encoder_hid_dim") or config.get("cross_attention_dim") or 1280
    width = width[0] if isinstance(width, (list, tuple)) else width
    inputs: list[tuple[str, tuple[int | str, ...], str | None]] = [("encoder_hidden_states", ("B", tokens,
                                                                                              int(width)), None)]
    added = config.get("addition_embed_type")
    if added == "text_time":  # SDXL: pooled text embeddings and (original size, crop, target size)
        pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
        inputs += [("text_embeds", ("B", pooled), "added_cond_kwargs"), ("time_ids", ("B", 6), "added_cond_kwargs")]
    elif added:
        raise UnknownModelError(f"UNet2DConditionModel folders with addition_embed_type {added!r} are not "
                                "supported yet (text_time, SDXL's, is)")
    return inputs


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading chatter (progress bars, info logs, deprecation notes about a folder's
    config, the accelerate hint) silenced while a folder loads: pase reports what it loaded itself, and errors
    still raise."""
    import diffusers.utils.logging as diffusers_logging  # noqa: PLC0415
    import transformers.utils.logging as transformers_logging  # noqa: PLC0415

    saved = [(module, module.get_verbosity(), module.is_progress_bar_enabled())
             for module in (diffusers_logging, transformers_logging)]
    for module, _, _ in saved:
        module.set_verbosity_error()
        module.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for library in ("diffusers", "transformers"):
                warnings.filterwarnings("ignore", module=rf"{library}(\..*)?")
            yield
    finally:
        for module, verbosity, bars in saved:
            module.set_verbosity(verbosity)
            if bars:
                module.enable_progress_bar()


def build_from_folder(cls: str, config: dict[str, Any], unet: Path) -> nn.Module:
    """The UNet: from its config on the meta device, with the folder's weights anywhere else."""
    import diffusers  # noqa: PLC0415 - diffusers takes 1-2 s to import

    model_class = getattr(diffusers, cls)
    if torch.get_default_device().type == "meta":
        return model_class.from_config(config)
    with quiet_loading():
        return model_class.from_pretrained(unet, variant=weights_variant(unet), local_files_only=True,
                                           low_cpu_mem_usage=LOW_MEMORY_LOAD)


__all__ = ["LOW_MEMORY_LOAD", "build_from_folder", "conditioning_inputs", "looks_like_folder", "quiet_loading",
           "read_config", "text_length",
           "unet_folder", "weights_variant"]
