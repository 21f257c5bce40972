"""Captioned images as people keep them: a folder of images with a ``.txt`` caption beside each, or the
imagefolder convention's ``metadata.jsonl`` (one JSON object per line with ``file_name`` and ``text``).

Only paths and captions are held; an image is read, resized and cropped when a batch needs it (in a
``DataLoader`` worker), so a large folder never sits in memory on every rank. A missing caption is an
error, not an empty prompt: training a text-to-image model on silently unconditioned images is a
different job.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from pase import paths
from pase.train.data import IMAGE_SUFFIXES, DataError

METADATA = "metadata.jsonl"
CAPTION_KEY = "text"  # the imagefolder column diffusers' train_text_to_image reads by default


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    caption: str


def find_captioned(folder: Path) -> list[CaptionedImage]:
    """The folder's images and captions, in file-name order: from ``metadata.jsonl`` when the folder has one,
    else from a ``.txt`` file beside each image (same stem)."""
    if not paths.is_dir(folder):
        raise DataError(f"--data {folder} is not a folder; give a folder of images with captions (a .txt beside "
                        f"each image, or a {METADATA})")
    items = _from_metadata(folder) if (folder / METADATA).is_file() else _from_sidecars(folder)
    if not items:
        raise DataError(f"no captioned images in {folder}")
    return sorted(items, key=lambda item: str(item.path))


def _from_metadata(folder: Path) -> list[CaptionedImage]:
    metadata = folder / METADATA
    items = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{metadata} line {number} is not JSON ({exc.msg}); write one object per line with "
                            f"file_name and {CAPTION_KEY}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or \
                not isinstance(row.get(CAPTION_KEY), str):
            raise DataError(f"{metadata} line {number} needs a string file_name and a string {CAPTION_KEY}")
        path = (folder / row["file_name"]).resolve()
        if not path.is_relative_to(folder.resolve()) or not path.is_file():
            raise DataError(f"{metadata} line {number}: {row['file_name']!r} is not a file inside {folder}")
        items.append(CaptionedImage(path, row[CAPTION_KEY]))
    return items


def _from_sidecars(folder: Path) -> list[CaptionedImage]:
    images = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(images)} images in {folder} have no caption (e.g. "
                        f"{missing[0].relative_to(folder)}: no {missing[0].with_suffix('.txt').name}); write a .txt "
                        f"beside each image or a {METADATA}")
    return [CaptionedImage(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]


@dataclass(frozen=True)
class Augment:
    """diffusers' ``--random_flip`` and random crop (not ``--center_crop``), drawn from a per-row seed (the run, the
    epoch and the item: ``pase.train.streaming.row_seed``) so that any split of the batch over ranks, micro-steps or
    a resume reads the same pixels."""
    random_crop: bool = False
    random_flip: bool = False

    @property
    def active(self) -> bool:
        return self.random_crop or self.random_flip


def load_square(path: Path, resolution: int, augment: Augment = Augment(), seed: int | None = None
                ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """One image as (3, resolution, resolution) in [-1, 1], its original (height, width) and the crop's (top, left):
    the shorter side resized to ``resolution`` (bilinear), then the centre cropped, as diffusers' training scripts
    do with ``--center_crop`` (SDXL conditions on the original size and the crop); with ``augment`` a random crop
    and/or a horizontal flip (the crop's left then counted from the right edge, as diffusers' SDXL script does),
    drawn from ``seed``."""
    if augment.active and seed is None:
        raise ValueError("random crops and flips need the row's seed")
    rng = np.random.default_rng((seed, 0xA7)) if augment.active else None  # apart from the noise's draws
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            original = (image.height, image.width)
            scale = resolution / min(image.size)
            size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(size, Image.BILINEAR)
            if rng is not None and augment.random_crop:
                top = int(rng.integers(0, image.height - resolution + 1))
                left = int(rng.integers(0, image.width - resolution + 1))
            else:
                top = max(0, int(round((image.height - resolution) / 2.0)))
                left = max(0, int(round((image.width - resolution) / 2.0)))
            image = image.crop((left, top, left + resolution, top + resolution))
            if rng is not None and augment.random_flip and rng.random() < 0.5:
                left = image.width - left
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}; remove it from the data or fix it") from None
    return torch.from_numpy(pixels.copy()) * 2 - 1, original, (top, left)


class CaptionedImages(Dataset):
    """Map-style data set of ``{"pixel_values", "original_size", "crop_top_left", "input_ids"[, "input_ids_2"]}``:
    the image at ``resolution`` and its caption tokenized (``tokenize``: captions -> token ids per tokenizer;
    picklable, it runs in the workers). ``sample(index, seed)`` applies ``augment`` with the row's seed."""
    def __init__(self, items: list[CaptionedImage], resolution: int,
                 tokenize: Callable[[list[str]], dict[str, torch.Tensor]], augment: Augment = Augment()) -> None:
        self.items, self.resolution, self.tokenize, self.augment = items, resolution, tokenize, augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sample(index, None)

    def sample(self, index: int, seed: int | None) -> dict[str, torch.Tensor]:
        item = self.items[index]
        pixels, original, crop = load_square(item.path, self.resolution, self.augment, seed)
        ids = {name: value[0] for name, value in self.tokenize([item.caption]).items()}
        return {"pixel_values": pixels, "original_size": torch.tensor(original),
                "crop_top_left": torch.tensor(crop), **ids}


__all__ = ["Augment", "CaptionedImage", "CaptionedImages", "find_captioned", "load_square"]
