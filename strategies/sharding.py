"""Sharding by block: which blocks keep their weights, gradients and optimizer state whole, which shard them
ZeRO-2-style and which fully (FSDP), and the runtime transform that does exactly that.

A block (a LayerGraph ``block``: a module path such as ``mid_block.attentions.0``) is sharded as one of:

- ``"none"``: replicated state; its gradients all-reduced over the data-parallel peers (paused between
  micro-steps, so once per step);
- ``"gradients"`` (ZeRO-2): weights, gradients and optimizer state sharded; the weights gathered once per
  micro-step and kept through the backward (FSDP2's ``reshard_after_forward=False``);
- ``"full"`` (FSDP, ZeRO-3): the same, the weights gathered again for the backward.

The cost model prices each layer with its block's sharding (``cost_models.layer_costs``: ``sharding``), the
planner chooses per block (``pase.planning.selective.select_sharding``), and the runtime applies it per block:
``fully_shard`` on each sharded block's module, that block's own parameters only (a nested block is its own
unit or stays whole), with the rest of the model's gradients synchronised by ``strategies.tensor.GradientSync``
(``shard_blocks``). A plan whose options name no per-block sharding shards every block alike (``--fsdp``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from pase.errors import PaseError
from pase.graph import LayerGraph
from strategies.data import mixed_precision_policy

SHARDINGS = ("none", "gradients", "full")  # a block's state: replicated, ZeRO-2, FSDP (ZeRO-3)


def uniform_sharding(options: Mapping[str, Any]) -> str:
    """The sharding a plan's options give every block when they name none per block."""
    if not options.get("fsdp"):
        return "none"
    return "full" if options.get("reshard", True) else "gradients"


def weighted_blocks(graph: LayerGraph) -> list[str]:
    """The blocks with trainable weights (the ones sharding can apply to), in model order."""
    return list(dict.fromkeys(data["block"] for _, data in graph.layers()
                              if any(p.get("trainable") for p in data.get("params", {}).values())))


def planned_sharding(options: Mapping[str, Any], graph: LayerGraph) -> dict[str, str]:
    """Every weighted block's sharding under a plan's options: its own choice per block (``block_sharding``, made
    by the planner), else the same for all. A choice naming a block the graph does not have with weights, or an
    unknown sharding, is refused: the plan priced it."""
    chosen = options.get("block_sharding")
    blocks = weighted_blocks(graph)
    if chosen is None:
        return dict.fromkeys(blocks, uniform_sharding(options))
    unknown = sorted(set(chosen) - set(blocks))
    if unknown:
        raise PaseError(f"the plan shards blocks {', '.join(unknown[:3])}, which this model's layer graph does not "
                        "have as blocks with weights; re-plan for this model")
    bad = sorted({s for s in chosen.values() if s not in SHARDINGS})
    if bad:
        raise PaseError(f"the plan shards blocks as {', '.join(bad)}; a block's sharding is one of "
                        f"{', '.join(SHARDINGS)}: re-plan")
    return {block: chosen.get(block, "none") for block in blocks}


def layer_sharding(options: Mapping[str, Any], graph: LayerGraph) -> dict[str, str]:
    """Per layer id, its block's sharding ("none" for a layer without weights)."""
    per_block = planned_sharding(options, graph)
    return {layer_id: per_block.get(data["block"], "none") for layer_id, data in graph.layers()}


def owner_block(name: str, blocks: Mapping[str, str]) -> str | None:
    """The innermost block of ``blocks`` that the module or parameter path ``name`` lies in (None: none)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in blocks:
            return prefix
    return None


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


__all__ = ["SHARDINGS", "layer_sharding", "owner_block", "planned_sharding", "shard_blocks", "uniform_sharding",
           "weighted_blocks"]
