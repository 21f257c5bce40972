"""Training images without a download: generated shapes, the UCI handwritten digits (shipped), or a folder of images.

Every source returns one float tensor (N, C, S, S) in [-1, 1] (DDPM's range), built the same way
for the same seed, so every rank of a distributed job holds the same data set and a resumed run
sees the same batches. Batches are a function of the step number (``step_batches``), not of an
iterator's history: that is what makes ``--resume`` exact without saving loader state.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from pase import paths
from pase.errors import PaseError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# (dataset, batch_per_rank, dp_rank, dp_size, seed, start_step) -> one batch per step from start_step on
LoaderFactory = Callable[[torch.Tensor, int, int, int, int, int], Iterator[torch.Tensor]]


class DataError(PaseError):
    """A data source that cannot be read or does not fit the model."""
def load_images(source: str, size: int = 32, channels: int = 3, count: int = 2048, seed: int = 0) -> torch.Tensor:
    """Images of ``source`` (shapes, digits or a folder of image files): (N, channels, size, size) in [-1, 1]."""
    if size < 4:
        raise DataError(f"image size {size} is too small; use at least 4 (the zoo models take 32)")
    if source == "shapes":
        images = generated_shapes(count, size, seed)
    elif source == "digits":
        images = digits(size)
    elif source.strip() and paths.is_dir(source):  # "" would be the current folder: never what was meant
        images = image_folder(Path(source), size)
    else:
        raise DataError(f"unknown data source {source!r}: use 'shapes' (generated), 'digits' (the UCI "
                        "8x8 handwritten digits, upscaled) or the path of a folder of images")
    return match_channels(images, channels, source)


def match_channels(images: torch.Tensor, channels: int, source: str) -> torch.Tensor:
    """Grey images are repeated over the model's channels; colour images need 3 channels (or 1: their mean)."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        return images.mean(dim=1, keepdim=True)
    raise DataError(f"data {source!r} has {have} channels but the model takes {channels}; pick a model with "
                    f"{have} input channels or grey data")


def generated_shapes(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Filled discs, squares and triangles of random colour and place on a random plain background (RGB)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        background = rng.uniform(0, 1, 3).astype(np.float32)
        image = np.broadcast_to(background[:, None, None], (3, size, size)).copy()
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.uniform(0.2, 0.8, 2) * size
            radius = rng.uniform(0.12, 0.3) * size
            kind = rng.integers(3)
            if kind == 0:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
            elif kind == 1:
                mask = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
            else:  # upward triangle: below the two slanted edges and above the base
                mask = (yy <= cy + radius) & (np.abs(xx - cx) <= (yy - (cy - radius)) / 2)
            image[:, mask] = rng.uniform(0, 1, 3).astype(np.float32)[:, None]
        images[i] = image
    return torch.from_numpy(images) * 2 - 1


DIGITS_FILE = Path(__file__).with_name("digits.npz")


@lru_cache(maxsize=1)
def digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 handwritten digits (pixels 0..16, uint8) and their labels, shipped in ``digits.npz``.

    They are the UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin and Kaynak, 1998,
    CC BY 4.0), as scikit-learn bundles them; shipping the 45 kB file spares a scikit-learn and
    SciPy install (and SciPy's import, which diffusers triggers, from every capture).
    """
    try:
        with np.load(DIGITS_FILE) as data:
            return data["images"], data["labels"]
    except OSError as exc:
        raise DataError(f"the shipped digits data {DIGITS_FILE} cannot be read ({exc}); reinstall pase, or use "
                        "--data shapes") from None


def digits(size: int) -> torch.Tensor:
    """The shipped 1797 handwritten digits, upscaled bilinearly to ``size``; grey."""
    images = torch.from_numpy(digits_raw()[0].astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1


def image_folder(folder: Path, size: int) -> torch.Tensor:
    """Every image file under ``folder`` (recursively), centre-cropped to a square and resized to ``size``; RGB."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)} files, recursively)")
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
                images.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image {path}: {exc}; remove it from the folder or fix it") from None
    return torch.from_numpy(np.stack(images)) * 2 - 1


def split_held_out(images: torch.Tensor, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (train, held-out) split; the held-out part has at least one image."""
    if len(images) < 2:
        raise DataError(f"the data set has {len(images)} image(s); need at least 2 to hold some out")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    held = max(1, int(len(images) * fraction))
    return images[order[held:]], images[order[:held]]


def step_batches(dataset: torch.Tensor, batch_per_rank: int, dp_rank: int, dp_size: int, seed: int,
                 start_step: int = 0) -> Iterator[torch.Tensor]:
    """Batches for steps ``start_step, start_step + 1, ...``: the global batch of step s is positions
    ``s*B .. s*B+B-1`` of an endless sequence of seeded per-epoch permutations, and rank r takes its slice."""
    count = len(dataset)
    global_batch = batch_per_rank * dp_size
    perms: dict[int, torch.Tensor] = {}

    def perm(epoch: int) -> torch.Tensor:
        if epoch not in perms:
            if len(perms) > 2:
                perms.clear()
            perms[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        return perms[epoch]

    step = start_step
    while True:
        first = step * global_batch + dp_rank * batch_per_rank
        positions = range(first, first + batch_per_rank)
        index = torch.stack([perm(p // count)[p % count] for p in positions])
        yield dataset[index]
        step += 1
