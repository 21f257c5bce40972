"""Gradient accumulation in the per-layer search: how many micro-steps a step takes, chosen with the splits.

A step of global batch ``B`` may run as ``k`` micro-steps of ``B / k`` samples whose gradients add up locally
(the runtime pauses the whole-gradient all-reduce between them: DDP's ``no_sync``, a tensor plan's paused
``GradientSync``; FSDP2 keeps reduce-scattering every micro-step, and the cost model prices it so) and
synchronise once. Memory is what one micro-step holds; time is ``k`` micro-steps less the ``k - 1``
all-reduces that do not run (``accumulated``).

``plan_micro_steps`` searches jointly. For the options as given, and where memory binds and the user left
them open, for FSDP and for FSDP with activation checkpointing, it finds the fewest micro-steps at which a
plan fits (jumping by the memory overshoot: memory falls at most in proportion to the micro-batch) and,
where memory still binds there, also tries about twice as many (a looser limit may buy faster splits).
Where memory binds at a count, selective checkpointing is tried there too, with and without FSDP: the blocks
that free the most memory per second of recompute (``pase.planning.selective``); and so is sharding per block:
each block with weights kept whole, ZeRO-2 or FSDP, as frees the most memory per second added. At ``k`` micro-steps the
search minimises the whole step (the all-reduce that runs once costs 1/k per micro-step). The fastest whole
step wins.

The baselines people compare with are priced by the same model: DDP and FSDP in one step, DDP with the fewest
micro-steps that fit (``ddp_accum``), FSDP with activation checkpointing and the fewest micro-steps that fit
(``fsdp_accum_ckpt``), and the best pipeline (``pipeline``: when stages are searched, as `pase plan` does unless
``--no-pipeline``, else null).
Where a data-parallel one is faster than every plan tried (it runs more micro-steps than were tried, or the
search's gap hid it), its setting is searched again at its micro-steps, exactly, in a space that holds the
baseline; where memory binds, pure data parallelism is also held against the Lagrangian search's plan
(``per_layer.search_under_memory``). So the plan is never slower than a data-parallel baseline, and with
pipelines searched the faster of it and the best pipeline is the plan.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cost_models.cluster import Cluster
from cost_models.rates import HardwareRates
from pase.errors import PaseError
from pase.graph import LayerGraph
from pase.graph.rescale import with_batch
from pase.planning.per_layer import (
    PlanDoesNotFit,
    PlanOptions,
    PricedGraph,
    data_parallel_prediction,
    plan_and_price,
    size_text,
)
from pase.planning.plan import Plan, Prediction
from pase.planning.selective import select_blocks, select_sharding

BASELINES = ("ddp", "fsdp", "ddp_accum", "fsdp_accum_ckpt", "pipeline")
PIPELINE_NOT_SEARCHED = "pipelines were not searched (--no-pipeline; from Python: make_plan(pipeline=...))"
Found = tuple[Plan, PricedGraph]


def accumulated(prediction: Prediction, micro_steps: int, batch: int) -> Prediction:
    """One step of ``micro_steps`` micro-steps, from one micro-step's prediction (``batch``: the step's)."""
    k = micro_steps
    sync, sync_bytes = prediction.gradient_sync_seconds, prediction.gradient_sync_bytes_per_device
    optimizer = prediction.optimizer_seconds
    step = prediction.step_seconds * k - (sync + optimizer) * (k - 1)
    return Prediction(step_seconds=step, samples_per_second=batch / step if step > 0 else 0.0,
                      memory_bytes_per_device=prediction.memory_bytes_per_device,
                      compute_seconds=prediction.compute_seconds * k - optimizer * (k - 1),
                      communication_seconds=prediction.communication_seconds * k - sync * (k - 1),
                      bubble_seconds=prediction.bubble_seconds * k, gradient_sync_seconds=sync,
                      comm_bytes_per_device=prediction.comm_bytes_per_device * k - sync_bytes * (k - 1),
                      gradient_sync_bytes_per_device=sync_bytes, micro_steps=k, optimizer_seconds=optimizer)


def divisors_of(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order, in O(sqrt(n)) (a batch of 2^31 has its divisors in a blink)."""
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return small + [n // k for k in reversed(small) if k * k != n]


def micro_step_counts(batch: int, devices: int) -> list[int]:
    """Micro-step counts the runtime can run: each micro-step's batch splits into equal chunks over the devices."""
    return [k for k in divisors_of(batch) if (batch // k) % devices == 0]


def micro_graph(graph: LayerGraph, micro_steps: int) -> LayerGraph:
    """``graph`` (captured at a step's batch) at one micro-step's batch."""
    if micro_steps == 1:
        return graph
    rescaled = with_batch(graph, graph.batch // micro_steps)
    if rescaled is None:
        raise PaseError(f"cannot rescale {graph.meta.get('model')}'s layer graph from batch {graph.batch} to "
                        f"{graph.batch // micro_steps} for {micro_steps} micro-steps; plan with --micro-steps 1")
    return rescaled


def _next_count(counts: list[int], current: int, factor: float) -> int | None:
    """The first count above ``current`` that is at least ``current * factor`` (else the largest above it)."""
    larger = [k for k in counts if k > current]
    return next((k for k in larger if k >= current * factor), larger[-1]) if larger else None


# (fsdp, checkpointing, reshard); "selective": the blocks checkpointed are chosen per micro-step count
# (pase.planning.selective); "zero2": sharded state, the weights gathered once per micro-step and kept through the
# backward (FSDP2's reshard_after_forward=False; blocks' sharding "gradients"). ZeRO-1 (optimizer state alone) is
# not searched: it holds whole gradients and moves half again ZeRO-2's bytes (all-reduce, then a gather of the
# updated weights), so ZeRO-2 is never worse; under micro-steps both hold whole gradients between them.
# "sharded_blocks": each block with weights kept whole, ZeRO-2 or FSDP, chosen per micro-step count
# (pase.planning.selective.select_sharding) against the plan without sharding
SETTINGS = {"as given": (False, False, True), "fsdp_ckpt": (True, True, True), "fsdp": (True, False, True),
            "zero2": (True, False, False), "selective": (False, True, True), "fsdp_selective": (True, True, True),
            "sharded_blocks": (True, False, True)}
SELECTIVE = {"selective": "as given", "fsdp_selective": "fsdp"}  # selective setting -> the setting it relieves
CHECKED = {"fsdp_selective": "fsdp_ckpt"}  # -> the setting searched that checkpoints every block, where one is
BASELINE_SETTING = {"ddp": "as given", "ddp_accum": "as given", "fsdp": "fsdp", "fsdp_accum_ckpt": "fsdp_ckpt"}


def search_settings(options: PlanOptions) -> dict[str, PlanOptions]:
    """The settings searched: the options as given and, when the user left them open and memory binds, FSDP alone,
    ZeRO-2 (FSDP keeping the gathered weights through the backward) and FSDP with activation checkpointing."""
    given = replace(options, baselines=False)
    if options.only is not None or options.fsdp or options.checkpointing:
        return {"as given": given}
    return {name: replace(given, fsdp=fsdp, checkpointing=checkpointing, reshard=reshard)
            for name, (fsdp, checkpointing, reshard) in SETTINGS.items()}


class _Search:
    """Every (setting, micro-steps) searched once; remembers what fit and what did not."""

    def __init__(self, graph: LayerGraph, cluster: Cluster, profile: dict[str, Any] | None,
                 settings: dict[str, PlanOptions], progress: Callable[[str], None] | None) -> None:
        self.graph, self.cluster, self.profile = graph, cluster, profile
        self.settings, self.progress = settings, progress
        self.found: dict[tuple[str, int, bool], Found | PlanDoesNotFit] = {}
        self.graphs: dict[int, LayerGraph] = {}  # the graph at each micro-step count searched
        self.memo: dict[str, Any] = {}  # layers and edges priced, shared by every setting and count

    def run(self, setting: str, k: int, exact: bool = False) -> Found | PlanDoesNotFit:
        """The plan of ``setting`` at ``k`` micro-steps (``exact``: searched to the optimum, no gap)."""
        if (setting, k, exact) not in self.found:
            if self.progress:
                self.progress(f"searching {k} micro-step{'s' if k > 1 else ''} of {self.graph.batch // k}"
                              + (f" ({setting.replace('_', ' + ')})" if setting != "as given" else "")
                              + (", exactly" if exact else ""))
            setting_options = self.settings[setting]
            options = replace(setting_options, micro_steps=k,
                              search_gap=0.0 if exact else setting_options.search_gap)
            if k not in self.graphs:  # every setting searched at k prices the same micro-step graph
                self.graphs[k] = micro_graph(self.graph, k)
            graph = self.graphs[k]
            try:
                if setting in SELECTIVE:
                    rates = HardwareRates(self.cluster, self.profile, options.precision)
                    best = self.best()  # a selection must beat it: per micro-step, the search's objective
                    blocks = select_blocks(graph, self.cluster, rates, options,
                                           self.priced(SELECTIVE[setting], k),
                                           self.priced(CHECKED[setting], k) if setting in CHECKED else None,
                                           best[2].step_seconds / k if best else float("inf"), self.memo)
                    if not blocks:  # fits without checkpointing (searched as given), or not even with every block
                        raise PlanDoesNotFit("no selection of checkpointed blocks helps here")
                    options = replace(options, checkpoint_blocks=blocks)
                if setting == "sharded_blocks":
                    rates = HardwareRates(self.cluster, self.profile, options.precision)
                    best = self.best()
                    references = {"none": self.priced("as given", k), "gradients": self.priced("zero2", k),
                                  "full": self.priced("fsdp", k)}
                    sharding = select_sharding(graph, self.cluster, rates, options, references,
                                               best[2].step_seconds / k if best else float("inf"), self.memo)
                    if not sharding:  # fits unsharded (searched as given), or not even with every block sharded
                        raise PlanDoesNotFit("no selection of sharded blocks helps here")
                    options = replace(options, block_sharding=sharding)
                self.found[setting, k, exact] = plan_and_price(graph, self.cluster, profile=self.profile,
                                                               options=options, memo=self.memo)
            except PlanDoesNotFit as exc:
                self.found[setting, k, exact] = exc
        return self.found[setting, k, exact]

    def fewest(self, setting: str, counts: list[int], explore: bool, start: int | None = None) -> None:
        """The fewest micro-steps at which ``setting`` fits, and (``explore``, memory binding) about twice as many;
        from ``start`` (a count below which it cannot fit) or the fewest."""
        k: int | None = start if start in counts else counts[0]
        while k is not None:
            result = self.run(setting, k)
            if not isinstance(result, PlanDoesNotFit):
                if explore and result[0].search.memory_price and (looser := _next_count(counts, k, 2.0)):
                    self.run(setting, looser)
                return
            over = result.least_bytes / result.limit_bytes if result.limit_bytes else 2.0
            k = _next_count(counts, k, max(over, 1.0))

    def fewest_fitting(self, setting: str) -> int | None:
        """The fewest micro-steps at which ``setting``'s search found a plan that fits (None: at none)."""
        return min((k for (s, k, exact), result in self.found.items() if s == setting and not exact
                    and not isinstance(result, PlanDoesNotFit)), default=None)

    def priced(self, setting: str, k: int) -> PricedGraph | None:
        """The graph as ``setting``'s search at ``k`` micro-steps priced it (None: not searched)."""
        result = self.found.get((setting, k, False))
        return result.priced if isinstance(result, PlanDoesNotFit) else result[1] if result else None

    def selective_counts(self, setting: str) -> list[int]:
        """Where recomputing some blocks may pay for ``setting``: the fewest micro-steps at which it fits, if memory
        binds there, and the most below that at which it does not fit."""
        tried = {k: result for (s, k, exact), result in self.found.items() if s == setting and not exact}
        fewest = self.fewest_fitting(setting)
        below = [k for k, result in tried.items() if isinstance(result, PlanDoesNotFit) and (fewest is None or
                                                                                            k < fewest)]
        counts = [max(below)] if below else []
        if fewest is not None and not isinstance(result := tried[fewest], PlanDoesNotFit) and \
                result[0].search.memory_price:
            counts.append(fewest)
        return counts

    def best(self) -> tuple[int, Found, Prediction] | None:
        """(micro-steps, plan and priced graph, the whole step's prediction) of the fastest step found."""
        candidates = [(k, result, accumulated(result[0].predicted, k, self.graph.batch))
                      for (_, k, _), result in self.found.items() if not isinstance(result, PlanDoesNotFit)]
        return min(candidates, key=lambda item: item[2].step_seconds, default=None)

    def failure(self) -> PlanDoesNotFit:
        """Why the options as given do not fit (at the most micro-steps tried)."""
        failures = [(k, r) for (s, k, _), r in self.found.items()
                    if s == "as given" and isinstance(r, PlanDoesNotFit)]
        return max(failures, key=lambda item: item[0])[1]


def plan_micro_steps(graph: LayerGraph, cluster: Cluster, *, profile: dict[str, Any] | None = None,
                     options: PlanOptions | None = None, micro_steps: int | None = None,
                     progress: Callable[[str], None] | None = None) -> Found:
    """The fastest per-layer plan for a step of ``graph.batch`` samples with its micro-steps (``micro_steps``:
    that many; None: searched) and, where ``options`` leave them open, FSDP and checkpointing; the four baselines
    beside it. Raises ``PlanDoesNotFit`` when nothing fits even one sample per device per micro-step."""
    options = options or PlanOptions()
    batch, devices = graph.batch, cluster.world_size
    counts = micro_step_counts(batch, devices) or [1]  # [1]: the search itself says why the batch does not divide
    if micro_steps is not None:
        if micro_steps not in counts:
            raise PaseError(f"--micro-steps {micro_steps}: the global batch {batch} must split into {micro_steps} "
                            f"micro-steps whose batch divides over the {devices} devices; choose one of "
                            f"{', '.join(map(str, counts))}")
        counts = [micro_steps]
    settings = search_settings(options)
    search = _Search(graph, cluster, profile, settings, progress)
    search.fewest("as given", counts, explore=micro_steps is None)
    plain = search.best()
    if plain is None or plain[0] > 1 or plain[1][0].search.memory_price:  # memory binds: sharding may pay
        for setting in ("fsdp", "zero2", "fsdp_ckpt"):
            if setting in settings:  # ZeRO-2 holds FSDP's state and more: it fits at no fewer micro-steps
                start = search.fewest_fitting("fsdp") if setting == "zero2" else None
                search.fewest(setting, counts, explore=micro_steps is None, start=start)
        for selective, relieved in SELECTIVE.items():  # or recomputing the blocks that free most memory per second
            if selective in settings:
                for k in search.selective_counts(relieved):
                    search.run(selective, k)
        if "sharded_blocks" in settings:  # or sharding the blocks that free most memory per second
            for k in search.selective_counts("as given"):
                search.run("sharded_blocks", k)
    baselines = data_parallel_baselines(graph, cluster, profile, options, counts, search.graphs) \
        if options.baselines else {}
    for name, (prediction, _) in baselines.items():  # a baseline faster than every plan tried: search its count
        best = search.best()  # exactly (its space holds the baseline: the plan cannot come out slower)
        if prediction is not None and prediction.micro_steps in counts and \
                (best is None or prediction.step_seconds < best[2].step_seconds):
            setting = BASELINE_SETTING[name] if BASELINE_SETTING[name] in settings else "as given"
            search.run(setting, prediction.micro_steps, exact=True)
    best = search.best()
    if best is None:
        raise search.failure()
    k, (plan, priced), prediction = best
    plan.micro_steps, plan.batch, plan.predicted = k, batch, prediction
    plan.baselines = {name: prediction for name, (prediction, _) in baselines.items()}
    plan.baseline_notes = {name: note for name, (_, note) in baselines.items() if note}
    if options.baselines:  # plan_with_pipeline fills it in when it searches stages
        plan.baselines["pipeline"] = None
        plan.baseline_notes["pipeline"] = PIPELINE_NOT_SEARCHED
    return plan, priced


def data_parallel_baselines(graph: LayerGraph, cluster: Cluster, profile: dict[str, Any] | None,
                            options: PlanOptions, counts: list[int], graphs: dict[int, LayerGraph] | None = None
                            ) -> dict[str, tuple[Prediction | None, str | None]]:
    """The four baselines as whole steps: name -> (prediction, or None and why it is missing). ``graphs``: the
    graph at each micro-step count, as the search rescaled it (filled in here where missing)."""
    rates = HardwareRates(cluster, profile, options.precision)
    limit = cluster.gpu.memory_bytes * options.memory_fraction
    plain = replace(options, fsdp=False, checkpointing=False, block_sharding=None)
    graphs = {} if graphs is None else graphs
    # re-layouts depend on neither FSDP nor the batch's split: priced once per micro-step count (and checkpointing)
    relayouts: dict[tuple[int, bool], dict[str, float]] = {}
    result: dict[str, tuple[Prediction | None, str | None]] = {}
    for name, setting, accumulate in (("ddp", plain, False), ("fsdp", replace(plain, fsdp=True), False),
                                      ("ddp_accum", plain, True),
                                      ("fsdp_accum_ckpt", replace(plain, fsdp=True, checkpointing=True), True)):
        k: int | None = counts[0] if accumulate else 1
        while k is not None:
            if k not in graphs:
                graphs[k] = micro_graph(graph, k)
            prediction, note = data_parallel_prediction(graphs[k], cluster, rates, setting, setting.fsdp,
                                                        relayouts.setdefault((k, setting.checkpointing), {}))
            if prediction is None:
                result[name] = (None, note)
                break
            memory = prediction.memory_bytes_per_device
            if memory <= limit:
                result[name] = (accumulated(prediction, k, graph.batch), None)
                break
            result[name] = (None, f"needs {size_text(memory)} per device"
                            + (f" at {k} micro-steps of {graph.batch // k}" if k > 1 else "")
                            + f", over the {size_text(limit)} limit")
            k = _next_count(counts, k, memory / limit) if accumulate else None
    return result


__all__ = ["BASELINES", "BASELINE_SETTING", "accumulated", "data_parallel_baselines", "divisors_of", "micro_graph",
           "micro_step_counts", "plan_micro_steps", "search_settings"]
