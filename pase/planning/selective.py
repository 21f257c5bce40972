"""Choices per block: which blocks to recompute (selective activation checkpointing) and how to shard each
block's state, chosen by what each saves and costs.

Checkpointing every block (``--checkpoint``) recomputes blocks whose activations are small or costly to
rebuild as well as the large, cheap ones. Here, for a layer graph on a cluster (one micro-step's), the blocks
are chosen against the fastest plan without checkpointing: each checkpointable block is priced with its
layers recomputed and not (the layers keeping that plan's splits): the memory it frees and the time it adds,
its edges included. The blocks that free the most per second added are taken until that plan fits the memory
limit (a greedy knapsack; the blocks' savings are small against the limit, so it is close to the optimum).
The splits are then searched again with those blocks checkpointed, under the limit: what the plan finally
records (``checkpoint_blocks``) is priced as a whole, and the runtime checkpoints exactly those blocks.

Sharding is chosen the same way (``select_sharding``): each block with weights kept whole, sharded ZeRO-2-style
or sharded fully (``strategies.sharding``): first every block whose sharding saves time (its collectives hide
behind its whole forward and backward, where a replicated block's all-reduce hides behind the backward alone), then
the upgrades that free the most memory per second added (a block may go from whole to ZeRO-2 and later to full),
until the fastest unsharded plan fits; the splits are
then searched again under that sharding (``block_sharding``), which the runtime applies block by block.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any

from cost_models.cluster import Cluster
from cost_models.rates import HardwareRates
from pase.graph import LayerGraph
from pase.planning.per_layer import PlanOptions, PricedGraph, _solve_priced, price_graph, search_cost_model
from strategies.checkpointing import checkpointed_blocks
from strategies.sharding import weighted_blocks


def _priced(graph: LayerGraph, cluster: Cluster, rates: HardwareRates, options: PlanOptions,
            memo: dict[str, Any] | None = None) -> PricedGraph:
    return price_graph(graph, search_cost_model(cluster, rates, options), options, memo=memo)


def select_blocks(graph: LayerGraph, cluster: Cluster, rates: HardwareRates, options: PlanOptions,
                  unchecked: PricedGraph | None = None, checked: PricedGraph | None = None,
                  beat: float = float("inf"), memo: dict[str, Any] | None = None) -> tuple[str, ...] | None:
    """The blocks to checkpoint so that the fastest plan without checkpointing fits ``options``' memory limit at
    the least added time; () when it fits already or would not beat ``beat`` (the search's objective: the
    unconstrained plan's time, plus the recompute of the blocks chosen for it), None when even every block would
    not make it fit. ``unchecked`` and
    ``checked``: the graph already priced without and with every block checkpointed (else priced here)."""
    plain = replace(options, checkpointing=False, checkpoint_blocks=None)
    none = unchecked if unchecked is not None else _priced(graph, cluster, rates, plain, memo)
    assignment = _solve_priced(none, 0.0, cluster.world_size, options.search_gap)[0].assignment
    limit = cluster.gpu.memory_bytes * options.memory_fraction
    over = none.totals(assignment)[3] - limit
    if over <= 0 or none.objective(assignment) >= beat:
        return ()
    every = checked if checked is not None else _priced(graph, cluster, rates, replace(plain, checkpointing=True),
                                                        memo)
    assert [len(s) for s in none.spaces] == [len(s) for s in every.spaces]
    in_order = list(dict.fromkeys(checkpointed_blocks(graph)))  # ties in the ranking go to model order, not
    blocks = set(in_order)  # to string hashes (which differ between processes: the same command, another plan)
    block_of = [graph[layer_id]["block"] for layer_id in none.ids]
    seconds: dict[str, float] = defaultdict(float)
    freed: dict[str, float] = defaultdict(float)
    syncs_none, syncs_every = none.syncs(), every.syncs()
    for v, k in enumerate(assignment):
        if block_of[v] not in blocks:
            continue
        seconds[block_of[v]] += float(every.compute[v][k] + every.comm[v][k] - every.sync_discount * syncs_every[v][k]
                                      - none.compute[v][k] - none.comm[v][k] + none.sync_discount * syncs_none[v][k])
        freed[block_of[v]] += float(none.memory[v][k] - every.memory[v][k])
    for (s, d, added), (_, _, plain_edge) in zip(every.edges, none.edges):
        owner = block_of[d] if block_of[d] in blocks else block_of[s]
        if owner in blocks:
            seconds[owner] += float(added[assignment[s], assignment[d]] - plain_edge[assignment[s], assignment[d]])
    ranked = sorted((b for b in in_order if freed[b] > 0), key=lambda b: max(seconds[b], 0.0) / freed[b])
    chosen: list[str] = []
    for block in ranked:
        if over <= 0:
            break
        chosen.append(block)
        over -= freed[block]
    if over > 0:
        return None
    if none.objective(assignment) + sum(max(seconds[b], 0.0) for b in chosen) >= beat:
        return ()  # that plan with these blocks recomputed is no faster than ``beat``: not worth a search
    order = {block: i for i, block in enumerate(checkpointed_blocks(graph))}
    return tuple(sorted(chosen, key=order.__getitem__))


SHARDED = (("gradients", False), ("full", True))  # a block's sharded states, and FSDP's reshard_after_forward


def select_sharding(graph: LayerGraph, cluster: Cluster, rates: HardwareRates, options: PlanOptions,
                    priced: dict[str, PricedGraph | None], beat: float = float("inf"),
                    memo: dict[str, Any] | None = None) -> dict[str, str] | None:
    """The blocks to shard, and how ("gradients" or "full"), so that the fastest plan without sharding fits
    ``options``' memory limit at the least added time: {} when it fits already or would not beat ``beat``, None
    when even sharding every block fully would not make it fit. ``priced``: the graph already priced with no
    sharding, ZeRO-2 and FSDP throughout ("none", "gradients", "full"; priced here where missing). A layer whose
    split has no sharded runtime keeps its block whole."""
    plain = replace(options, fsdp=False, checkpointing=False, checkpoint_blocks=None, block_sharding=None)
    graphs = {"none": priced.get("none") or _priced(graph, cluster, rates, plain, memo)}
    for how, reshard in SHARDED:
        graphs[how] = priced.get(how) or _priced(graph, cluster, rates, replace(plain, fsdp=True, reshard=reshard),
                                                 memo)
    none = graphs["none"]
    assignment = _solve_priced(none, 0.0, cluster.world_size, options.search_gap)[0].assignment
    limit = cluster.gpu.memory_bytes * options.memory_fraction
    over = none.totals(assignment)[3] - limit
    if over <= 0 or none.objective(assignment) >= beat:
        return {}
    blocks = weighted_blocks(graph)
    known = set(blocks)
    block_of = [graph[layer_id]["block"] for layer_id in none.ids]
    syncs = {how: g.syncs() for how, g in graphs.items()}
    seconds = {how: dict.fromkeys(blocks, 0.0) for how in graphs}
    freed = {how: dict.fromkeys(blocks, 0.0) for how in graphs}
    unavailable: set[tuple[str, str]] = set()
    for v, k in enumerate(assignment):
        block = block_of[v]
        if block not in known:
            continue
        config = none.spaces[v].config(k)
        base = float(none.compute[v][k] + none.comm[v][k] - none.sync_discount * syncs["none"][v][k])
        for how, _ in SHARDED:
            g = graphs[how]
            kk = g.spaces[v].index_of(config)
            if kk is None:  # this split has no sharded runtime: the block stays whole
                unavailable.add((block, how))
                continue
            seconds[how][block] += float(g.compute[v][kk] + g.comm[v][kk] - g.sync_discount * syncs[how][v][kk]) - base
            freed[how][block] += float(none.memory[v][k] - g.memory[v][kk])
    state = dict.fromkeys(blocks, "none")
    for block in blocks:  # sharding that saves time (FSDP's collectives hide behind more compute than DDP's) is taken
        faster = [(seconds[how][block], -freed[how][block], how) for how, _ in SHARDED
                  if (block, how) not in unavailable and seconds[how][block] < 0 and freed[how][block] >= 0]
        if faster:
            state[block] = min(faster)[2]
            over -= freed[state[block]][block]
    while over > 0:
        upgrades = [(max(seconds[how][b] - seconds[state[b]][b], 0.0) / gain, -gain, i, b, how)
                    for i, b in enumerate(blocks) for how, _ in SHARDED if (b, how) not in unavailable
                    and (gain := freed[how][b] - freed[state[b]][b]) > 0]
        if not upgrades:
            return None
        _, minus_gain, _, block, how = min(upgrades)  # the least time per byte freed (ties: more freed, model order)
        state[block] = how
        over += minus_gain
    added = sum(seconds[how][b] for b, how in state.items())
    if none.objective(assignment) + added >= beat:
        return {}  # that plan with these blocks sharded is no faster than ``beat``: not worth a search
    return {block: how for block, how in state.items() if how != "none"}


__all__ = ["select_blocks", "select_sharding"]
