"""``pase cache``: the latents and text embeddings of captioned images, computed once into safetensors shards.

Large text-to-image runs encode their data once and train from the cache, without loading the VAE or the
text encoders. A cache folder holds ``shard-NNNNN.safetensors`` files (``latent_mean``, ``latent_std`` and
``encoder_hidden_states``, for SDXL also ``text_embeds`` and ``time_ids``; one row per image, in the data's
file order) and ``cache.json`` (written last: a folder without it is an unfinished cache), which records the
pipeline, resolution and shapes so that training checks the cache against the model before its first step.
"""
from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch.utils.data import DataLoader, Dataset

from pase import atomic, paths
from pase.train.captions import CaptionedImages, find_captioned
from pase.train.data import DataError
from pase.train.text_to_image import FrozenEncoders, Tokenize

MANIFEST = "cache.json"
VERSION = 1
TENSORS = ("latent_mean", "latent_std", "encoder_hidden_states")  # every cache
XL_TENSORS = ("text_embeds", "time_ids")  # an SDXL pipeline's caches too


def is_cache(folder: str | Path) -> bool:
    return paths.is_file(Path(folder) / MANIFEST)


def write_cache(pipeline: Path, data: Path, out: Path, resolution: int, device: torch.device,
                dtype: torch.dtype = torch.float32, batch: int = 8, shard_items: int = 1024, workers: int = 2,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Encode every captioned image of ``data`` with ``pipeline``'s frozen encoders into ``out``; returns the
    manifest. ``progress(done, total)`` is called after each batch."""
    if is_cache(out):
        raise DataError(f"{out} already holds a cache ({MANIFEST}); choose another --out or remove it")
    items = find_captioned(data)
    tokenize = Tokenize(pipeline)
    encoders = FrozenEncoders(pipeline, device, dtype)
    loader = DataLoader(CaptionedImages(items, resolution, tokenize), batch_size=batch, shuffle=False,
                        num_workers=workers)
    shards: list[dict[str, Any]] = []
    names = TENSORS + (XL_TENSORS if encoders.xl else ())
    pending: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    done = 0

    def flush() -> None:
        rows = {name: torch.cat(parts).contiguous() for name, parts in pending.items() if parts}
        if not rows:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        atomic.write_bytes(out / name, safetensors_save({k: v.cpu() for k, v in rows.items()}))
        shards.append({"file": name, "count": int(rows["latent_mean"].shape[0])})
        for parts in pending.values():
            parts.clear()

    for batch_inputs in loader:
        encoded = encoders(batch_inputs)
        for name in names:
            pending[name].append(encoded[name].cpu())
        done += len(batch_inputs["input_ids"])
        if sum(len(t) for t in pending["latent_mean"]) >= shard_items:
            flush()
        if progress is not None:
            progress(done, len(items))
    flush()
    first = load_shard_shapes(out / shards[0]["file"])
    manifest = {"version": VERSION, "pipeline": str(pipeline.resolve()), "data": str(data.resolve()),
                "resolution": resolution, "count": done, "dtype": str(dtype).removeprefix("torch."),
                "scaling_factor": encoders.scaling_factor, "shapes": first, "shards": shards}
    atomic.write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def load_shard_shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), framework="pt") as handle:
        names = handle.keys()  # a safetensors handle is not iterable
        return {name: list(handle.get_slice(name).get_shape()[1:]) for name in names}


def read_manifest(folder: Path) -> dict[str, Any]:
    """The cache's manifest, checked: one line naming the file and what is wrong."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the cache manifest {path}: {exc}; write the cache again with pase cache") \
            from None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        raise DataError(f"{path} is not a version-{VERSION} pase cache manifest; write the cache again with pase cache")
    shards = manifest.get("shards")
    shapes = manifest.get("shapes")
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("count"), int) and
            s["count"] > 0 and "/" not in s["file"] and (folder / s["file"]).is_file() for s in shards):
        raise DataError(f"{path}: its shards are missing or malformed; write the cache again with pase cache")
    if not isinstance(shapes, dict) or set(shapes) not in (set(TENSORS), set(TENSORS + XL_TENSORS)) or not all(
            isinstance(v, list) and all(isinstance(d, int) and d > 0 for d in v) for v in shapes.values()):
        raise DataError(f"{path}: 'shapes' must give {', '.join(TENSORS)} (and {', '.join(XL_TENSORS)} for SDXL); "
                        "write the cache again with pase cache")
    return manifest


class LatentCache(Dataset):
    """A cache folder as a map-style data set of ``{latent_mean, latent_std, encoder_hidden_states}`` rows.
    Shards are opened lazily in each process that reads them (DataLoader workers included)."""
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.files = [shard["file"] for shard in self.manifest["shards"]]
        self.starts = [0]
        for shard in self.manifest["shards"]:
            self.starts.append(self.starts[-1] + shard["count"])
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.manifest["shapes"][name])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard = bisect.bisect_right(self.starts, index) - 1
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.folder / self.files[shard]), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for a corrupt header
                raise DataError(f"cannot read cache shard {self.folder / self.files[shard]}: {exc}; write the cache "
                                "again with pase cache") from None
        handle, row = self._handles[shard], index - self.starts[shard]
        return {name: handle.get_slice(name)[row:row + 1][0] for name in self.manifest["shapes"]}

    def __getstate__(self) -> dict[str, Any]:  # workers reopen the shards themselves
        return {**self.__dict__, "_handles": {}}


__all__ = ["LatentCache", "MANIFEST", "is_cache", "read_manifest", "write_cache"]
