"""Exact min-sum variable elimination over dense numpy tables (PaSE's dynamic programme).

Each vertex is a variable over its configurations; vertex costs are unary factors and edge
costs pairwise factors (parallel edges are summed, so a consumer reading two tensors of one
producer pays for both). Eliminating a variable sums the factors that mention it into one
table over their joint scope and minimises that variable out; decoding walks the order
backwards, choosing each variable given the neighbours already chosen. The order is chosen
greedily by the size of the table each step creates (min-weight, the product of configuration
counts; min-fill breaks ties) — on a UNet this keeps tables small despite skip connections.

Cost: sum over steps of the product of configuration counts in the step's scope, in time;
the largest such product (plus the messages kept for decoding) in memory.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod

import numpy as np

from pase.errors import PaseError
from pase.search.cost_graph import CostGraph

CHUNK_ELEMENTS = 1 << 24  # combine tables in slices of at most this many entries
PARALLEL_ELEMENTS = 1 << 20  # tables at least this large are combined in slices on every core


class TableBudgetExceeded(PaseError):
    """Exact elimination would build a table larger than allowed; raised before any is built."""

    def __init__(self, message: str, peak: float) -> None:
        super().__init__(message)
        self.peak = peak


@dataclass
class Factor:
    scope: tuple[int, ...]
    table: np.ndarray  # axes in scope order


@dataclass
class SearchStats:
    order: list[int] = field(default_factory=list)
    width: int = 0  # the largest scope eliminated at once (variables)
    largest_table: int = 0  # entries of the largest table built
    pruned_configs: int = 0
    seconds: float = 0.0
    conditioned_on: list[str] = field(default_factory=list)  # hub vertices fixed outside the elimination
    proved_gap: float = 0.0  # relative: the returned cost is at most (1 + proved_gap) x the optimum
    hub_combos_solved: int = 0  # hub configuration combinations searched exactly
    messages_reused: int = 0  # elimination steps taken from an earlier hub combination (same hub configurations)


@dataclass
class Solution:
    optimum: float
    assignment: list[int]
    stats: SearchStats


def pairwise_factors(graph: CostGraph) -> dict[tuple[int, int], np.ndarray]:
    """Edges summed per unordered vertex pair, oriented (low id, high id)."""
    merged: dict[tuple[int, int], np.ndarray] = {}
    for s, d, matrix in graph.edges:
        key, oriented = ((s, d), matrix) if s < d else ((d, s), matrix.T)
        merged[key] = merged[key] + oriented if key in merged else oriented.copy()
    return merged


def elimination_order(sizes: list[int], neighbours: list[set[int]]) -> list[int]:
    """Greedy min-weight order: next, the variable whose elimination builds the smallest table.

    Weight = product of the configuration counts of the variable and its current neighbours;
    ties go to the fewest fill-in edges, then the lowest index. O(V * d^2 log V) with a lazy heap
    (d = the largest degree reached).
    """
    adjacency = [set(n) for n in neighbours]
    alive = set(range(len(sizes)))
    version = [0] * len(sizes)

    def key(v: int) -> tuple[float, int]:
        nbrs = adjacency[v]
        fill = sum(1 for a, b in itertools.combinations(nbrs, 2) if b not in adjacency[a]) if len(nbrs) < 40 else 0
        return float(prod(sizes[u] for u in nbrs)) * sizes[v], fill

    heap = [(*key(v), 0, v) for v in alive]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        *_, stamp, v = heapq.heappop(heap)
        if v not in alive or stamp != version[v]:
            continue
        order.append(v)
        alive.discard(v)
        nbrs = adjacency[v]
        for a in nbrs:
            adjacency[a] |= nbrs - {a}
            adjacency[a].discard(v)
        for a in nbrs:
            version[a] += 1
            heapq.heappush(heap, (*key(a), version[a], a))
    return order


PRUNE_CANDIDATES = 8  # at most this many of each vertex's cheapest configurations are tried as dominators
PRUNE_STOP = 0.05  # stop trying further candidates once a round removes under this fraction of those removed so far


def prune_dominated(graph: CostGraph, factors: dict[tuple[int, int], np.ndarray]) -> tuple[list[np.ndarray], int]:
    """Keep-masks per vertex: drop configuration c when another c' is never worse.

    c' dominates c if unary[c'] - unary[c] + sum over incident pairwise factors of
    max over the neighbour's configuration (F[c', u] - F[c, u]) <= 0: whatever the
    neighbours choose, swapping c for c' does not raise the objective. Sound, so the optimum
    is unchanged. Dominators are tried in rounds, each vertex's cheapest surviving configuration
    first: on graphs where the first round already found almost everything (UNets), the rounds stop
    early (``PRUNE_STOP``) and pruning costs a fraction of a search; where later candidates keep
    finding more (Transformers), up to ``PRUNE_CANDIDATES`` rounds run.
    """
    incident: list[list[np.ndarray]] = [[] for _ in graph.vertex_costs]
    for (a, b), matrix in factors.items():
        incident[a].append(matrix)
        incident[b].append(matrix.T)
    keep = [np.ones(unary.size, dtype=bool) for unary in graph.vertex_costs]
    candidates = [np.argsort(unary)[:PRUNE_CANDIDATES] if unary.size > 1 else unary[:0].astype(np.int64)
                  for unary in graph.vertex_costs]
    pruned = 0
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, and NaN never counts as dominated
        for rank in range(PRUNE_CANDIDATES):
            removed = 0
            for v, unary in enumerate(graph.vertex_costs):
                if rank < candidates[v].size:
                    removed += _prune_by(int(candidates[v][rank]), unary, incident[v], keep[v])
            pruned += removed
            if removed <= PRUNE_STOP * pruned:
                break
    return keep, pruned


def _prune_by(c_best: int, unary: np.ndarray, incident: list[np.ndarray], mask: np.ndarray) -> int:
    """Clear from ``mask`` (in place) every configuration that ``c_best`` dominates; returns how many."""
    if not mask[c_best] or not np.isfinite(unary[c_best]):
        return 0
    slack = unary[c_best] - unary  # <= 0 where c_best is cheaper alone
    for matrix in incident:
        slack = slack + (matrix[c_best][None, :] - matrix).max(axis=1)
    dominated = (slack <= 0) & mask
    dominated[c_best] = False
    mask &= ~dominated
    return int(dominated.sum())


def bound_masks(graph: CostGraph, pairs: dict[tuple[int, int], np.ndarray], incumbent: float) -> list[np.ndarray]:
    """Configurations that can still be optimal given a known solution of cost ``incumbent``.

    A lower bound for any assignment that picks configuration c at v: every other vertex and
    edge at its own minimum, v at c, and v's edges at their best given c. If that already
    exceeds the incumbent, c is in no optimal assignment. Sound; O(total edge-table size).
    """
    unary_min = [float(np.min(c)) for c in graph.vertex_costs]
    edge_min = {key: float(np.min(m)) for key, m in pairs.items()}
    floor = sum(unary_min) + sum(edge_min.values())
    bounds = [floor - unary_min[v] + graph.vertex_costs[v] for v in range(len(unary_min))]
    for (a, b), matrix in pairs.items():
        bounds[a] = bounds[a] + matrix.min(axis=1) - edge_min[(a, b)]
        bounds[b] = bounds[b] + matrix.min(axis=0) - edge_min[(a, b)]
    slack = 1e-9 * max(1.0, abs(incumbent))
    return [bound <= incumbent + slack for bound in bounds]


def solve(graph: CostGraph, prune: bool = True, max_table_entries: int = 1 << 31,
          dtype: type = np.float64, hub_degree: int = 12, incumbent: float | None = None,
          gap: float = 0.0) -> Solution:
    """The exact optimum of ``graph`` and one assignment that reaches it.

    Hubs — vertices with at least ``hub_degree`` neighbours, like a UNet's timestep embedding
    and text context — would join almost every table. When that makes tables large, the search
    conditions on them instead: it fixes each combination of hub configurations outside the
    elimination, folds the hub edges into their neighbours' costs, eliminates the rest, and
    keeps the best combination. Both ways are exact; conditioning is chosen when it shrinks the
    largest table without more than doubling the total work.

    ``incumbent``, the cost of any known assignment, lets the search drop configurations whose
    lower bound exceeds it (``bound_masks``) before eliminating; the result stays exact.

    ``dtype=np.float32`` halves the memory traffic of the tables; the reported optimum is always
    re-evaluated in float64, but float32 sums may break near-ties differently (the planner uses it
    on estimated costs; the cost-graph CLI keeps float64).

    ``gap`` > 0 allows a solution proved at most (1 + gap) x the optimum when the
    search conditions on hubs: instead of every hub combination, it solves one relaxation in which
    each hub edge picks its own hub configuration (a lower bound), evaluates its assignment under
    every combination (an upper bound), and searches combinations exactly only while their bound
    can still beat the best by more than ``gap`` (``_solve_hub_bounded``). ``stats.proved_gap``
    reports the gap actually proved; with ``gap=0`` the result is exact.
    """
    started = time.perf_counter()
    stats = SearchStats()
    pairs = pairwise_factors(graph)
    if prune:
        masks, stats.pruned_configs = prune_dominated(graph, pairs)
    else:
        masks = [np.ones(c.size, bool) for c in graph.vertex_costs]
    if incumbent is not None and np.isfinite(incumbent):
        bounded = bound_masks(graph, pairs, incumbent)
        for v, keep in enumerate(bounded):
            narrowed = masks[v] & keep
            if narrowed.any():  # float slack can empty a row only at the incumbent's own ties
                stats.pruned_configs += int(masks[v].sum() - narrowed.sum())
                masks[v] = narrowed
    kept = [np.flatnonzero(m) for m in masks]  # surviving configuration indices per vertex
    sizes = [k.size for k in kept]
    factors: list[Factor] = [Factor((v,), graph.vertex_costs[v][kept[v]]) for v in range(len(sizes))]
    for (a, b), matrix in pairs.items():
        factors.append(_without_singletons(Factor((a, b), matrix[np.ix_(kept[a], kept[b])]), sizes))
    neighbours: list[set[int]] = [set() for _ in sizes]
    for factor in factors:
        if len(factor.scope) == 2:
            a, b = factor.scope
            neighbours[a].add(b)
            neighbours[b].add(a)

    hubs = [v for v in range(len(sizes)) if len(neighbours[v]) >= hub_degree and sizes[v] > 1]
    order = elimination_order(sizes, neighbours)
    plain_work, plain_peak, plain_at = _order_work(sizes, neighbours, order)
    if hubs:
        rest_neighbours = [set() if v in hubs else neighbours[v] - set(hubs) for v in range(len(sizes))]
        rest_order = [v for v in elimination_order(sizes, rest_neighbours) if v not in hubs]
        combos = prod(sizes[h] for h in hubs)
        rest_work, rest_peak, rest_at = _order_work(sizes, rest_neighbours, rest_order)
        if gap > 0 and rest_peak < plain_peak and combos <= max_table_entries:
            _check_budget(graph, rest_peak, rest_at, max_table_entries)
            return _solve_hub_bounded(graph, factors, sizes, kept, hubs, rest_order, stats, started, dtype, gap)
        if rest_peak < plain_peak and combos * rest_work <= 2 * plain_work:
            _check_budget(graph, rest_peak, rest_at, max_table_entries)
            return _solve_conditioned(graph, factors, sizes, kept, hubs, rest_order, stats, started, dtype)
    _check_budget(graph, plain_peak, plain_at, max_table_entries)
    stats.order = order
    constant, choice = _eliminate_all(factors, sizes, order, stats, dtype)
    if not np.isfinite(constant):
        raise PaseError("no assignment has a finite cost: every combination is infeasible")
    assignment = [int(kept[v][c]) for v, c in enumerate(choice)]
    stats.seconds = time.perf_counter() - started
    return Solution(graph.objective(assignment), assignment, stats)


def _without_singletons(factor: Factor, sizes: list[int]) -> Factor:
    """A pairwise factor with any one-configuration variable fixed: it then links nothing.

    Such variables add nothing to table sizes, so a min-weight order would otherwise pile them
    into one scope until it has more axes than numpy allows (64).
    """
    a, b = factor.scope
    if sizes[b] == 1:
        return Factor((a,), factor.table[:, 0])
    if sizes[a] == 1:
        return Factor((b,), factor.table[0, :])
    return factor


def _check_budget(graph: CostGraph, peak: float, at: int, limit: int) -> None:
    if peak > limit:
        raise TableBudgetExceeded(
            f"the search would build a table of {peak:,.0f} entries (limit {limit:,}) when eliminating vertex "
            f"{graph.ids[at]!r}; the graph is too densely connected for exact search at this device count", peak)


def _order_work(sizes: list[int], neighbours: list[set[int]], order: list[int]) -> tuple[float, float, int]:
    """(total table entries, largest table, the vertex that builds it) of eliminating in ``order``.

    These are exactly the tables the elimination builds, so budgets are checked before any is.
    O(V * d^2).
    """
    adjacency = [set(n) for n in neighbours]
    total = peak = 0.0
    at = order[0] if order else 0
    for v in order:
        nbrs = adjacency[v]
        entries = float(prod(sizes[u] for u in nbrs)) * sizes[v]
        total += entries
        if entries > peak:
            peak, at = entries, v
        for a in nbrs:
            adjacency[a] |= nbrs - {a}
            adjacency[a].discard(v)
    return total, peak, at


def _condition(factors: list[Factor], fixed: dict[int, int]
               ) -> tuple[list[Factor], float, list[frozenset[int]]]:
    """``factors`` with the variables in ``fixed`` set to their configurations.

    Returns (factors left, constant, per factor left the fixed variables it was conditioned on):
    a factor's table depends only on those variables' configurations, which lets
    ``_eliminate_all`` reuse messages between calls that fix them alike.
    """
    conditioned: list[Factor] = []
    depends: list[frozenset[int]] = []
    constant = 0.0
    for factor in factors:
        on = frozenset(fixed.keys() & set(factor.scope))
        if not on:
            conditioned.append(factor)
            depends.append(on)
            continue
        table = factor.table[tuple(fixed.get(u, slice(None)) for u in factor.scope)]
        scope = tuple(u for u in factor.scope if u not in fixed)
        if scope:
            conditioned.append(Factor(scope, table))
            depends.append(on)
        else:
            constant += float(table)
    return conditioned, constant, depends


def _finish(graph: CostGraph, kept: list[np.ndarray], choice: list[int], hubs: list[int], order: list[int],
            stats: SearchStats, started: float) -> Solution:
    stats.order = [*order, *hubs]
    stats.conditioned_on = [graph.ids[h] for h in hubs]
    assignment = [int(kept[v][c]) for v, c in enumerate(choice)]
    stats.seconds = time.perf_counter() - started
    return Solution(graph.objective(assignment), assignment, stats)


def _solve_combo(factors: list[Factor], fixed: dict[int, int], sizes: list[int], order: list[int],
                 stats: SearchStats, dtype: type, memo: Memo) -> tuple[float, list[int]]:
    """The optimum with the hubs in ``fixed`` at their configurations, and its choice (hubs included).

    ``memo`` carries messages from one combination to the next (see ``_eliminate_all``).
    """
    conditioned, constant, depends = _condition(factors, fixed)
    if not np.isfinite(constant):
        return float("inf"), []
    stats.hub_combos_solved += 1
    value, choice = _eliminate_all(conditioned, sizes, order, stats, dtype, depends, fixed, memo)
    for h, c in fixed.items():
        choice[h] = c
    return constant + value, choice


def _solve_conditioned(graph: CostGraph, factors: list[Factor], sizes: list[int], kept: list[np.ndarray],
                       hubs: list[int], order: list[int], stats: SearchStats, started: float,
                       dtype: type) -> Solution:
    """min over hub configurations of (hub costs + optimum of the rest with the hubs fixed)."""
    best_value, best_choice = float("inf"), None
    memo = Memo()
    for combo in itertools.product(*(range(sizes[h]) for h in hubs)):
        value, choice = _solve_combo(factors, dict(zip(hubs, combo)), sizes, order, stats, dtype, memo)
        if value < best_value:
            best_value, best_choice = value, choice
    if best_choice is None or not np.isfinite(best_value):
        raise PaseError("no assignment has a finite cost: every combination is infeasible")
    return _finish(graph, kept, best_choice, hubs, order, stats, started)


def _solve_hub_bounded(graph: CostGraph, factors: list[Factor], sizes: list[int], kept: list[np.ndarray],
                       hubs: list[int], order_of_rest: list[int], stats: SearchStats, started: float,
                       dtype: type, gap: float) -> Solution:
    """Hub conditioning with bounds: exact combinations only while they can still win by ``gap``.

    Relaxation: every factor between a hub and another vertex is minimised over the hub's
    configuration on its own, so each consumer may see a different hub layout. Its optimum R plus
    the hub-only cost of a combination h bounds from below every assignment with hubs at h. Its
    assignment, evaluated with the hubs at each h, bounds the optimum from above. Combinations
    are then searched exactly in order of their lower bound until none can beat the best found by
    more than ``gap`` (relative). Sound: the true optimum is >= min over unsearched h of its bound.
    """
    hub_set = set(hubs)
    axis = {h: i for i, h in enumerate(hubs)}
    shape = tuple(sizes[h] for h in hubs)
    hub_only = np.zeros(shape)
    relaxed: list[Factor] = []
    relaxed_on: list[frozenset[int]] = []  # the hub each relaxed factor was minimised over
    mixed: list[tuple[Factor, int]] = []  # (factor over one hub and one other vertex, its hub's scope position)
    for factor in factors:
        in_hubs = [u in hub_set for u in factor.scope]
        if all(in_hubs):
            hub_only = hub_only + _broadcast_to_hubs(factor, axis, len(hubs))
        elif any(in_hubs):
            if len(factor.scope) != 2 or sum(in_hubs) != 1:
                return _solve_conditioned(graph, factors, sizes, kept, hubs, order_of_rest, stats, started, dtype)
            position = in_hubs.index(True)
            mixed.append((factor, position))
            other = factor.scope[1 - position]
            relaxed.append(Factor((other,), factor.table.min(axis=position)))
            relaxed_on.append(frozenset({factor.scope[position]}))
        else:
            relaxed.append(factor)
            relaxed_on.append(frozenset())
    memo = Memo()
    lower, choice = _eliminate_all(relaxed, sizes, order_of_rest, stats, dtype, relaxed_on,
                                   dict.fromkeys(hubs, RELAXED), memo)
    # upper bound of every combination with the relaxation's assignment of the other vertices
    rest_value = sum(float(f.table[tuple(choice[u] for u in f.scope)]) for f in factors if not hub_set & set(f.scope))
    upper = hub_only + rest_value
    for factor, position in mixed:
        hub, other = factor.scope[position], factor.scope[1 - position]
        column = factor.table[:, choice[other]] if position == 0 else factor.table[choice[other], :]
        upper = upper + _vector_on_axis(column, axis[hub], len(hubs))
    bounds = hub_only + lower
    best_index = np.unravel_index(int(np.argmin(upper)), shape)
    best_value = float(upper[best_index])
    best_choice = list(choice)
    for h, c in zip(hubs, best_index):
        best_choice[h] = int(c)
    if not np.isfinite(best_value):  # the relaxation's assignment is infeasible with every combination
        return _solve_conditioned(graph, factors, sizes, kept, hubs, order_of_rest, stats, started, dtype)
    # combinations in order of their lower bound: once one cannot win, none after it can. Ties
    # (hubs with no cost of their own, like the text context, bound alike) go best upper bound first,
    # so the likely winner is searched before its equals.
    flat_bounds = bounds.ravel()
    remaining = best_value
    for flat in np.lexsort((upper.ravel(), flat_bounds)):
        remaining = float(flat_bounds[flat])
        if not np.isfinite(remaining):  # every combination left is infeasible: the best found is exact
            remaining = best_value
            break
        if best_value <= remaining + gap * abs(remaining):  # best <= (1 + gap) x any unsearched bound
            break
        combo = np.unravel_index(int(flat), shape)
        value, found = _solve_combo(factors, {h: int(c) for h, c in zip(hubs, combo)}, sizes, order_of_rest, stats,
                                    dtype, memo)
        if value < best_value:
            best_value, best_choice = value, found
    else:
        remaining = best_value  # every combination was searched: exact
    stats.proved_gap = max(0.0, (best_value - remaining) / abs(remaining)) if remaining else 0.0
    return _finish(graph, kept, best_choice, hubs, order_of_rest, stats, started)


def _broadcast_to_hubs(factor: Factor, axis: dict[int, int], count: int) -> np.ndarray:
    """A factor over hubs only, as an array over all hubs' axes (size 1 where it lacks a hub)."""
    positions = [axis[u] for u in factor.scope]
    table = factor.table.transpose(np.argsort(positions)) if positions != sorted(positions) else factor.table
    shape = [1] * count
    for u in factor.scope:
        shape[axis[u]] = factor.table.shape[factor.scope.index(u)]
    return np.asarray(table).reshape(shape)


def _vector_on_axis(vector: np.ndarray, position: int, count: int) -> np.ndarray:
    shape = [1] * count
    shape[position] = vector.size
    return vector.reshape(shape)


RELAXED = -1  # in ``_eliminate_all``'s ``fixed``: the hub was minimised over edge by edge, not fixed


class Memo(dict):
    """Elimination messages keyed by (variable, the hub configurations they depend on), under a size budget."""

    budget_entries: int = 1 << 26

    def __init__(self) -> None:
        super().__init__()
        self.entries = 0

    def keep(self, key: tuple, table: np.ndarray) -> None:
        if self.entries + np.size(table) <= self.budget_entries:
            self[key] = table
            self.entries += int(np.size(table))


def _eliminate_all(factors: list[Factor], sizes: list[int], order: list[int], stats: SearchStats,
                   dtype: type, depends: list[frozenset[int]] | None = None, fixed: dict[int, int] | None = None,
                   memo: Memo | None = None) -> tuple[float, list[int]]:
    """Eliminate ``order`` over ``factors``; returns (optimum, configuration index per variable).

    With ``memo``: ``depends[i]`` names the conditioned variables (hubs) factor i's table was
    derived from, ``fixed`` their configurations in this call. A step's message depends on the
    union of its factors' hubs, so it is stored under (variable, those hubs' configurations) and
    taken from the memo when a later call with the same order and factor structure fixes them
    alike: hub combinations share every message that does not involve the hub that changed.

    No argmin tables are built: each step keeps the factors it summed, and decoding (in reverse
    order, when every variable of a step's scope but its own is already chosen) re-evaluates them at
    those choices — a vector over one variable's configurations, instead of an argmin pass over
    every table.
    """
    factors = list(factors)
    deps = list(depends) if depends is not None else [frozenset()] * len(factors)
    fixed = fixed or {}
    hub_count = len(fixed)
    by_var: list[set[int]] = [set() for _ in sizes]
    for fid, factor in enumerate(factors):
        for v in factor.scope:
            by_var[v].add(fid)
    alive = dict(enumerate(factors))
    steps: list[tuple[int, list[Factor]]] = []
    constant = 0.0
    for v in order:
        fids = sorted(by_var[v])
        group = [alive.pop(fid) for fid in fids]
        for fid, factor in zip(fids, group):
            for u in factor.scope:
                by_var[u].discard(fid)
        rest = tuple(sorted({u for f in group for u in f.scope} - {v}))
        entries = prod(sizes[u] for u in rest) * sizes[v]
        stats.width = max(stats.width, len(rest) + 1)
        stats.largest_table = max(stats.largest_table, entries)
        steps.append((v, group))
        if not group:  # a variable no factor mentions (its cost was folded away): any choice
            continue
        on = frozenset().union(*(deps[fid] for fid in fids))
        key = (v, tuple(sorted((h, fixed[h]) for h in on)))
        if memo is not None and key in memo:
            best = memo[key]
            stats.messages_reused += 1
        else:
            best = _eliminate(v, rest, group, sizes, dtype)
            if memo is not None and (len(on) < hub_count or not hub_count):  # one on every hub never recurs
                memo.keep(key, best)
        if rest:
            fid = len(factors)
            factors.append(Factor(rest, best))
            alive[fid] = factors[fid]
            deps.append(on)
            for u in rest:
                by_var[u].add(fid)
        else:
            constant += float(best)
    for factor in alive.values():  # factors over no eliminated variable (cannot happen unless order is partial)
        constant += float(np.min(factor.table))
    choice = [0] * len(sizes)
    for v, group in reversed(steps):
        if group:
            choice[v] = int(np.argmin(sum(_at_choice(f, v, choice) for f in group)))
    return constant, choice


def _at_choice(factor: Factor, v: int, choice: list[int]) -> np.ndarray:
    """The factor as a vector over ``v``, every other variable of its scope at its chosen configuration."""
    return factor.table[tuple(slice(None) if u == v else choice[u] for u in factor.scope)].astype(np.float64)


def _eliminate(v: int, rest: tuple[int, ...], group: list[Factor], sizes: list[int],
               dtype: type = np.float64) -> np.ndarray:
    """min over v of the sum of ``group`` (tables over subsets of v + rest), as a table over rest.

    v is the leading axis, so the minimum is an elementwise ``np.minimum`` of contiguous slabs
    (memory-bound, vectorised) rather than a strided reduction along a short last axis.
    """
    scope = (v, *rest)
    shape = tuple(sizes[u] for u in scope)
    aligned = [_align(f, scope, shape) for f in group]
    aligned.sort(key=lambda table: table.size)  # add small tables together before the full-size block exists
    if not rest:
        return np.min(_sum_tables(aligned, dtype))
    lead = shape[1]
    entries = prod(shape)
    step = max(1, CHUNK_ELEMENTS // max(1, shape[0] * prod(shape[2:])))
    workers = _workers() if entries >= PARALLEL_ELEMENTS else 1
    if workers > 1:
        step = min(step, -(-lead // workers))
    if step >= lead:
        return _min_leading(_sum_tables(aligned, dtype), shape)
    best: np.ndarray = np.empty(shape[1:], dtype=dtype)

    def slice_min(start: int) -> None:
        stop = min(lead, start + step)
        block = _sum_tables([t[:, start:stop] if t.shape[1] != 1 else t for t in aligned], dtype)
        best[start:stop] = _min_leading(block, (shape[0], stop - start, *shape[2:]))

    starts = range(0, lead, step)
    if workers > 1:  # numpy's ufunc loops release the GIL: slices of one big table run on every core
        list(_pool(workers).map(slice_min, starts))
    else:
        for start in starts:
            slice_min(start)
    return best


@functools.cache
def _workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pase-eliminate")


def _min_leading(block: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Minimum over axis 0 of ``block`` broadcast to ``shape`` (it may lack some axes), as a new array."""
    low = block[0] if block.shape[0] == 1 else block.min(axis=0)
    return low if low.shape == shape[1:] and low.base is None else np.broadcast_to(low, shape[1:]).copy()


def _sum_tables(tables: list[np.ndarray], dtype: type) -> np.ndarray:
    """Broadcast sum, smallest first, in place once the result has its final size (one pass per table)."""
    total: np.ndarray = tables[0].astype(dtype, copy=False)
    owned = False
    for table in tables[1:]:
        if owned and np.broadcast_shapes(total.shape, table.shape) == total.shape:
            total += table
        else:
            total = np.add(total, table, dtype=dtype)
            owned = True
    return total


def _align(factor: Factor, scope: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """The factor's table transposed to ``scope`` order, with size-1 axes for variables it lacks."""
    order = sorted(range(len(factor.scope)), key=lambda i: scope.index(factor.scope[i]))
    table = factor.table.transpose(order) if order != list(range(len(order))) else factor.table
    present = {factor.scope[i] for i in order}
    return table.reshape([shape[k] if u in present else 1 for k, u in enumerate(scope)])


def brute_force(graph: CostGraph) -> Solution:
    """Every assignment, for tests: O(prod of configuration counts)."""
    started = time.perf_counter()
    best_value, best = float("inf"), [0] * len(graph.sizes)
    for assignment in itertools.product(*(range(k) for k in graph.sizes)):
        value = graph.objective(list(assignment))
        if value < best_value:
            best_value, best = value, list(assignment)
    return Solution(best_value, best, SearchStats(seconds=time.perf_counter() - started))
