"""Activation checkpointing by block: what ``--checkpoint`` prices, and the runtime transform that does it.

A LayerGraph groups its layers into blocks (``block``: a module path such as
``down_blocks.0.resnets.0``). Under checkpointing a block keeps only what crosses its boundary
(its inputs are the previous blocks' outputs, saved there) and its inner layers recompute their
forward during backward instead of saving activations. The cost model prices exactly that
(``cost_models.layer_costs``: a layer in ``recomputed_layers`` saves nothing and pays its
forward again), and the runtime applies it to the same blocks (``apply_checkpointing``), so the
two cannot drift apart:

- a block is checkpointed when it is a module (not ``<root>`` or a model input), no other block
  lies inside it (a parent's glue layers, such as a decoder level's skip concat, stay outside),
  and at least one of its layers has an output that stays inside it (a one-layer block such as
  ``conv_in`` would only recompute for nothing);
- its recomputed layers are those whose outputs all stay inside it (its block outputs, read by
  later blocks or returned by the model, are saved as usual).

The runtime wraps each such block's ``forward`` in ``torch.utils.checkpoint.checkpoint``
(non-reentrant; the module tree and parameter names are unchanged, so DDP, FSDP2, channel and head
splits and pipeline stages see the same model). It is applied last, so a forward another transform
already replaced (head-split attention) is what recomputes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.utils.checkpoint
from torch import nn

from pase.errors import PaseError
from pase.graph import LayerGraph

CHECKPOINTED = "_pase_checkpointed"  # attribute set on a module whose forward runs under checkpointing


def _leaving(graph: LayerGraph) -> set[str]:
    """Layers whose output leaves their block (or the model)."""
    outputs = {o["layer"] for o in graph.meta.get("outputs", [])}
    for src, dst in graph.graph.edges():
        if graph[src]["block"] != graph[dst]["block"]:
            outputs.add(src)
    return outputs


def _checkpointable(block: str, blocks: set[str]) -> bool:
    if block == "<root>" or block.startswith("input:"):
        return False
    return not any(other.startswith(block + ".") for other in blocks)


def checkpointed_blocks(graph: LayerGraph) -> list[str]:
    """The blocks (module paths, in capture order) that activation checkpointing wraps. O(layers + edges)."""
    leaving = _leaving(graph)
    order = list(dict.fromkeys(data["block"] for _, data in graph.layers()))
    names = set(order)
    inner = {data["block"] for layer_id, data in graph.layers() if layer_id not in leaving}
    return [block for block in order if block in inner and _checkpointable(block, names)]


def recomputed_layers(graph: LayerGraph, blocks: Iterable[str] | None = None) -> set[str]:
    """The layers that save no activations and recompute their forward under checkpointing (of ``blocks``, a
    selection of ``checkpointed_blocks``; None: all of them)."""
    leaving = _leaving(graph)
    wrapped = set(checkpointed_blocks(graph) if blocks is None else blocks)
    return {layer_id for layer_id, data in graph.layers() if data["block"] in wrapped and layer_id not in leaving}


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        # early_stop=False: the whole block re-runs (its collectives included), as the cost model prices it;
        # torch's default stops once the last saved tensor is recomputed, which no plan could predict per layer
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, early_stop=False, **kwargs)
    return checkpointed_forward


def rerun_layers(graph: LayerGraph, blocks: Iterable[str] | None = None) -> set[str]:
    """Layers whose forward runs again in the backward: every layer of a checkpointed block (the runtime
    re-runs whole blocks, their output layers too), so their forward collectives are priced twice (``blocks``:
    a selection of ``checkpointed_blocks``; None: all of them)."""
    wrapped = set(checkpointed_blocks(graph) if blocks is None else blocks)
    return {layer_id for layer_id, data in graph.layers() if data["block"] in wrapped}


def planned_blocks(plan_options: dict[str, Any], graph: LayerGraph) -> list[str]:
    """The blocks a plan checkpoints: its own selection (``checkpoint_blocks``, chosen per block by the planner),
    every checkpointable block under ``checkpointing``, or none. A selection naming a block that is not one
    is refused: the plan priced recomputing it."""
    if not plan_options.get("checkpointing"):
        return []
    every = checkpointed_blocks(graph)
    chosen = plan_options.get("checkpoint_blocks")
    if chosen is None:
        return every
    unknown = sorted(set(chosen) - set(every))
    if unknown:
        raise PaseError(f"the plan checkpoints {', '.join(unknown[:3])}, which this model's layer graph does not "
                        "have as checkpointable blocks; re-plan for this model")
    return [block for block in every if block in set(chosen)]


def apply_checkpointing(model: nn.Module, blocks: list[str], prefix: str = "") -> list[str]:
    """Run each of ``blocks`` (module paths of ``model``, under ``prefix``) under activation checkpointing.

    Returns the blocks wrapped. A block that is not a module of ``model`` is refused: the plan priced
    its recomputation, and running it otherwise would break that promise.
    """
    modules = dict(model.named_modules())
    for block in blocks:
        module = modules.get(prefix + block)
        if module is None:
            raise PaseError(f"the plan checkpoints block {block!r}, which is not a module of this model; re-plan "
                            "for this model")
        if getattr(module, CHECKPOINTED, False):
            continue
        module.forward = _checkpointed(module.forward)  # type: ignore[method-assign]
        setattr(module, CHECKPOINTED, True)
    return list(blocks)


__all__ = ["CHECKPOINTED", "apply_checkpointing", "checkpointed_blocks", "planned_blocks", "recomputed_layers",
           "rerun_layers"]
