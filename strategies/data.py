"""Pure data parallelism, the fast paths: DDP (replicated weights) and FSDP2 (``fully_shard``).

Chosen by the runtime when no layer of the plan splits anything but the batch; FSDP when the
plan was made with ``--fsdp``. Both average gradients over the world, so gradients equal the
single-process model's on the global batch when each rank's loss is its chunk's mean.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as one unit each: every entry of a top-level ModuleList (a UNet's down and
    up blocks) and every other top-level child that holds submodules with parameters (the middle
    block); the root gets the rest (embeddings, conv_in, conv_out)."""
    units: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            units.extend(m for m in child if any(True for _ in m.parameters()))
        elif any(True for _ in child.children()) and any(True for _ in child.parameters()):
            units.append(child)
    return units


def apply_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


__all__ = ["apply_ddp", "apply_fsdp", "fsdp_units"]
