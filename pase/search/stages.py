"""Exact stage DP: cut an ordered list of segments into contiguous pipeline stages with device groups.

The problem: segments ``0..n-1`` (in pipeline order), ``D`` devices, allowed group sizes, ``m``
microbatches. A partition is stages ``[i, j)`` each with a group size ``g``; sizes sum to ``D``,
groups are laid out in stage order (offsets ``0, g0, g0+g1, ...``) and each must be a legal
placement at its offset. Stage ``[i, j)`` with group ``g`` holding ``k`` microbatches in flight
costs ``costs[i, j, g_index, k_index]`` seconds per microbatch (inf: does not fit). The value of
a partition is ``sum_s t_s + (m - 1) * max_s t_s`` (``strategies.pipeline.step_seconds``).

The max term is handled exactly by enumerating its breakpoints from the top: minimise the sum
with every stage cost below a threshold ``tau`` (a plain min-sum DP over (segment, devices used,
stages after)), read the solution's own maximum ``mu``, then lower ``tau`` just below ``mu``;
a solution with a larger maximum has a larger sum-or-max, so none is missed. The DP runs back
to front so the number of stages after a stage, which fixes 1F1B's in-flight count, is state.
Complexity per threshold: O(n * G * n * D * S) numpy element operations.

``equal_groups`` restricts the partitions to stages of one group size (what the pipeline runtime
runs): the DP is solved once per size with the other sizes left out, and the best kept.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np

from strategies.pipeline import check_schedule


@dataclass(frozen=True)
class StageChoice:
    start: int  # first segment
    stop: int  # one past the last segment
    group: int  # devices
    offset: int  # first device (within one pipeline replica)
    in_flight: int  # microbatches held at the peak
    seconds: float  # per microbatch


@dataclass(frozen=True)
class Partition:
    stages: tuple[StageChoice, ...]
    value: float  # step seconds
    sum_seconds: float
    max_seconds: float


@dataclass(frozen=True)
class StageProblem:
    costs: np.ndarray  # (n, n + 1, G, K)
    group_sizes: tuple[int, ...]
    devices: int
    microbatches: int
    schedule: str = "1f1b"
    max_stages: int = 8
    placement: np.ndarray | None = None  # (D + 1, G) bool: may a group of size g start at offset o
    min_stages: int = 1
    equal_groups: bool = False  # every stage on the same number of devices

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        n = self.costs.shape[0]
        if self.costs.shape[:3] != (n, n + 1, len(self.group_sizes)) or self.costs.shape[3] != self.in_flight_levels:
            raise ValueError(f"costs has shape {self.costs.shape}; expected ({n}, {n + 1}, {len(self.group_sizes)}, "
                             f"{self.in_flight_levels})")

    @property
    def segments(self) -> int:
        return int(self.costs.shape[0])

    @property
    def in_flight_levels(self) -> int:
        """K: GPipe holds m everywhere (one level); 1F1B holds min(m, stages after + 1)."""
        return 1 if self.schedule == "gpipe" else max(1, min(self.microbatches, self.max_stages))

    def in_flight(self, stages_after: int) -> int:
        return self.microbatches if self.schedule == "gpipe" else min(self.microbatches, stages_after + 1)

    def level(self, stages_after: int) -> int:
        """Index into the last axis of ``costs`` for a stage with ``stages_after`` stages behind it."""
        return 0 if self.schedule == "gpipe" else min(self.microbatches, stages_after + 1) - 1

    def legal(self, offset: int, group: int) -> bool:
        if offset + group > self.devices:
            return False
        if self.placement is None:
            return True
        return bool(self.placement[offset, self.group_sizes.index(group)])


def value_of(problem: StageProblem, stages: list[tuple[int, int, int]]) -> Partition | None:
    """Cost a partition given as (start, stop, group) triples; None if illegal or infeasible."""
    if not stages or stages[0][0] != 0 or stages[-1][1] != problem.segments:
        return None
    if any(a[1] != b[0] for a, b in zip(stages, stages[1:])) or any(i >= j for i, j, _ in stages):
        return None
    if sum(g for _, _, g in stages) != problem.devices or not problem.min_stages <= len(stages) <= problem.max_stages:
        return None
    if problem.equal_groups and len({g for _, _, g in stages}) > 1:
        return None
    chosen, offset = [], 0
    for s, (i, j, g) in enumerate(stages):
        if g not in problem.group_sizes or not problem.legal(offset, g):
            return None
        after = len(stages) - s - 1
        t = float(problem.costs[i, j, problem.group_sizes.index(g), problem.level(after)])
        if not np.isfinite(t):
            return None
        chosen.append(StageChoice(i, j, g, offset, problem.in_flight(after), t))
        offset += g
    times = [c.seconds for c in chosen]
    total, worst = sum(times), max(times)
    return Partition(tuple(chosen), total + (problem.microbatches - 1) * worst, total, worst)


def brute_force(problem: StageProblem) -> Partition | None:
    """Every cut set and every group-size sequence (the oracle for tests; exponential)."""
    n, best = problem.segments, None
    for cuts in range(1 << (n - 1)):
        bounds = [0] + [c + 1 for c in range(n - 1) if cuts >> c & 1] + [n]
        count = len(bounds) - 1
        if count > min(problem.max_stages, problem.devices) or count < problem.min_stages:
            continue
        for groups in itertools.product(problem.group_sizes, repeat=count):
            if sum(groups) != problem.devices:
                continue
            result = value_of(problem, [(bounds[s], bounds[s + 1], groups[s]) for s in range(count)])
            if result is not None and (best is None or result.value < best.value - 1e-15):
                best = result
    return best


def solve_stages(problem: StageProblem, incumbent: float = np.inf) -> Partition | None:
    """The exact optimum of ``problem`` (None when no partition is feasible, or none is below
    ``incumbent``: then the search stops as soon as it can prove that)."""
    if problem.equal_groups and len(problem.group_sizes) > 1:
        best: Partition | None = None
        for gi, g in enumerate(problem.group_sizes):
            if problem.devices % g or not problem.min_stages <= problem.devices // g <= problem.max_stages:
                continue
            one = replace(problem, costs=problem.costs[:, :, gi:gi + 1, :], group_sizes=(g,),
                          placement=None if problem.placement is None else problem.placement[:, gi:gi + 1])
            found = solve_stages(one, best.value if best is not None else incumbent)
            if found is not None and (best is None or found.value < best.value):
                best = found
        return best
    return _solve_any_groups(problem, incumbent)


def _solve_any_groups(problem: StageProblem, incumbent: float) -> Partition | None:
    costs = problem.costs
    best: Partition | None = None
    goal = incumbent
    m = problem.microbatches
    tau = goal / m if m > 1 else np.inf  # value >= m * max: a better partition has max < goal / m
    bottleneck = None
    while True:
        found = _min_sum(problem, np.where(costs <= tau, costs, np.inf))
        if found is None:
            return best
        if found.value < goal and (best is None or found.value < best.value):
            best = found
            goal = found.value
        if problem.microbatches == 1:
            return best  # the max term has weight 0: the min-sum solution is optimal
        if bottleneck is None:  # the least maximum any partition can have
            fastest = _min_sum(problem, costs, np.maximum)
            bottleneck = fastest.max_seconds if fastest else np.inf
        # any solution below this threshold has sum >= found.sum and max >= the least maximum
        if found.sum_seconds + (problem.microbatches - 1) * bottleneck >= goal:
            return best
        below = costs[costs < min(found.max_seconds, goal / m)]
        if not below.size:
            return best
        tau = float(below.max())


def _min_sum(problem: StageProblem, costs: np.ndarray, combine: np.ufunc = np.add) -> Partition | None:
    """Min sum (or, with ``combine=np.maximum``, min max) of stage costs over legal partitions.

    Devices are counted in units of the group sizes' greatest common divisor (the only counts
    a partition can use), which shrinks the state when every group is large."""
    unit = math.gcd(*problem.group_sizes) if problem.group_sizes else 1
    if not problem.group_sizes or problem.devices % unit:
        return None
    n, D, S = problem.segments, problem.devices // unit, min(problem.max_stages, problem.devices // unit)
    sizes = [g // unit for g in problem.group_sizes]
    dp = np.full((n + 1, D + 1, S + 1), np.inf)
    choice = np.full((n + 1, D + 1, S + 1), -1, dtype=np.int64)
    dp[n, 0, 0] = 0.0 if combine is np.add else -np.inf
    levels = np.array([problem.level(s) for s in range(S)])
    for j in range(n, 0, -1):
        here = dp[j]
        if not (here < np.inf).any():
            continue
        for gi, g in enumerate(sizes):
            if g > D:
                continue
            used = np.arange(D + 1 - g)  # devices (in units) used by the stages after this one
            offsets = (D - used - g) * unit
            legal = np.ones(len(used), dtype=bool) if problem.placement is None else problem.placement[offsets, gi]
            base = np.where(legal[:, None], here[:D + 1 - g, :S], np.inf)  # (u, s)
            if not (base < np.inf).any():
                continue
            stage = costs[:j, j, gi, :][:, levels]  # (i, s)
            candidate = combine(base[None, :, :], stage[:, None, :])  # (i, u, s)
            target = dp[:j, g:, 1:]
            better = candidate < target
            if better.any():
                target[better] = candidate[better]
                choice[:j, g:, 1:][better] = j * len(sizes) + gi
    low = max(1, problem.min_stages)
    finals = dp[0, D, low:]
    if not finals.size or not (finals < np.inf).any():
        return None
    count = int(np.argmin(finals)) + low
    stages, i, u, s = [], 0, D, count
    while i < n:
        code = int(choice[i, u, s])
        j, gi = divmod(code, len(sizes))
        stages.append((i, j, problem.group_sizes[gi]))
        i, u, s = j, u - sizes[gi], s - 1
    result = value_of(problem, stages)
    assert result is not None, "stage DP reconstructed an illegal partition"
    return result


__all__ = ["Partition", "StageChoice", "StageProblem", "brute_force", "solve_stages", "value_of"]
