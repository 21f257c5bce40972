"""A tiny Stable-Diffusion-style pipeline folder and captioned images, built locally (no download).

The same layout as a real SD-1.x checkpoint (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; with ``xl`` SDXL's, adding ``text_encoder_2/`` and ``tokenizer_2/``), with
components small enough to train on a CPU in seconds: CLIP text encoders over a byte-level vocabulary (every
byte one token, no merges), a two-level VAE and a two-level ``UNet2DConditionModel`` with cross-attention.
Seeded weights. Tests, the docs' walk-through and ``tools/make_tiny_sd.py`` use it; every ``pase`` command
that takes a real pipeline folder takes this one.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pase.models.folders import quiet_loading

TOKENS = 16  # prompt length of the tiny tokenizer
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("disc", "square")


def byte_vocabulary() -> dict[str, int]:
    """CLIP's special tokens and every byte as a token, alone and word-final (``</w>``): no merges needed."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: PLC0415

    chars = list(bytes_to_unicode().values())
    vocabulary = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in chars:
            vocabulary.setdefault(char + suffix, len(vocabulary))
    return vocabulary


def save_tiny_pipeline(folder: str | Path, seed: int = 0, sample_size: int = 8, xl: bool = False) -> Path:
    """Write the tiny pipeline to ``folder`` (``save_pretrained``); returns it. ``xl``: SDXL's layout (two text
    encoders, the second with a projection, a UNet conditioned on pooled text embeddings and size/crop ids)."""
    with quiet_loading():  # the libraries' import-time and deprecation notes
        return _save_tiny_pipeline(Path(folder), seed, sample_size, xl)


def _save_tiny_pipeline(folder: Path, seed: int, sample_size: int, xl: bool) -> Path:
    from diffusers import (  # noqa: PLC0415
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: PLC0415

    vocabulary = byte_vocabulary()
    torch.manual_seed(seed)

    def text_config() -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(vocabulary), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                              num_hidden_layers=2, max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, projection_dim=32)

    text_encoder = CLIPTextModel(text_config())
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=sample_size * 2)
    common = {"sample_size": sample_size, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32),
              "layers_per_block": 1, "norm_num_groups": 8}
    if xl:  # SDXL's UNet: attention in the lower level, both encoders' widths, pooled text and 6 ids added
        unet = UNet2DConditionModel(
            **common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32)
    else:
        unet = UNet2DConditionModel(
            **common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1)
    with tempfile.TemporaryDirectory() as files:  # vocab.json and merges.txt: the form every transformers reads
        vocab, merges = Path(files) / "vocab.json", Path(files) / "merges.txt"
        vocab.write_text(json.dumps(vocabulary))
        merges.write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=TOKENS)
        tokenizer_2 = CLIPTokenizer(str(vocab), str(merges), model_max_length=TOKENS, pad_token="!")  # SDXL's pads "!"
    if xl:
        pipeline: Any = StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=CLIPTextModelWithProjection(text_config()),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)
    else:
        pipeline = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


def save_captioned_shapes(folder: str | Path, count: int = 32, size: int = 16, seed: int = 0,
                          metadata: bool = False) -> Path:
    """``count`` PNGs of one coloured shape on a plain background, each captioned with what it shows
    ("a red disc on a blue background"): a ``.txt`` beside each image, or one ``metadata.jsonl``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    rows = []
    for i in range(count):
        shape, colour, background = SHAPES[rng.integers(len(SHAPES))], *rng.choice(names, 2, replace=False)
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        radius = rng.uniform(0.15, 0.3) * size
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2 if shape == "disc" else \
            (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
        pixels = np.empty((size, size, 3), dtype=np.uint8)
        pixels[:] = COLOURS[background]
        pixels[mask] = COLOURS[colour]
        name = f"{i:04d}.png"
        Image.fromarray(pixels).save(folder / name)
        caption = f"a {colour} {shape} on a {background} background"
        if metadata:
            rows.append(json.dumps({"file_name": name, "text": caption}))
        else:
            (folder / name).with_suffix(".txt").write_text(caption + "\n")
    if metadata:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


__all__ = ["byte_vocabulary", "save_captioned_shapes", "save_tiny_pipeline"]
