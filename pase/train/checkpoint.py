"""Training checkpoints as safetensors files, written atomically.

One file per saved step, ``step-00000100.safetensors``, holding three kinds of tensors under
prefixes: ``model.`` (the trainable parameters: frozen ones come back from the source the job
was built from, so a TuneQDM checkpoint holds only its scales), ``ema.`` (their moving average)
and ``optim.`` (the optimizer's per-parameter state). The step, the optimizer's hyper-parameters
and the job's settings travel as JSON in the safetensors metadata. ``load_weights`` reads a plain
weights file tensor by tensor, so a large checkpoint is never mapped or held whole in memory.
"""
from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from pase import atomic
from pase.errors import PaseError

STEP_FILE = re.compile(r"^step-(\d{8})\.safetensors$")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointError(PaseError):
    """A checkpoint that is missing, unreadable, or does not belong to this job."""


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def step_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.safetensors"


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``folder`` (None if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FILE.match(p.name))]
    return max(steps)[1] if steps else None


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().clone()


def encode_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict()`` as flat tensors plus JSON (its param groups and non-tensor state)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = _plain(value)
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def decode_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (a temp file, then a rename)."""
    tensors = {f"model.{k}": _plain(v) for k, v in checkpoint.model.items()}
    tensors.update({f"ema.{k}": _plain(v) for k, v in checkpoint.ema.items()})
    optim_meta: dict[str, Any] | None = None
    if checkpoint.optimizer is not None:
        optim_tensors, optim_meta = encode_optimizer(checkpoint.optimizer)
        tensors.update(optim_tensors)
    metadata = {"pase_step": str(checkpoint.step), "pase_settings": json.dumps(checkpoint.settings),
                "pase_optimizer": json.dumps(optim_meta)}
    return atomic.write_bytes(path, safetensors_save(tensors, metadata=metadata))


def load_checkpoint(path: str | Path) -> Checkpoint:
    header, tensors = read_safetensors(path)
    meta = header.get("__metadata__") or {}
    if "pase_step" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a pase training checkpoint (no step in its "
                              "metadata); pass it as --init to start from its weights instead")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}}
    for name, tensor in tensors:
        prefix, _, rest = name.partition(".")
        groups[prefix][rest if prefix != "optim" else name] = tensor
    optim_meta = json.loads(meta.get("pase_optimizer") or "null")
    optimizer = decode_optimizer(groups["optim"], optim_meta) if optim_meta is not None else None
    return Checkpoint(int(meta["pase_step"]), groups["model"], groups["ema"], optimizer,
                      json.loads(meta.get("pase_settings") or "{}"))


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A plain weights file (a state dict), atomically; what ``--init`` reads."""
    return atomic.write_bytes(path, safetensors_save({k: _plain(v) for k, v in state.items()}, metadata=metadata))


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
