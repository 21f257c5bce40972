"""Sharding by block: which blocks keep their weights, gradients and optimizer state whole, which shard them
ZeRO-2-style and which fully (FSDP).

A block (a LayerGraph ``block``: a module path such as ``mid_block.attentions.0``) is sharded as one of:

- ``"none"``: replicated state; its gradients all-reduced over the data-parallel peers (paused between
  micro-steps, so once per step);
- ``"gradients"`` (ZeRO-2): weights, gradients and optimizer state sharded; the weights gathered once per
  micro-step and kept through the backward (FSDP2's ``reshard_after_forward=False``);
- ``"full"`` (FSDP, ZeRO-3): the same, the weights gathered again for the backward.

The cost model prices each layer with its block's sharding (``cost_models.layer_costs``: ``sharding``), the
planner chooses per block (``pase.planning.selective.select_sharding``), and the runtime applies it per block
(``strategies.data.shard_blocks``: ``fully_shard`` on each sharded block's module, that block's own parameters
only, the rest of the model's gradients synchronised by ``strategies.tensor.GradientSync``). This module holds
what the planner reads, free of FSDP's imports (0.6 s). A plan whose options name no per-block sharding shards
every block alike (``--fsdp``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pase.errors import PaseError
from pase.graph import LayerGraph

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


__all__ = ["SHARDINGS", "layer_sharding", "owner_block", "planned_sharding", "uniform_sharding",
           "weighted_blocks"]
