"""Pure data parallelism, the fast paths: DDP (replicated weights) and FSDP2 (``fully_shard``).

Chosen by the runtime when no layer of the plan splits anything but the batch; FSDP when the
plan was made with ``--fsdp``. Both average gradients over the world, so gradients equal the
single-process model's on the global batch when each rank's loss is its chunk's mean.
``average_gradients`` does the same for replicas that DDP cannot wrap (pipeline stages, whose
backward runs inside a schedule).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from cost_models.layer_costs import GRADIENT_BUCKET_BYTES

GRADIENT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def apply_ddp(model: nn.Module, device: torch.device, precision: str = "fp32") -> DistributedDataParallel:
    """DDP whose gradient all-reduce moves the plan's precision: the cost model prices gradients at 2 bytes
    under bf16/fp16, and DDP would otherwise reduce the fp32 gradients of an autocast model (twice the bytes)."""
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = GRADIENT_DTYPES[precision]
    if dtype != torch.float32:
        ddp.register_comm_hook(dtype, _reduce_in)
    return ddp


def _reduce_in(dtype, bucket):  # noqa: ANN001, ANN202 - DDP checks these annotations at run time: strings fail
    """DDP comm hook: the bucket averaged in ``dtype`` (what ``bf16_compress_hook`` does, on every backend)."""
    group = dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(dtype).div_(dist.get_world_size(group))
    work = dist.all_reduce(compressed, group=group, async_op=True)

    def decompress(future: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(future.value()[0])
        return buffer

    return work.get_future().then(decompress)


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


def average_gradients(params: list[nn.Parameter], group: Any, size: int,
                      dtype: torch.dtype = torch.float32) -> None:
    """Every gradient summed over ``group`` and divided by ``size`` (the group's size for a mean), in flat
    buckets (one all-reduce each; gloo and NCCL are fastest on few large messages). Parameters without a
    gradient on this rank have none on the others either (the same graph ran everywhere)."""
    buckets: list[list[torch.Tensor]] = [[]]
    filled = 0
    for grad in (p.grad for p in params if p.grad is not None):
        if filled >= GRADIENT_BUCKET_BYTES:
            buckets.append([])
            filled = 0
        buckets[-1].append(grad)
        filled += grad.numel() * grad.element_size()
    for bucket in buckets:
        if not bucket:
            continue
        flat = torch.cat([g.reshape(-1) for g in bucket]).to(dtype)  # reduced in the plan's precision
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat /= size
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def mixed_precision_policy(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """FSDP2 gathering weights and reducing gradients in ``dtype`` (the bytes the cost model prices)."""
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype) if dtype != torch.float32 \
        else MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, device: torch.device, precision: str = "fp32", reshard: bool = True) -> nn.Module:
    """FSDP2 over all ranks; under bf16/fp16 parameters are gathered and gradients reduced in that precision
    (``MixedPrecisionPolicy``), the bytes the cost model prices. ``reshard=False``: each unit keeps the weights it
    gathered for the forward until its backward is done (ZeRO-2: one gather per step instead of two)."""
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    policy = mixed_precision_policy(GRADIENT_DTYPES[precision])
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    return model


__all__ = ["GRADIENT_DTYPES", "apply_ddp", "apply_fsdp", "average_gradients", "fsdp_units", "mixed_precision_policy"]
