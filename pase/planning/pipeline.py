"""Pipeline stages around the per-layer search: which layers run on which device group, in how many
microbatches, under which schedule, replicated how many times (PP x DP).

The LayerGraph's layers, in capture (topological) order, are grouped into segments (one per
module block, so an encoder level and its decoder partner stay whole and a cut between them is
visible); a stage is a contiguous run of segments on a group of devices. For every data-parallel
degree ``d`` and microbatch count ``m`` the stage DP (``pase.search.stages``) picks cut points and
group sizes exactly for stage costs that are:

- per microbatch: the exact per-layer search (``pase.planning.per_layer.search_under_memory``) on the
  stage's sub-graph at microbatch size ``B / (d m)`` on a group of ``g`` devices, whose weight
  gradient sync (inside the group, and across the ``d`` pipeline replicas) happens once per step
  and is spread over the ``m`` microbatches;
- plus every tensor that crosses a stage boundary (skip connections, the main path, the time
  embedding; not model inputs, which every stage reads itself), priced as a point-to-point
  transfer forward at the consumer and its gradient backward at the producer;
- memory: weights, gradients and optimizer state plus the saved activations and received
  inputs of the microbatches the schedule keeps in flight (``strategies.pipeline``).

Exact inner searches on every candidate stage would be thousands of searches, so the DP runs
branch and bound: stage costs start as lower bounds (the sum of each segment's own optimum,
which omits only the re-layouts between segments; per-layer minima for a first screen) and the
stages of the best bounded partition are searched exactly until the best partition consists of
exactly priced stages and no (d, m) bound beats it. Repeated blocks share one pricing per
distinct layer shape and one search per distinct segment.

The runnable space (``PipelineOptions.runnable_only``, the default) is what the pipeline runtime
runs: every stage on groups of the same size ``g`` (so ``D / g`` stages), every layer of a stage
splitting only its batch, ``g`` ways (the group's devices are replicas of the stage), and under 1F1B
at least as many microbatches as stages. The wider space (any group sizes, any per-layer split
inside a stage) is searched only when asked, and a plan from it that the runtime cannot run says
so (``pipeline_problem``, the same check the runtime refuses with).

Placement: pipeline replica ``r`` holds ranks ``[r D, (r+1) D)`` (``D = p / d``) and its stages
take consecutive ranks in stage order, so neighbouring stages are neighbours in the topology; a
group lies inside one node or spans whole nodes. A crossing tensor is priced on the slowest
link its replica uses (NVLink/NVSwitch inside a node; the network when the replica spans nodes),
a bound that is exact on one node. Inner searches price a group of ``g`` as the first ``g`` GPUs
of a node (exact for switch fabrics such as NVSwitch).
"""
from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import numpy as np

from cost_models.cluster import Cluster, group_cluster
from cost_models.conventions import BUS_FACTOR, bytes_per_element
from cost_models.layer_costs import COMPUTE_KINDS, CostModel
from cost_models.rates import HardwareRates
from pase.errors import PaseError
from pase.graph import LayerGraph
from pase.graph.attrs import EdgeAttrs, LayerAttrs
from pase.graph.rescale import edge_with_batch, layer_with_batch, with_batch
from pase.planning.micro_steps import plan_micro_steps
from pase.planning.per_layer import (
    PlanDoesNotFit,
    PlanOptions,
    PricedGraph,
    block_output_layers,
    edge_key,
    layer_kinds,
    new_plan,
    search_under_memory,
)
from pase.planning.plan import LayerChoice, PipelineSearchInfo, Plan, Prediction, SearchInfo, StagePlan
from pase.search import solve
from pase.search.stages import Partition, StageProblem, solve_stages
from strategies.pipeline import bubble_seconds, check_schedule
from strategies.splits import SplitSpace, divisors, split_space

MICROBATCHES = (1, 2, 4, 8, 16, 32)


@dataclass
class PipelineOptions:
    schedule: str = "1f1b"  # or "gpipe" (same step time, more memory: searched only when asked)
    microbatches: tuple[int, ...] = MICROBATCHES
    max_stages: int = 8
    max_segments: int = 32
    max_exact: int = 400  # exact stage searches before the search stops and reports its bound gap
    # Only what pase.runtime.pipeline runs (a plan is a promise): every stage on the same number of devices,
    # each stage's layers splitting only the batch over its whole group (its devices are replicas of the
    # stage), and under 1F1B at least as many microbatches as stages (torch's Schedule1F1B refuses fewer).
    # False searches unequal groups and any split inside a stage too; such plans say they cannot run.
    runnable_only: bool = True

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        if self.max_stages < 1 or self.max_segments < 1:
            raise PaseError("max_stages and max_segments must be at least 1")
        if not self.microbatches or min(self.microbatches) < 1:
            raise PaseError(f"microbatch counts must be positive integers, not {self.microbatches}")


@dataclass(frozen=True)
class Segment:
    name: str
    layers: tuple[int, ...]  # layer positions in capture order (contiguous)


# ---------------------------------------------------------------------- segments and batches

def segments(graph: LayerGraph, max_segments: int = 32) -> list[Segment]:
    """Layers grouped by module block in capture order; a block's own glue (the decoder's skip
    concat, recorded under the parent block) joins the child block it feeds, FLOP-free runs
    (inputs, embeddings' projections) join the next run, and the lightest neighbours merge until
    at most ``max_segments`` remain."""
    runs: list[tuple[str, list[int], float]] = []
    for v, (_, data) in enumerate(graph.layers()):
        work = float(data["flops_fwd"] + data["flops_bwd"])
        if runs and runs[-1][0] == data["block"]:
            runs[-1][1].append(v)
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + work)
        else:
            runs.append((data["block"], [v], work))
    merged: list[tuple[str, list[int], float]] = []
    carried: list[int] = []
    carried_work = 0.0
    for k, (block, layers, work) in enumerate(runs):
        layers, work = carried + layers, carried_work + work
        following = runs[k + 1][0] if k + 1 < len(runs) else None
        if following is not None and (work == 0 or following.startswith(block + ".") or block == "<root>"):
            carried, carried_work = layers, work
            continue
        carried, carried_work = [], 0.0
        merged.append((block, layers, work))
    items = [([b], ls, w) for b, ls, w in merged]
    while len(items) > max(1, max_segments):
        k = min(range(len(items) - 1), key=lambda k: items[k][2] + items[k + 1][2])
        items[k:k + 2] = [(items[k][0] + items[k + 1][0], items[k][1] + items[k + 1][1], items[k][2] + items[k + 1][2])]
    return [Segment(names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}", tuple(layers))
            for names, layers, _ in items]


def rebatch_layer(data: LayerAttrs, batch: int, full: int) -> LayerAttrs:
    """A layer's attributes at global batch ``batch`` instead of ``full`` (FLOPs and bytes scale)."""
    return layer_with_batch(data, Fraction(batch, full))


def rebatch_edge(edge: EdgeAttrs, producer: LayerAttrs, consumer: LayerAttrs, batch: int, full: int) -> EdgeAttrs:
    return edge_with_batch(edge, producer, consumer, Fraction(batch, full))


def rebatch(graph: LayerGraph, batch: int) -> LayerGraph:
    """The same model at another batch size, without capturing again (``pase.graph.rescale``)."""
    rescaled = with_batch(graph, batch)
    if rescaled is None:
        raise PaseError(f"cannot rescale a batch-{graph.batch} graph to batch {batch}: capture it at batch >= 2")
    return rescaled


def legal_group(offset: int, group: int, gpus_per_node: int) -> bool:
    """Inside one node, or whole nodes starting at a node boundary."""
    if group <= gpus_per_node:
        return offset // gpus_per_node == (offset + group - 1) // gpus_per_node
    return group % gpus_per_node == 0 and offset % gpus_per_node == 0


# ---------------------------------------------------------------------- pricing with repeated blocks shared

@dataclass
class LayerPrice:
    space: SplitSpace
    compute: np.ndarray
    comm: np.ndarray  # per microbatch, without the weight-gradient sync
    sync: np.ndarray  # weight-gradient sync inside the group, once per step
    state: np.ndarray  # weights, gradients, optimizer state per device
    activation: np.ndarray  # saved for backward per microbatch per device
    shard_bytes: np.ndarray  # weight-gradient bytes per device (synced across pipeline replicas)
    optimizer: np.ndarray  # the optimizer's step, once per step (not inside ``compute``)


class Pricer:
    """Prices each distinct layer shape and edge once per (group size, microbatch size)."""

    def __init__(self, graph: LayerGraph, cluster: Cluster, rates: HardwareRates, options: PlanOptions,
                 runnable_only: bool = False) -> None:
        self.graph, self.cluster, self.options = graph, cluster, options
        self.runnable_only = runnable_only  # each layer only as a stage's replicas run it: its batch split g ways
        self.layers = list(graph.layers())
        self.index = {layer_id: v for v, (layer_id, _) in enumerate(self.layers)}
        outputs = block_output_layers(graph)
        self.block_output = [layer_id in outputs for layer_id, _ in self.layers]
        self.kind = layer_kinds(graph, outputs)
        self.representative = {k: v for v, k in reversed(list(enumerate(self.kind)))}
        edge_keys: dict[str, int] = {}
        self.edges: list[tuple[int, int, int, dict[str, Any]]] = []
        for src, dst, data in graph.graph.edges(data=True):
            s, d = self.index[src], self.index[dst]
            key = edge_key(self.kind[s], self.kind[d], data)
            self.edges.append((s, d, edge_keys.setdefault(key, len(edge_keys)), data))
        self.edge_representative = {k: (s, d, data) for s, d, k, data in reversed(self.edges)}
        self.rates = rates
        self.cost_options = options.cost_options(reshard=True)
        self.full_model = CostModel(cluster, rates, self.cost_options)
        self._models: dict[int, CostModel] = {}
        self._layer_cache: dict[tuple[int, int, int], LayerPrice] = {}
        self._edge_cache: dict[tuple[int, int, int], np.ndarray] = {}
        self._rebatched: dict[tuple[int, int], LayerAttrs] = {}
        self.itemsize = bytes_per_element(options.precision)

    def model(self, group: int) -> CostModel:
        if group not in self._models:
            sub = group_cluster(self.cluster, group)
            self._models[group] = CostModel(sub, HardwareRates(sub, self.rates.profile, self.options.precision),
                                            self.cost_options)
        return self._models[group]

    def rebatched(self, v: int, batch: int) -> LayerAttrs:
        """Layer ``v``'s attributes at ``batch`` (shared by every group size)."""
        key = (v, batch)
        if key not in self._rebatched:
            self._rebatched[key] = rebatch_layer(self.layers[v][1], batch, self.graph.batch)
        return self._rebatched[key]

    def layer(self, kind: int, group: int, batch: int) -> LayerPrice:
        key = (kind, group, batch)
        if key not in self._layer_cache:
            v = self.representative[kind]
            data = self.rebatched(v, batch)
            model = self.model(group)
            space = split_space(data, group, self.options.min_chunk, self.options.only)
            runnable = True
            if self.runnable_only:
                space, runnable = _replica_space(data, space, group)
            parts: dict[str, np.ndarray] = {}
            compute, comm, memory = model.layer_costs(data, space, block_output=self.block_output[v], parts=parts)
            if not runnable:  # the batch does not split over the group: no stage of this size runs it
                compute = np.full_like(compute, np.inf)
            sync, saved, optimizer = parts["weight_sync"], parts["saved"], parts["optimizer"]
            self._layer_cache[key] = LayerPrice(space, compute - optimizer, comm - sync, sync, memory - saved, saved,
                                                parts["weight_bytes"], optimizer)
        return self._layer_cache[key]

    def edge(self, kind: int, group: int, batch: int) -> np.ndarray:
        key = (kind, group, batch)
        if key not in self._edge_cache:
            s, d, data = self.edge_representative[kind]
            full = self.graph.batch
            producer, consumer = self.rebatched(s, batch), self.rebatched(d, batch)
            self._edge_cache[key] = self.model(group).edge_costs(
                rebatch_edge(data, self.layers[s][1], self.layers[d][1], batch, full), producer,
                self.layer(self.kind[s], group, batch).space, consumer, self.layer(self.kind[d], group, batch).space)
        return self._edge_cache[key]

    def replica_sync(self, shard: np.ndarray, replicas: int, span: int) -> np.ndarray:
        """All-reduce of weight gradients across pipeline replicas (ranks ``span`` apart), once per step."""
        if replicas <= 1:
            return np.zeros_like(shard)
        return self.full_model.collective_seconds("all_reduce", shard, np.full(shard.shape, replicas),
                                                  np.full(shard.shape, span), bucketed=True)


def replica_splits(data: LayerAttrs | dict[str, Any], group: int) -> dict[str, int]:
    """The splits of a layer on a stage group of ``group`` devices that the pipeline runtime runs: the
    group's devices are replicas of the stage, so the batch splits ``group`` ways and nothing else does."""
    if group <= 1:
        return {}
    return {d: group for d, role in data["roles"].items() if role == "batch"}


def _replica_space(data: LayerAttrs, space: SplitSpace, group: int) -> tuple[SplitSpace, bool]:
    """``space`` cut to the replica configuration (``replica_splits``); (one-row space, whether it exists)."""
    wanted = replica_splits(data, group)
    k = space.index_of(wanted) if set(wanted) <= set(space.dims) else None
    if k is None:
        return SplitSpace(space.dims, np.ones((1, len(space.dims)), dtype=np.int64)), False
    return SplitSpace(space.dims, space.factors[k:k + 1]), True


# ---------------------------------------------------------------------- one (d, m) setting

@dataclass
class StageEval:
    seconds: float  # per microbatch, crossing tensors included
    memory: float  # per device at the schedule's peak
    assignment: list[int]
    compute: float
    communication: float  # collectives, re-layouts, crossing tensors, amortised gradient sync


class Setting:
    """Stage costs for one data-parallel degree ``d`` and microbatch count ``m``."""

    def __init__(self, planner: PipelineSearch, replicas: int, microbatches: int) -> None:
        self.p = planner
        pr = planner.pricer
        self.d, self.m = replicas, microbatches
        self.devices = planner.cluster.world_size // replicas
        self.batch = pr.graph.batch // (replicas * microbatches)
        gpn = planner.cluster.gpus_per_node
        runnable = planner.pipeline.runnable_only
        # under 1F1B torch's schedule needs a microbatch per stage at least; the wider space ignores that
        self.max_stages = planner.pipeline.max_stages
        if runnable and planner.pipeline.schedule == "1f1b":
            self.max_stages = min(self.max_stages, microbatches)
        smallest = self.devices // (2 * planner.pipeline.max_stages)
        self.sizes = tuple(g for g in divisors(self.devices) if (g <= gpn or g % gpn == 0) and g >= smallest)
        if runnable:  # equal groups: D / g stages, each group's replicas splitting the microbatch
            self.sizes = tuple(g for g in self.sizes if self.devices // g <= self.max_stages and self.batch % g == 0)
        self.levels = 1 if planner.pipeline.schedule == "gpipe" else max(1, min(microbatches,
                                                                                 planner.pipeline.max_stages))
        self.placement = np.array([[legal_group(o, g, gpn) and o + g <= self.devices for g in self.sizes]
                                   for o in range(self.devices + 1)])
        self._vertex: dict[tuple[int, int], np.ndarray] = {}
        self._memory: np.ndarray | None = None
        self.min_stages = 1
        self.exact: dict[tuple[int, int, int, int], StageEval] = {}
        self.bound_level = 0
        self.costs: np.ndarray | None = None
        self.partition: Partition | None = None
        link = planner.link(self.devices)
        scale = self.batch / pr.graph.batch
        crossing = planner.crossing
        self.crossing_seconds = ((crossing.in_count + crossing.out_count) * link[1]
                                 + (crossing.in_bytes + crossing.out_bytes) * scale / link[0])
        self.received_bytes = crossing.in_bytes * scale  # per microbatch, split over the group

    def held(self, level: int) -> int:
        return self.m if self.p.pipeline.schedule == "gpipe" else level + 1

    def objective(self, kind: int, group: int) -> LayerPrice:
        return self.p.pricer.layer(kind, group, self.batch)

    def vertex(self, kind: int, group: int) -> np.ndarray:
        key = (kind, group)
        if key not in self._vertex:
            price = self.objective(kind, group)
            sync = price.sync + self.p.pricer.replica_sync(price.shard_bytes, self.d, self.devices)
            self._vertex[key] = price.compute + price.comm + (sync + price.optimizer) / self.m
        return self._vertex[key]

    def compute_vector(self, kind: int, group: int) -> np.ndarray:
        """Per microbatch: the layer's compute and its share of the optimizer's once-per-step update."""
        price = self.objective(kind, group)
        return price.compute + price.optimizer / self.m

    def comm_vector(self, kind: int, group: int) -> np.ndarray:
        return self.vertex(kind, group) - self.compute_vector(kind, group)

    # ------------------------------------------------------------------ bounds
    def _by_segment(self, per_layer: np.ndarray) -> np.ndarray:
        """(n + 1, ...) prefix sums over segments of a per-layer array (layers in capture order)."""
        prefix = np.concatenate([np.zeros((1, *per_layer.shape[1:])), np.cumsum(per_layer, axis=0)])
        return prefix[self.p.bounds]

    def _per_kind(self, group: int, value: Callable[[int], np.ndarray | float]) -> np.ndarray:
        """A per-layer array from a function of the layer's kind (repeated shapes computed once)."""
        kinds = self.p.pricer.kind
        table = {k: value(k) for k in set(kinds)}
        return np.array([table[k] for k in kinds], dtype=np.float64)

    def _least_memory(self) -> np.ndarray:
        """(n, n + 1, G, K) least memory per device of every stage (memory is a sum over layers)."""
        n = len(self.p.segments)
        held = np.array([self.held(level) for level in range(self.levels)], dtype=np.float64)
        out = np.full((n, n + 1, len(self.sizes), self.levels), np.inf)
        for gi, g in enumerate(self.sizes):
            def least(kind: int, g: int = g) -> np.ndarray:
                price = self.objective(kind, g)
                return (price.state[:, None] + held[None, :] * price.activation[:, None]).min(axis=0)
            prefix = self._by_segment(self._per_kind(g, least))  # (n + 1, K)
            out[:, :, gi, :] = (prefix[None, :, :] - prefix[:-1, None, :]
                                + held[None, None, :] * self.received_bytes[:, :, None] / g)
        return out

    def bound(self, level: int) -> np.ndarray:
        """Stage cost lower bounds. Level 0: FLOPs and bytes at the achieved rates split over the whole
        group, or the eager host's dispatch where that is longer (no pricing); 1: each layer's cheapest
        configuration; 2: each segment's exact optimum (only re-layouts between segments left out). Memory is
        checked from level 1 on."""
        n = len(self.p.segments)
        scale = self.batch / self.p.graph.batch
        costs = np.full((n, n + 1, len(self.sizes), self.levels), np.inf)
        for gi, g in enumerate(self.sizes):
            if self.min_stages >= 2 and g > self.devices - min(self.sizes):
                continue  # no room left for a second stage: a group this large is never used
            if self.p.pipeline.runnable_only and self.devices // g < self.min_stages:
                continue  # equal groups of g make too few stages
            if level == 0:
                per_layer = np.maximum(self.p.ideal_seconds * scale / g, self.p.host_seconds)
            elif level == 1:
                def cheapest(kind: int, g: int = g) -> float:
                    return float(self.vertex(kind, g).min())
                per_layer = self._per_kind(g, cheapest)
            if level < 2:
                prefix = self._by_segment(per_layer)
            else:
                prefix = np.concatenate([[0.0], np.cumsum([self.p.segment_optimum(self, seg, g)
                                                           for seg in self.p.segments])])
            costs[:, :, gi, :] = (prefix[None, :] - prefix[:-1, None] + self.crossing_seconds)[:, :, None]
        upper = np.triu(np.ones((n, n + 1), dtype=bool), 1)
        if self.p.pipeline.runnable_only:  # a tensor may cross one stage boundary only (torch's pipelining)
            upper &= np.arange(n + 1)[None, :] > self.p.reach[:, None]
        upper = upper[:, :, None, None]
        fits: np.ndarray | bool = True
        if level >= 1:
            if self._memory is None:
                self._memory = self._least_memory()
            fits = self._memory <= self.p.limit
        self.bound_level = level
        self.costs = np.where(upper & fits, costs, np.inf)
        for (i, j, gi, level_), result in self.exact.items():
            self.costs[i, j, gi, level_] = result.seconds
        return self.costs

    def solve(self, incumbent: float = np.inf) -> Partition | None:
        assert self.costs is not None
        problem = StageProblem(self.costs, group_sizes=self.sizes, devices=self.devices, microbatches=self.m,
                               schedule=self.p.pipeline.schedule, max_stages=self.max_stages,
                               placement=self.placement, min_stages=self.min_stages,
                               equal_groups=self.p.pipeline.runnable_only)
        self.partition = solve_stages(problem, incumbent)
        return self.partition

    def unpriced(self) -> list[tuple[int, int, int, int]]:
        """Stages of the current partition still priced by a bound."""
        assert self.partition is not None
        keys = [(s.start, s.stop, self.sizes.index(s.group), self.in_flight_level(s.in_flight))
                for s in self.partition.stages]
        return [k for k in keys if k not in self.exact]

    def in_flight_level(self, held: int) -> int:
        """The index of a stage's in-flight microbatch count in the cost table (GPipe keeps one level)."""
        return 0 if self.p.pipeline.schedule == "gpipe" else held - 1

    def price_exactly(self, key: tuple[int, int, int, int]) -> None:
        i, j, gi, level = key
        self.exact[key] = self.p.stage_exact(self, i, j, self.sizes[gi], self.held(level))
        assert self.costs is not None
        self.costs[key] = self.exact[key].seconds


def ideal_seconds(pricer: Pricer, rates: HardwareRates) -> np.ndarray:
    """Per layer, at the full batch on one device: FLOPs at the achieved compute rate plus pointwise
    bytes at memory bandwidth (and the recomputed forward under checkpointing). Divided by a group
    size, a lower bound on the layer's time in any configuration on that group (layer_costs never
    charges less: it splits work over at most the group, and adds rooflines and collectives)."""
    memory_rate = {kind: rates.memory(kind).value for kind in {data["op"] for _, data in pricer.layers}}
    out = np.zeros(len(pricer.layers))
    for v, (_, data) in enumerate(pricer.layers):
        kind = data["op"]
        seconds = float(data.get("pointwise_elems", 0)) * pricer.itemsize * 4 / memory_rate[kind]
        if kind in COMPUTE_KINDS and data["flops_fwd"] + data["flops_bwd"] > 0:
            rate = rates.compute(kind).value
            seconds += (data["flops_fwd"] + data["flops_bwd"]) / rate
            if pricer.options.checkpointing and not pricer.block_output[v]:
                seconds += data["flops_fwd"] / rate
        out[v] = seconds
    return out


def host_seconds(pricer: Pricer) -> np.ndarray:
    """Per layer, per microbatch: the eager host's dispatch of its operators (forward, backward, and the forward
    again under checkpointing), which no configuration, group or batch shortens (``cost_models.kernels``): with
    ``ideal_seconds`` over a group, a lower bound on the layer's time that holds where the host binds."""
    model = pricer.full_model
    if model.kernels is None or model.kernels.host_s <= 0:
        return np.zeros(len(pricer.layers))
    out = np.zeros(len(pricer.layers))
    for v, (_, data) in enumerate(pricer.layers):
        ops = model.host_ops(data)
        if pricer.options.checkpointing and not pricer.block_output[v] and data["op"] in COMPUTE_KINDS:
            ops += model.host_ops(data, training=False)
        out[v] = ops * model.kernels.host_s
    return out


@dataclass
class Crossing:
    """Tensors crossing stage boundaries, for every stage [i, j) of segments: (n, n + 1) arrays."""

    in_bytes: np.ndarray
    in_count: np.ndarray
    out_bytes: np.ndarray
    out_count: np.ndarray


def skip_reach(graph: LayerGraph, segment_of: list[int], n: int) -> np.ndarray:
    """Per segment i, the last segment that reads a tensor made before segment i (-1: none). A stage that
    starts at i must run through that segment: torch.distributed.pipelining sends a stage's outputs to the
    next stage only ("backward of skip connections not supported"), so no tensor may cross two stage
    boundaries. Model inputs count as made in the first segment: torch feeds them to stage 0 only, and the
    runtime copies a text-conditioned UNet's conditioning there to send it on (``pase.runtime.pipeline``).
    O(edges + n)."""
    index = {layer_id: v for v, (layer_id, _) in enumerate(graph.layers())}
    last_reader = np.full(n, -1)  # per producing segment, its tensors' last reading segment
    for src, dst, _ in graph.graph.edges(data=True):
        a = 0 if graph[src]["op"] == "input" else segment_of[index[src]]
        c = segment_of[index[dst]]
        last_reader[a] = max(last_reader[a], c)
    reach = np.full(n, -1)
    for i in range(1, n):
        reach[i] = max(reach[i - 1], last_reader[i - 1])
    return reach


def crossing_tensors(graph: LayerGraph, segment_of: list[int], n: int) -> Crossing:
    """Each (producer, tensor) is sent once to every later stage that reads it (its consumer pays,
    forward) and its gradient, if it has one, comes back once (the producer pays, backward). Model inputs
    count as made in the first segment (``skip_reach``): a text-conditioned UNet's text embeddings are sent on
    to the stages whose cross-attention reads them, without a gradient."""
    index = {layer_id: v for v, (layer_id, _) in enumerate(graph.layers())}
    readers: dict[tuple[str, str], tuple[int, set[int], float, bool]] = {}
    for src, dst, data in graph.graph.edges(data=True):
        a = 0 if graph[src]["op"] == "input" else segment_of[index[src]]
        c = segment_of[index[dst]]
        if c == a:
            continue
        key = (src, str(data.get("tensor", data.get("slot"))))
        seg, consumers, size, grad = readers.get(key, (a, set(), 0.0, False))
        consumers.add(c)
        readers[key] = (seg, consumers, max(size, float(data["bytes"])), grad or data.get("requires_grad", True))
    shape = (n, n + 1)
    crossing = Crossing(np.zeros(shape), np.zeros(shape), np.zeros(shape), np.zeros(shape))
    for a, consumers, size, grad in readers.values():
        ordered = sorted(consumers)
        last = ordered[-1]
        if grad:
            crossing.out_bytes[:a + 1, a + 1:last + 1] += size
            crossing.out_count[:a + 1, a + 1:last + 1] += 1
        k = 0
        for i in range(a + 1, last + 1):
            while ordered[k] < i:
                k += 1
            crossing.in_bytes[i, ordered[k] + 1:] += size
            crossing.in_count[i, ordered[k] + 1:] += 1
    return crossing


# ---------------------------------------------------------------------- the search

@dataclass
class PipelineResult:
    setting: Setting
    partition: Partition
    stages: list[StageEval]

    @property
    def step_seconds(self) -> float:
        return self.partition.value


@dataclass
class SearchReport:
    seconds: float = 0.0
    settings: int = 0
    screened_out: int = 0
    segment_searches: int = 0
    exact_stage_searches: int = 0
    gap: float = 0.0  # relative gap to the best remaining bound when max_exact stopped the search
    notes: list[str] = field(default_factory=list)


class PipelineSearch:
    def __init__(self, graph: LayerGraph, cluster: Cluster, rates: HardwareRates, options: PlanOptions,
                 pipeline: PipelineOptions) -> None:
        self.graph, self.cluster, self.plan_options, self.pipeline = graph, cluster, options, pipeline
        self.pricer = Pricer(graph, cluster, rates, options, runnable_only=pipeline.runnable_only)
        self.segments = segments(graph, pipeline.max_segments)
        self.segment_of = [0] * len(graph)
        for k, seg in enumerate(self.segments):
            for v in seg.layers:
                self.segment_of[v] = k
        self.crossing = crossing_tensors(graph, self.segment_of, len(self.segments))
        self.reach = skip_reach(graph, self.segment_of, len(self.segments))
        self.bounds = np.array([seg.layers[0] for seg in self.segments] + [len(graph)])
        self.ideal_seconds = ideal_seconds(self.pricer, rates)
        self.host_seconds = host_seconds(self.pricer)
        self.limit = cluster.gpu.memory_bytes * options.memory_fraction
        self._segment_cache: dict[tuple[Any, ...], float] = {}
        self._segment_keys = {seg: self._segment_key(seg) for seg in self.segments}
        self.report = SearchReport()

    def link(self, devices: int) -> tuple[float, float]:
        """(bytes/s, latency s) of the slowest link between stages of a replica of ``devices`` ranks."""
        cluster = self.cluster
        if devices <= 1:
            return float("inf"), 0.0
        if devices <= cluster.gpus_per_node:
            paths = [cluster.path(a, b) for a in range(devices) for b in range(devices) if a != b]
        else:
            paths = [cluster.path(0, cluster.gpus_per_node)]
        slowest = min(paths, key=lambda path: path.effective_gbps)
        return slowest.effective_gbps * 1e9, slowest.latency_us / 1e6

    def _segment_key(self, seg: Segment) -> tuple[Any, ...]:
        members = set(seg.layers)
        first = seg.layers[0]
        inner = tuple((s - first, d - first, k) for s, d, k, _ in self.pricer.edges if s in members and d in members)
        return tuple(self.pricer.kind[v] for v in seg.layers), inner

    def _stage_graph(self, setting: Setting, layers: range, group: int, held: int) -> PricedGraph:
        pricer = self.pricer
        members = set(layers)
        first = layers[0]
        ids, spaces, compute, comm, memory = [], [], [], [], []
        for v in layers:
            kind = pricer.kind[v]
            price = setting.objective(kind, group)
            ids.append(pricer.layers[v][0])
            spaces.append(price.space)
            compute.append(setting.compute_vector(kind, group))
            comm.append(setting.comm_vector(kind, group))
            memory.append(price.state + held * price.activation)
        edges = [(s - first, d - first, pricer.edge(k, group, setting.batch))
                 for s, d, k, _ in pricer.edges if s in members and d in members]
        return PricedGraph(ids, spaces, compute, comm, memory, edges)

    def segment_optimum(self, setting: Setting, seg: Segment, group: int) -> float:
        """The segment's exact optimum per microbatch on its own (a repeated block is searched once)."""
        key = (self._segment_keys[seg], group, setting.batch, setting.d, setting.m)
        if key not in self._segment_cache:
            layers = range(seg.layers[0], seg.layers[-1] + 1)
            priced = self._stage_graph(setting, layers, group, 1)
            if len(layers) == 1:
                value = float((priced.compute[0] + priced.comm[0]).min())
            else:
                graph = priced.cost_graph(0.0, "segment", group)
                value = solve(graph, dtype=np.float64).optimum
            self.report.segment_searches += 1
            self._segment_cache[key] = value
        return self._segment_cache[key]

    def stage_exact(self, setting: Setting, i: int, j: int, group: int, held: int) -> StageEval:
        """The exact per-layer search on segments [i, j) on ``group`` devices with ``held`` microbatches in flight."""
        self.report.exact_stage_searches += 1
        layers = range(self.segments[i].layers[0], self.segments[j - 1].layers[-1] + 1)
        priced = self._stage_graph(setting, layers, group, held)
        received = held * float(setting.received_bytes[i, j]) / group
        crossing = float(setting.crossing_seconds[i, j])
        try:
            assignment, *_ = search_under_memory(priced, self.limit - received, group_cluster(self.cluster, group),
                                               self.plan_options)
        except PlanDoesNotFit:
            return StageEval(float("inf"), float("inf"), [], 0.0, 0.0)
        compute, comm, relayout, memory = priced.totals(assignment)
        return StageEval(compute + comm + relayout + crossing, memory + received, assignment, compute,
                         comm + relayout + crossing)

    def settings(self, replicas: list[int]) -> list[Setting]:
        p, batch = self.cluster.world_size, self.graph.batch
        gpn = self.cluster.gpus_per_node
        out = []
        for d in replicas:
            devices = p // d
            if p % d or (devices % gpn and gpn % devices):
                continue
            for m in self.pipeline.microbatches:
                if batch % (d * m) == 0:
                    setting = Setting(self, d, m)
                    if setting.sizes:  # (the runnable space may leave no group size)
                        out.append(setting)
        return out

    def search(self, replicas: list[int], incumbent: float = float("inf"), min_stages: int = 2
               ) -> PipelineResult | None:
        """Branch and bound over (d, m) settings; exact over the space when it finishes."""
        started = time.perf_counter()
        candidates = self.settings(replicas)
        self.report.settings += len(candidates)
        heap: list[tuple[float, int, Setting]] = []
        for k, setting in enumerate(candidates):
            setting.min_stages = min_stages
            setting.bound(0)
            found = setting.solve(incumbent)
            if found is not None:
                heapq.heappush(heap, (found.value, k, setting))
        best: PipelineResult | None = None
        best_value = incumbent
        while heap:
            value, k, setting = heapq.heappop(heap)
            if value >= best_value:
                self.report.screened_out += 1 + len(heap)
                heap = []
                break
            if self.report.exact_stage_searches >= self.pipeline.max_exact:
                self.report.gap = max(self.report.gap, (best_value - value) / best_value if best else 1.0)
                self.report.notes.append(f"stopped after {self.pipeline.max_exact} exact stage searches")
                break
            if setting.bound_level < 2:
                setting.bound(setting.bound_level + 1)
            else:
                for key in setting.unpriced():
                    setting.price_exactly(key)
            found = setting.solve(best_value)
            if found is None:
                continue
            if not setting.unpriced():
                if found.value < best_value:
                    best_value = found.value
                    best = PipelineResult(setting, found, [setting.exact[self._key(setting, s)] for s in found.stages])
                continue
            heapq.heappush(heap, (found.value, k, setting))
        self.report.seconds += time.perf_counter() - started
        return best

    @staticmethod
    def _key(setting: Setting, s: Any) -> tuple[int, int, int, int]:
        return s.start, s.stop, setting.sizes.index(s.group), setting.in_flight_level(s.in_flight)


# ---------------------------------------------------------------------- plans

def pipeline_prediction(result: PipelineResult) -> Prediction:
    """Step time, with the bottleneck stage's compute, communication and idle (bubble) time."""
    m = result.setting.m
    times = [s.seconds for s in result.stages]
    worst = max(range(len(times)), key=times.__getitem__)
    step = result.partition.value
    bottleneck = result.stages[worst]
    return Prediction(step_seconds=step, samples_per_second=result.setting.p.graph.batch / step if step else 0.0,
                      memory_bytes_per_device=max(s.memory for s in result.stages),
                      compute_seconds=m * bottleneck.compute, communication_seconds=m * bottleneck.communication,
                      bubble_seconds=bubble_seconds(times, m), comm_bytes_per_device=pipeline_comm_bytes(result))


def pipeline_comm_bytes(result: PipelineResult) -> float:
    """Bytes the busiest rank's collectives move per step, as the pipeline runtime issues them: each
    microbatch's stage outputs sent forward and the gradients of its inputs sent back (its share of the
    stage group's microbatch), and one all-reduce of the stage's weight gradients over every rank running
    the stage (the replicas of its group and of the pipeline)."""
    setting = result.setting
    search = setting.p
    crossing, scale = search.crossing, setting.batch / search.graph.batch
    itemsize = bytes_per_element(search.plan_options.precision)
    busiest = 0.0
    for stage in result.partition.stages:
        sent = setting.m * (crossing.out_bytes[stage.start, stage.stop] + crossing.in_bytes[stage.start, stage.stop])
        layers = range(search.segments[stage.start].layers[0], search.segments[stage.stop - 1].layers[-1] + 1)
        weights = sum(p["numel"] for v in layers for p in search.pricer.layers[v][1]["params"].values()
                      if p.get("trainable") and "numel" in p) * itemsize
        ranks = setting.d * stage.group
        sync = weights * BUS_FACTOR["all_reduce"](ranks) if ranks > 1 else 0.0
        busiest = max(busiest, float(sent) * scale / stage.group + sync)
    return busiest


def stage_plans(search: PipelineSearch, result: PipelineResult) -> tuple[list[StagePlan], list[LayerChoice]]:
    setting = result.setting
    pricer = search.pricer
    stages, layers = [], []
    for choice, evaluated in zip(result.partition.stages, result.stages):
        span = range(search.segments[choice.start].layers[0], search.segments[choice.stop - 1].layers[-1] + 1)
        ranks = [r * setting.devices + choice.offset + k for r in range(setting.d) for k in range(choice.group)]
        stages.append(StagePlan(layers=[pricer.layers[v][0] for v in span], devices=ranks, seconds=evaluated.seconds,
                                memory_bytes=evaluated.memory,
                                blocks=[search.segments[k].name for k in range(choice.start, choice.stop)],
                                in_flight=choice.in_flight))
        for v, k in zip(span, evaluated.assignment):
            layer_id, data = pricer.layers[v]
            price = setting.objective(pricer.kind[v], choice.group)
            per_step = setting.m * float(setting.vertex(pricer.kind[v], choice.group)[k])
            layers.append(LayerChoice(layer_id, data["op"], data["block"], price.space.config(k), per_step,
                                      float(price.state[k] + choice.in_flight * price.activation[k])))
    return stages, layers


def _pipeline_only_plan(graph: LayerGraph, cluster: Cluster, options: PlanOptions, rates: HardwareRates,
                        unfit: str) -> Plan:
    """The frame of a plan when no per-layer plan fits (every number comes from the pipeline)."""
    notes = {"no pipeline": unfit, "ddp": "the per-layer plan does not fit, so neither do DDP or FSDP",
             "fsdp": "the per-layer plan does not fit, so neither do DDP or FSDP"}
    return new_plan(graph, cluster, options, rates, layers=[], predicted=Prediction(float("inf"), 0.0, 0.0),
                    baselines={"ddp": None, "fsdp": None}, baseline_notes=notes, search=SearchInfo())


def plan_with_pipeline(graph: LayerGraph, cluster: Cluster, *, profile: dict[str, Any] | None = None,
                       options: PlanOptions | None = None, pipeline: PipelineOptions | None = None,
                       progress: Callable[[str], None] | None = None, micro_steps: int | None = None
                       ) -> tuple[Plan, PricedGraph | None]:
    """The per-layer plan (with its micro-steps, ``pase.planning.micro_steps``), the best pure pipeline (one
    replica) and the best PP x DP plan (one step: its microbatches accumulate): the fastest wins.

    The returned plan's baselines gain "no pipeline" (the per-layer plan), "pure pipeline" and "pipeline" (the
    best pipeline of either kind); its ``search.pipeline`` says how the stage search went.
    """
    options = options or PlanOptions()
    pipeline = pipeline or PipelineOptions()
    try:
        plain, priced = plan_micro_steps(graph, cluster, profile=profile, options=options, micro_steps=micro_steps,
                                         progress=progress)
    except PlanDoesNotFit as exc:  # stages hold fewer weights per device: a pipeline may still fit
        plain, priced, unfit = None, None, str(exc)
    if progress:
        progress("searching pipeline stages")
    rates = HardwareRates(cluster, profile, options.precision)
    search = PipelineSearch(graph, cluster, rates, options, pipeline)
    p = cluster.world_size
    pure = search.search([1]) if p > 1 else None
    forced = options.only == "pipeline"  # a pipeline even where the per-layer plan is faster
    incumbent = min(plain.predicted.step_seconds if plain and not forced else float("inf"),
                    pure.step_seconds if pure else float("inf"))
    hybrid = search.search([d for d in divisors(p) if 1 < d < p], incumbent=incumbent)
    best = min((r for r in (pure, hybrid) if r is not None), key=lambda r: r.step_seconds, default=None)
    kind = "runnable pipeline" if pipeline.runnable_only else "pipeline"
    if plain is None:
        if best is None:
            raise PlanDoesNotFit(f"{unfit} No {kind} of two or more stages fits either.")
        plain = _pipeline_only_plan(graph, cluster, options, rates, unfit)
    baselines = {"no pipeline": plain.predicted if plain.layers else None,
                 "pure pipeline": pipeline_prediction(pure) if pure else None, **plain.baselines,
                 "pipeline": pipeline_prediction(best) if best else None}
    notes = {name: note for name, note in plain.baseline_notes.items() if name != "pipeline"}
    if pure is None:
        notes["pure pipeline"] = ("one device: nothing to pipeline" if p == 1 else
                                  f"no {kind} of two or more stages fits memory")
    if best is None:
        notes["pipeline"] = notes["pure pipeline"]
    report = search.report
    search_info = PipelineSearchInfo(
        seconds=round(report.seconds, 3), settings=report.settings, screened_out=report.screened_out,
        segments=len(search.segments), segment_searches=report.segment_searches,
        exact_stage_searches=report.exact_stage_searches, gap=report.gap, notes=report.notes,
        schedule=pipeline.schedule, max_stages=pipeline.max_stages, runnable_only=pipeline.runnable_only)
    plan = replace(plain, baselines=baselines, baseline_notes=notes,
                   search=replace(plain.search, pipeline=search_info))
    if forced and best is None:
        if p == 1:
            raise PlanDoesNotFit("no pipeline plan: one device, nothing to pipeline")
        raise PlanDoesNotFit(f"no {kind} plan: no pipeline of two or more stages over {p} devices "
                             + (f"that the runtime runs ({RUNNABLE}) " if pipeline.runnable_only else "") + "fits")
    if best is None or (not forced and plan.layers and best.step_seconds >= plain.predicted.step_seconds):
        return plan, priced
    stages, layers = stage_plans(search, best)
    # the stages run the whole batch's graph in one step, with the options as given (the per-layer plan's own
    # micro-steps, sharding and checkpointing were chosen for it alone)
    plan = new_plan(graph, cluster, options, rates, layers=layers, predicted=pipeline_prediction(best),
                    baselines=plan.baselines, baseline_notes=plan.baseline_notes, search=plan.search, stages=stages,
                    microbatches=best.setting.m, schedule=pipeline.schedule, pipeline_replicas=best.setting.d)
    problem = pipeline_problem(plan, graph)
    if problem is not None and pipeline.runnable_only:
        raise AssertionError(f"the runnable pipeline search emitted a plan the runtime refuses: {problem}")
    search_info.unrunnable = problem
    if problem is not None:  # the stages cannot run as planned, so none of their layers does
        plan.layers = [replace(layer, runnable=False) for layer in plan.layers]
    return plan, priced


RUNNABLE = ("every stage on the same number of devices, each splitting only the batch over them, and under 1F1B "
            "at least as many microbatches as stages")


def _skipped_stage(plan: Plan, graph: LayerGraph) -> str | None:
    """A tensor that a stage makes and a stage two or more later reads (a UNet's skip connections across a
    middle stage): torch.distributed.pipelining cannot send it there."""
    stage_of = {layer_id: k for k, stage in enumerate(plan.stages) for layer_id in stage.layers}
    for src, dst in graph.graph.edges():
        if graph[src]["op"] == "input" or src not in stage_of or dst not in stage_of:
            continue
        if stage_of[dst] - stage_of[src] > 1:
            return (f"pipeline stage {stage_of[dst]} reads the output of layer {src} from stage {stage_of[src]}: "
                    "torch.distributed.pipelining sends a stage's outputs to the next stage only, so no tensor may "
                    "skip a stage (a UNet's skip connections allow at most 2 stages)")
    return None


def pipeline_problem(plan: Plan, graph: LayerGraph | None) -> str | None:
    """Why ``pase.runtime.pipeline`` cannot run ``plan``'s stages as planned, in one line naming the stage;
    None when it can. ``graph`` (the model's LayerGraph) gives the layers' roles; it is needed only when a
    stage runs on more devices than the plan has pipeline replicas. The runtime refuses with this message;
    the planner labels plans from the wider space (``PipelineOptions.runnable_only=False``) with it."""
    stages, replicas = plan.stages, plan.pipeline_replicas
    if not stages:
        return "the plan has no pipeline stages"
    widths = [len(stage.devices) for stage in stages]
    for k, width in enumerate(widths):
        if width != widths[0]:
            return (f"pipeline stage {k} runs on {width} devices and stage 0 on {widths[0]}: the pipeline runtime "
                    "runs every stage on the same number of devices")
    if replicas < 1 or widths[0] % replicas:
        return (f"pipeline stage 0 runs on {widths[0]} devices, not a multiple of the plan's {replicas} pipeline "
                "replica(s)")
    placed = sorted(rank for stage in stages for rank in stage.devices)
    if placed != list(range(plan.devices)):
        return f"the plan's stages are placed on ranks {placed}, not once on each of ranks 0..{plan.devices - 1}"
    for k in range(1, len(stages)):
        for j, (before, rank) in enumerate(zip(stages[k - 1].devices, stages[k].devices)):
            if rank < before:
                return (f"pipeline stage {k} of replica {j} runs on rank {rank}, below stage {k - 1}'s rank {before}: "
                        "the pipeline runtime needs a replica's stages in increasing rank order")
    if (plan.schedule or "1f1b") == "1f1b" and plan.microbatches < len(stages):
        short = (f"stage {plan.microbatches}" if plan.microbatches == len(stages) - 1 else
                 f"stages {plan.microbatches}-{len(stages) - 1}")
        return (f"pipeline {short} cannot run: the plan's 1F1B schedule runs {plan.microbatches} microbatch(es) "
                f"through {len(stages)} stages, and torch's Schedule1F1B needs at least as many microbatches as "
                "stages")
    if graph is not None and (skipped := _skipped_stage(plan, graph)):
        return skipped
    group = widths[0] // replicas
    choices = {layer.id: layer for layer in plan.layers}
    if group == 1:  # one device per stage and replica: no layer splits anything (no roles needed to tell)
        for k, stage in enumerate(stages):
            split = next((choices[i] for i in stage.layers if i in choices
                          and any(f > 1 for f in choices[i].splits.values())), None)
            if split is not None:
                return (f"pipeline stage {k} runs on one device per replica but plans layer {split.id} as "
                        f"{' '.join(f'{d}={f}' for d, f in sorted(split.splits.items()) if f > 1)}; the pipeline "
                        "runtime runs each stage's layers whole on its device")
        return None
    if graph is None:
        raise PaseError("the plan's stages run on groups of devices: pass the model's LayerGraph (graph=) so pase can "
                        "check they split only the batch")
    for k, stage in enumerate(stages):
        for layer_id in stage.layers:
            choice = choices.get(layer_id)
            if choice is None or layer_id not in graph.graph:
                return f"pipeline stage {k} names layer {layer_id}, which the plan or the model lacks"
            planned = {d: f for d, f in choice.splits.items() if f > 1}
            wanted = replica_splits(graph[layer_id], group)
            if planned != wanted:
                shown = " ".join(f"{d}={f}" for d, f in sorted(planned.items())) or "no split"
                return (f"pipeline stage {k} runs on groups of {group} devices and plans layer {layer_id} as "
                        f"{shown} on them; the pipeline runtime runs a stage's devices as data-parallel replicas, "
                        f"so every layer splits only its batch, {group} ways")
    return None


__all__ = ["PipelineOptions", "PipelineSearch", "RUNNABLE", "Segment", "crossing_tensors", "pipeline_problem",
           "plan_with_pipeline", "rebatch", "replica_splits", "segments"]
