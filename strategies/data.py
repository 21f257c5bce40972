"""Pure data parallelism, the fast paths: DDP (replicated weights) and FSDP2 (``fully_shard``).

Chosen by the runtime when no layer of the plan splits anything but the batch; FSDP when the
plan was made with ``--fsdp``. Both average gradients over the world, so gradients equal the
single-process model's on the global batch when each rank's loss is its chunk's mean.
``average_gradients`` does the same for replicas that DDP cannot wrap (pipeline stages, whose
backward runs inside a schedule).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from cost_models.layer_costs import GRADIENT_BUCKET_BYTES
from pase.errors import PaseError
from strategies.sharding import owner_block

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


def shard_blocks(model: nn.Module, sharding: Mapping[str, str], device_type: str, world: int,
                 dtype: Any) -> list[nn.Parameter]:
    """FSDP2 on each block ``sharding`` shards ("gradients": ZeRO-2, "full": FSDP), over every rank, holding that
    block's own parameters (those of a nested block are its own unit, or ignored and left whole), innermost
    first as FSDP2 requires. Gradients are summed and divided by the world, as ``GradientSync`` does for the
    parameters left whole, which this returns (they need it). A sharded block that is not a module of
    ``model`` is refused: the plan priced sharding it."""
    mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    policy = mixed_precision_policy(dtype)
    modules = dict(model.named_modules())
    sharded = {block: how for block, how in sharding.items() if how != "none"}
    missing = sorted(block for block in sharded if block not in modules)
    if missing:
        raise PaseError(f"the plan shards block {missing[0]!r}, which is not a module of this model; re-plan for "
                        "this model")
    managed: set[int] = set()  # parameters already in a (nested) unit
    for block in sorted(sharded, key=lambda b: -b.count(".")):
        unit = modules[block]
        ignored = {param for name, param in unit.named_parameters(prefix=block)
                   if owner_block(name, sharding) != block and id(param) not in managed}
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=sharded[block] == "full",
                    ignored_params=ignored or None)
        unit.set_gradient_divide_factor(float(world))  # type: ignore[operator]
        if dist.get_backend() != "nccl":  # gloo has no pre-scaled sum: sum, then divide by the world
            unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
        managed.update(id(param) for name, param in unit.named_parameters(prefix=block)
                       if owner_block(name, sharding) == block)
    return [param for param in model.parameters() if param.requires_grad and id(param) not in managed]


__all__ = ["GRADIENT_DTYPES", "apply_ddp", "apply_fsdp", "average_gradients", "fsdp_units", "mixed_precision_policy",
           "shard_blocks"]
