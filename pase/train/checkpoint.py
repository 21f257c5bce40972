"""Training checkpoints as safetensors files, written atomically.

One file per saved step, ``step-00000100.safetensors``, holding three kinds of tensors under
prefixes: ``model.`` (the trainable parameters: frozen ones come back from the source the job
was built from, so a TuneQDM checkpoint holds only its scales), ``ema.`` (their moving average)
and ``optim.`` (the optimizer's per-parameter state). The step, the optimizer's hyper-parameters
and the job's settings travel as JSON in the safetensors metadata. Plain weights files are
``pase.weights``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from pase import atomic
from pase.weights import CheckpointError, plain_tensor, read_safetensors

STEP_FILE = re.compile(r"^step-(\d{8})\.safetensors$")


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


def encode_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict()`` as flat tensors plus JSON (its param groups and non-tensor state)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = plain_tensor(value)
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
    tensors = {f"model.{k}": plain_tensor(v) for k, v in checkpoint.model.items()}
    tensors.update({f"ema.{k}": plain_tensor(v) for k, v in checkpoint.ema.items()})
    optim_meta: dict[str, Any] | None = None
    if checkpoint.optimizer is not None:
        optim_tensors, optim_meta = encode_optimizer(checkpoint.optimizer)
        tensors.update(optim_tensors)
    metadata = {"pase_step": str(checkpoint.step), "pase_settings": json.dumps(checkpoint.settings),
                "pase_optimizer": json.dumps(optim_meta)}
    return atomic.write_bytes(path, safetensors_save(tensors, metadata=metadata))


def load_checkpoint(path: str | Path) -> Checkpoint:
    meta, tensors = read_safetensors(path)
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


__all__ = ["Checkpoint", "CheckpointError", "decode_optimizer", "encode_optimizer", "latest_checkpoint",
           "load_checkpoint", "save_checkpoint", "step_path"]
