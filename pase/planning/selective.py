"""Selective activation checkpointing: which blocks to recompute, chosen by what each saves and costs.

Checkpointing every block (``--checkpoint``) recomputes blocks whose activations are small or costly to
rebuild as well as the large, cheap ones. Here, for a layer graph on a cluster (one micro-step's), the blocks
are chosen against the fastest plan without checkpointing: each checkpointable block is priced with its
layers recomputed and not (the layers keeping that plan's splits): the memory it frees and the time it adds,
its edges included. The blocks that free the most per second added are taken until that plan fits the memory
limit (a greedy knapsack; the blocks' savings are small against the limit, so it is close to the optimum).
The splits are then searched again with those blocks checkpointed, under the limit: what the plan finally
records (``checkpoint_blocks``) is priced as a whole, and the runtime checkpoints exactly those blocks.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from cost_models.cluster import Cluster
from cost_models.rates import HardwareRates
from pase.graph import LayerGraph
from pase.planning.per_layer import PlanOptions, PricedGraph, _solve_priced, price_graph, search_cost_model
from strategies.checkpointing import checkpointed_blocks


def _priced(graph: LayerGraph, cluster: Cluster, rates: HardwareRates, options: PlanOptions) -> PricedGraph:
    return price_graph(graph, search_cost_model(cluster, rates, options), options)


def select_blocks(graph: LayerGraph, cluster: Cluster, rates: HardwareRates, options: PlanOptions,
                  unchecked: PricedGraph | None = None, checked: PricedGraph | None = None,
                  beat: float = float("inf")) -> tuple[str, ...] | None:
    """The blocks to checkpoint so that the fastest plan without checkpointing fits ``options``' memory limit at
    the least added time; () when it fits already or would not beat ``beat`` (the search's objective: the
    unconstrained plan's time, plus the recompute of the blocks chosen for it), None when even every block would
    not make it fit. ``unchecked`` and
    ``checked``: the graph already priced without and with every block checkpointed (else priced here)."""
    plain = replace(options, checkpointing=False, checkpoint_blocks=None)
    none = unchecked if unchecked is not None else _priced(graph, cluster, rates, plain)
    assignment = _solve_priced(none, 0.0, cluster.world_size, options.search_gap)[0].assignment
    limit = cluster.gpu.memory_bytes * options.memory_fraction
    over = none.totals(assignment)[3] - limit
    if over <= 0 or none.objective(assignment) >= beat:
        return ()
    every = checked if checked is not None else _priced(graph, cluster, rates, replace(plain, checkpointing=True))
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


__all__ = ["select_blocks"]
