"""Explain a plan: the cheapest alternatives for one layer, or every recompute and sharding choice for one
block, everything else kept as planned."""
from __future__ import annotations

from dataclasses import replace
from itertools import product
from typing import Any

import numpy as np

from cost_models.cluster import Cluster
from cost_models.rates import HardwareRates
from pase.errors import PaseError
from pase.graph import LayerGraph
from pase.planning.micro_steps import micro_graph
from pase.planning.per_layer import PlanOptions, PricedGraph, price_graph, search_cost_model
from pase.planning.plan import Plan
from strategies.checkpointing import checkpointed_blocks
from strategies.sharding import SHARDINGS, weighted_blocks


def explain(graph: LayerGraph, plan: Plan, priced: PricedGraph, layer_id: str, top: int = 5) -> list[dict[str, Any]]:
    """The cheapest alternatives for one layer with every other layer kept as planned."""
    if layer_id not in priced.ids:
        close = [i for i in priced.ids if layer_id in i][:5]
        raise PaseError(f"no layer {layer_id!r} in this model" + (f"; did you mean {', '.join(close)}?" if close
                                                                   else "; see `pase graph --layers`"))
    v = priced.ids.index(layer_id)
    chosen = [priced.spaces[i].index_of(layer.splits) for i, layer in enumerate(plan.layers)]
    price = float(plan.search.memory_price or 0.0)  # memory was priced when the limit was binding
    total = priced.compute[v] + priced.comm[v] + price * priced.memory[v]
    for s, d, m in priced.edges:
        if s == v:
            total = total + m[:, chosen[d]]
        elif d == v:
            total = total + m[chosen[s], :]
    order = np.argsort(total)[:top]
    base = float(total[chosen[v]])
    return [{"splits": priced.spaces[v].config(int(k)) or {"replicated": 1}, "seconds": float(total[k]),
             "delta_seconds": float(total[k]) - base, "memory_bytes": float(priced.memory[v][k]),
             "chosen": int(k) == chosen[v]} for k in order]


def explain_block(graph: LayerGraph, plan: Plan, priced: PricedGraph, cluster: Cluster, rates: HardwareRates,
                  options: PlanOptions, block: str) -> list[dict[str, Any]]:
    """For ``block``: its time and memory, and the plan's step and peak memory, with the block recomputed or not and
    its state replicated, sharded but for the weights during the step (ZeRO-2, "gradients") or sharded
    throughout (FSDP, "full"), every layer keeping its planned split and every other block its planned choices.
    ``runnable``: the runtime runs that choice as planned (it shards and recomputes per block; a layer whose
    planned split has no sharded runtime cannot be sharded). ``graph``: captured at the step's batch."""
    names = [b.name for b in plan.blocks]
    if block not in names:
        close = [n for n in names if block in n][:5]
        raise PaseError(f"no block {block!r} in this plan" + (f"; did you mean {', '.join(close)}?" if close else
                                                              f"; its blocks are {', '.join(names[:8])}, ..."))
    micro = micro_graph(graph, plan.micro_steps)
    planned_sharding = {b.name: b.sharding for b in plan.blocks}
    chosen_blocks = set(plan.options.get("checkpoint_blocks") or []) if plan.options.get("checkpointing") else set()
    candidates = set(checkpointed_blocks(micro))
    plain = replace(options, micro_steps=plan.micro_steps, checkpoint_blocks=None, block_sharding=None)
    graphs = {(ck, sh): price_graph(micro, search_cost_model(cluster, rates, replace(
        plain, checkpointing=ck, fsdp=sh != "none", reshard=sh != "gradients")), plain)
              for ck, sh in product((False, True), SHARDINGS)}
    syncs = {key: g.syncs() for key, g in graphs.items()}
    splits = [layer.splits for layer in plan.layers]
    # each priced graph's index of every layer's planned split (None: not runnable under that sharding)
    indices = {key: [g.spaces[v].index_of(s) for v, s in enumerate(splits)] for key, g in graphs.items()}
    block_of = [micro[layer_id]["block"] for layer_id in priced.ids]
    weighted = block in set(weighted_blocks(micro))

    def setting(of: str, recompute: bool, shard: str) -> tuple[bool, str]:
        return (recompute, shard) if of == block else (of in chosen_blocks, planned_sharding.get(of, "none"))

    def price(recompute: bool, shard: str) -> tuple[float, float, float, float] | None:
        """(step seconds per micro-step, memory per device, the block's seconds, the block's memory); None where
        a layer's planned split does not run under the sharding asked."""
        seconds = memory = own_seconds = own_memory = 0.0
        for v in range(len(splits)):
            key = setting(block_of[v], recompute, shard)
            g, k = graphs[key], indices[key][v]
            if k is None:
                return None
            t = float(g.compute[v][k] + g.comm[v][k] - g.sync_discount * syncs[key][v][k])
            seconds, memory = seconds + t, memory + float(g.memory[v][k])
            if block_of[v] == block:
                own_seconds, own_memory = own_seconds + t, own_memory + float(g.memory[v][k])
        for e, (s, d, _) in enumerate(priced.edges):
            owner = block_of[d] if block_of[d] in candidates else block_of[s]
            key = setting(owner, recompute, shard)
            t = float(graphs[key].edges[e][2][indices[key][s], indices[key][d]])
            seconds += t
            own_seconds += t if owner == block else 0.0
        return seconds, memory, own_seconds, own_memory

    mine = planned_sharding.get(block, "none")
    planned = price(block in chosen_blocks, mine)
    assert planned is not None, "the plan's own choices price"
    limit = cluster.gpu.memory_bytes * options.memory_fraction
    rows = []
    for recompute, shard in product((False, True), SHARDINGS):
        if (recompute and block not in candidates) or (shard != mine and not weighted):
            continue  # not a choice this block has: it cannot recompute alone, or has no state to shard
        priced_choice = price(recompute, shard)
        if priced_choice is None:
            continue
        seconds, memory, own_seconds, own_memory = priced_choice
        step = plan.predicted.step_seconds + plan.micro_steps * (seconds - planned[0])
        peak = plan.predicted.memory_bytes_per_device + memory - planned[1]
        rows.append({"recompute": recompute, "sharding": shard, "block_seconds": own_seconds,
                     "block_memory_bytes": own_memory, "step_seconds": step, "memory_bytes": peak,
                     "fits": peak <= limit, "runnable": not plan.stages or shard == mine,
                     "chosen": (recompute, shard) == (block in chosen_blocks, mine)})
    return rows


__all__ = ["explain", "explain_block"]
