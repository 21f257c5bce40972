"""Weight files: state dicts as safetensors, written atomically and read a bounded chunk at a time.

Every layer that saves or loads weights (training, fine-tuning strategies, sampling) goes through
here, so a large file is never memory-mapped or held whole in memory, and a file that is not what it
claims gives one clear error.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from pase import atomic
from pase.errors import PaseError

READ_CHUNK_BYTES = 64 * 2**20  # mapped and read before the file is reopened (see read_safetensors)
_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(PaseError):
    """A checkpoint that is missing, unreadable, or does not belong to this job."""


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy: what safetensors can write."""
    return tensor.detach().to("cpu").contiguous().clone()


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A plain weights file (a state dict), atomically; what ``--init`` reads."""
    return atomic.write_bytes(path, safetensors_save({k: plain_tensor(v) for k, v in state.items()}, metadata=metadata))


def read_safetensors(path: str | Path) -> tuple[dict[str, str], Iterator[tuple[str, torch.Tensor]]]:
    """The file's metadata and a lazy iterator over (name, tensor), through the safetensors library (its header
    checks included). The library memory-maps the file, and every page a read touches counts in the resident set
    until the map closes: the file is reopened every ``READ_CHUNK_BYTES`` of tensors, so a large file never
    counts whole in a run's peak memory."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            names = handle.keys()  # a safetensors handle is not iterable
            sizes = [(name, _nbytes(handle.get_slice(name))) for name in names]
    except (OSError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as a safetensors file: {exc}") from None

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        chunk: list[str] = []
        filled = 0
        for index, (name, size) in enumerate(sizes):
            chunk.append(name)
            filled += size
            if filled >= READ_CHUNK_BYTES or index == len(sizes) - 1:
                try:
                    with safe_open(str(path), framework="pt") as handle:
                        loaded = [(name, handle.get_tensor(name)) for name in chunk]
                except (OSError, SafetensorError, ValueError) as exc:
                    raise CheckpointError(f"cannot read {path}: {exc}") from None
                yield from loaded
                chunk, filled = [], 0

    return metadata, tensors()


def _nbytes(part: Any) -> int:
    """Bytes of a tensor in the file, from its shape and dtype (nothing read)."""
    count = 1
    for extent in part.get_shape():
        count *= extent
    return count * _ITEM_BYTES.get(part.get_dtype(), 8)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A whole weights file as a state dict."""
    _, tensors = read_safetensors(path)
    return dict(tensors)


@torch.no_grad()
def load_weights_into(model: torch.nn.Module, path: str | Path) -> None:
    """Copy a weights file into ``model`` tensor by tensor (works after ``to_empty``); keys must match exactly."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    seen = set()
    _, tensors = read_safetensors(path)
    for name, tensor in tensors:
        if name not in own:
            raise CheckpointError(f"{path} has a tensor {name!r} that the model does not have; is it a weights file "
                                  "of this model (pase train --model ... writes one)?")
        if own[name].shape != tensor.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model {tuple(own[name].shape)}")
        own[name].copy_(tensor)
        seen.add(name)
    if missing := sorted(set(own) - seen):
        raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) of the model, e.g. {missing[:3]}")


__all__ = ["CheckpointError", "load_weights", "load_weights_into", "plain_tensor", "read_safetensors", "save_weights"]
