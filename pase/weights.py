"""Weight files: state dicts as safetensors, written atomically and read one tensor at a time.

Every layer that saves or loads weights (training, fine-tuning strategies, sampling) goes through
here, so a large file is never memory-mapped or held whole in memory, and a file that is not what it
claims gives one clear error.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from pase import atomic
from pase.errors import PaseError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointError(PaseError):
    """A checkpoint that is missing, unreadable, or does not belong to this job."""


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy: what safetensors can write."""
    return tensor.detach().to("cpu").contiguous().clone()


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A plain weights file (a state dict), atomically; what ``--init`` reads."""
    return atomic.write_bytes(path, safetensors_save({k: plain_tensor(v) for k, v in state.items()}, metadata=metadata))


def read_safetensors(path: str | Path) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]]]:
    """The header and a lazy iterator over (name, tensor): each tensor is read with a seek and a read, so
    only one is in memory at a time (no memory map whose pages would count in the resident set)."""
    path = Path(path)
    try:
        handle = path.open("rb")
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path} as a safetensors file: {exc}") from None
    start = 8 + length

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        with handle:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                handle.seek(start + begin)
                raw = bytearray(handle.read(end - begin))
                dtype = _DTYPES[info["dtype"]]
                tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                yield name, tensor.reshape(info["shape"])

    return header, tensors()


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
