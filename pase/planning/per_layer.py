"""The per-layer planner: LayerGraph + Cluster -> cost graph -> exact search -> Plan (with DDP/FSDP baselines).

Per layer, every configuration of its split space is priced by ``cost_models.layer_costs``;
per edge, every configuration pair's re-layout. The exact min-sum search minimises the step
time. The per-device memory limit is enforced by Lagrangian relaxation: memory enters the
vertex costs with a price per byte, raised fourfold until the optimum fits and then moved to the
dual's kinks (see ``search_under_memory``); a plan that cannot fit even at minimum memory is
reported with what would help.
"""
from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cost_models.cluster import Cluster
from cost_models.layer_costs import STACKS, CostModel, CostOptions
from cost_models.rates import HardwareRates
from pase.errors import PaseError
from pase.graph import LayerGraph
from pase.graph.attrs import EdgeAttrs, LayerAttrs
from pase.models.folders import looks_like_folder
from pase.models.zoo import ZOO
from pase.planning.plan import BlockChoice, LayerChoice, Plan, Prediction, SearchInfo
from pase.search import CostGraph, solve
from pase.search.elimination import SearchStats, Solution, TableBudgetExceeded
from strategies.checkpointing import planned_blocks, recomputed_layers, rerun_layers
from strategies.runnable import (
    KEPT_RULE,
    SPACES,
    TENSOR_RUNS,
    edge_modes,
    interface_config,
    output_space,
    restrict,
    runnable_mask,
    runnable_reason,
    space_runs,
)
from strategies.sharding import layer_sharding, planned_sharding, uniform_sharding
from strategies.splits import SplitSpace, split_space


class PlanDoesNotFit(PaseError):
    """No configuration of the model fits the devices' memory."""

    def __init__(self, message: str, least_bytes: float = 0.0, limit_bytes: float = 0.0) -> None:
        super().__init__(message)
        self.least_bytes = least_bytes  # what the leanest plan needs per device
        self.limit_bytes = limit_bytes
        self.priced: PricedGraph | None = None  # the graph as priced for the search that did not fit


# --only: dp (the batch split over every device: DDP), fsdp (the same, sharded weights), tensor (every layer
# that can split its channels or heads does, the batch split over the other devices), pipeline (pipeline
# stages; see pase.planning.pipeline)
ONLY_KINDS = ("dp", "fsdp", "tensor", "pipeline")


@dataclass
class PlanOptions:
    precision: str = "bf16"
    memory_fraction: float = 0.9
    only: str | None = None  # one kind of parallelism: see ONLY_KINDS
    fsdp: bool = False
    reshard: bool = True  # with fsdp: False keeps gathered weights through the backward (ZeRO-2, "gradients")
    checkpointing: bool = False
    min_chunk: dict[str, int] | None = None  # per role; None: strategies.splits.MIN_CHUNK
    search_gap: float = 5e-3  # relative distance from the optimum the search may stop at (0: exact, slower)
    memory_price_steps: int = 8  # at most this many memory-price refinements when the limit binds (one search each)
    baselines: bool = True  # price DDP and FSDP beside the plan (reports that compare clusters skip them)
    # "runnable": only configurations the runtime runs as planned (strategies.runnable); "all": every split
    # PaSE can price, for what-if questions (such plans say which layers the runtime would refuse)
    space: str = "runnable"
    force: dict[str, dict[str, int]] | None = None  # layer-id glob -> the splits its layers must take
    micro_steps: int = 1  # the micro-steps a step of this graph's batch is one of (pase.planning.micro_steps)
    # with checkpointing: the blocks checkpointed (a selection of strategies.checkpointing.checkpointed_blocks,
    # chosen per block by pase.planning.selective); None: every one
    checkpoint_blocks: tuple[str, ...] | None = None
    # with fsdp: per block with weights, "none", "gradients" (ZeRO-2) or "full" (FSDP) (strategies.sharding; chosen
    # per block by pase.planning.selective.select_sharding); None: every block as fsdp and reshard say
    block_sharding: dict[str, str] | None = None
    # how the step's kernels reach the GPU (cost_models.layer_costs.STACKS): "eager", as pase's runtime runs them,
    # or "graphed" (CUDA graphs over the whole step) only to price published runs that captured them
    stack: str = "eager"
    grad_clip: bool = True  # the step clips gradients by their global norm, as pase train does by default
    ema: bool = False  # the step updates a moving average of the weights (pase train --ema)

    def cost_options(self, **changes: Any) -> CostOptions:
        """The cost model's options for pricing under these (``changes`` override: a baseline's sharding)."""
        return CostOptions(**{"precision": self.precision, "fsdp": self.fsdp, "reshard": self.reshard,
                              "checkpointing": self.checkpointing, "stack": self.stack, "grad_clip": self.grad_clip,
                              "ema": self.ema, **changes})

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise PaseError(f"space must be one of {', '.join(SPACES)}, not {self.space!r}")
        if self.only not in (None, *ONLY_KINDS):
            raise PaseError(f"only must be one of {', '.join(ONLY_KINDS)} (or None), not {self.only!r}")
        if self.only == "fsdp":
            self.fsdp = True
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise PaseError(f"precision must be bf16, fp16 or fp32, not {self.precision!r}")
        if not 0 <= self.search_gap < 0.5:
            raise PaseError(f"search_gap must be in [0, 0.5), not {self.search_gap}")
        if not 0 < self.memory_fraction <= 1:
            raise PaseError(f"memory_fraction must be in (0, 1], not {self.memory_fraction}")
        if self.stack not in STACKS:
            raise PaseError(f"stack must be one of {', '.join(STACKS)}, not {self.stack!r}")


@dataclass
class PricedGraph:
    """Everything the search and the reports need, computed once per (graph, cluster, options)."""

    ids: list[str]
    spaces: list[SplitSpace]
    compute: list[np.ndarray]
    comm: list[np.ndarray]
    memory: list[np.ndarray]
    edges: list[tuple[int, int, np.ndarray]]
    weight_sync: list[np.ndarray] = field(default_factory=list)  # the exposed gradient collectives inside comm
    comm_bytes: list[np.ndarray] = field(default_factory=list)  # bytes the layer's collectives move per device
    runnable: list[np.ndarray] = field(default_factory=list)  # per configuration: does the runtime run it
    relayout_bytes_per_second: float = 0.0  # re-layout seconds -> bytes per device (one rate prices them all)
    sync_bytes: list[np.ndarray] = field(default_factory=list)  # the bytes of weight_sync's collectives per device
    # per layer, the configuration of pure data parallelism (the batch over every device; None when some layer has
    # none): the incumbent a memory-bound search must beat (Lagrangian prices can miss it)
    data_parallel: list[int] | None = None
    # under k micro-steps the whole-gradient all-reduce runs once per k: the search's objective (a whole step over
    # k) takes (k - 1) / k of each layer's weight_sync off
    sync_discount: float = 0.0
    optimizer: list[np.ndarray] = field(default_factory=list)  # the optimizer's step inside compute, once per step

    def cost_graph(self, memory_price: float, name: str, devices: int) -> CostGraph:
        costs = [c + m - self.sync_discount * w + memory_price * mem
                 for c, m, w, mem in zip(self.compute, self.comm, self.once(), self.memory)]
        configs = [space.factors for space in self.spaces]  # rows, not lists: searches never read them
        return CostGraph(name, devices, self.ids, [""] * len(self.ids), configs, costs, self.edges)

    def totals(self, assignment: list[int]) -> tuple[float, float, float, float]:
        """(compute, layer communication, re-layout, memory) of an assignment."""
        compute = sum(float(c[k]) for c, k in zip(self.compute, assignment))
        comm = sum(float(c[k]) for c, k in zip(self.comm, assignment))
        relayout = sum(float(m[assignment[s], assignment[d]]) for s, d, m in self.edges)
        memory = sum(float(m[k]) for m, k in zip(self.memory, assignment))
        return compute, comm, relayout, memory

    def syncs(self) -> list[np.ndarray]:
        """Per layer, ``weight_sync`` (zeros where it was not priced apart)."""
        return self.weight_sync or [np.zeros(len(c)) for c in self.compute]

    def optimizers(self) -> list[np.ndarray]:
        """Per layer, the optimizer's step (zeros where it was not priced apart)."""
        return self.optimizer or [np.zeros(len(c)) for c in self.compute]

    def once(self) -> list[np.ndarray]:
        """Per layer, what runs once per step however many micro-steps: the whole-gradient sync and the optimizer."""
        return [w + o for w, o in zip(self.syncs(), self.optimizers())]

    def objective(self, assignment: list[int]) -> float:
        """What the search minimises: a step's seconds per micro-step (the step time without micro-steps)."""
        compute, comm, relayout, _ = self.totals(assignment)
        once = sum(float(w[k] + o[k]) for w, o, k in zip(self.syncs(), self.optimizers(), assignment))
        return compute + comm + relayout - self.sync_discount * once

    def comm_bytes_per_device(self, assignment: list[int]) -> float:
        """Bytes every collective of an assignment moves per device per step (layers' and re-layouts')."""
        layers = sum(float(b[k]) for b, k in zip(self.comm_bytes, assignment))
        relayout = sum(float(m[assignment[s], assignment[d]]) for s, d, m in self.edges)
        return layers + relayout * self.relayout_bytes_per_second


def price_graph(graph: LayerGraph, model: CostModel, options: PlanOptions,
                progress: Callable[[str], None] | None = None, memo: dict[str, Any] | None = None) -> PricedGraph:
    """Every layer's configurations and every edge's re-layouts priced. A UNet repeats layer shapes
    (every block of a level), so each distinct layer and edge is priced once and shared; ``memo`` (a dict kept
    by the caller, for one cluster and calibration) shares them between calls too: the micro-step search prices
    the same layers under many settings, which differ in a few blocks' sharding or recomputation.

    In the runnable space an activation passes between layers in the batch layout, and an edge costs its
    producer's way back to that layout plus its consumer's way out of it, unless the runtime keeps it
    channel-split (free) or cannot run the pair (infinite): ``strategies.runnable.edge_modes``."""
    devices = model.devices
    layers = list(graph.layers())
    ids = [layer_id for layer_id, _ in layers]
    index = {layer_id: i for i, layer_id in enumerate(ids)}
    block_outputs = block_output_layers(graph, options.checkpoint_blocks)
    forced = forced_splits(ids, options.force)
    rerun = rerun_layers(graph, options.checkpoint_blocks) if options.checkpointing else set()
    sharding = layer_shardings(graph, options)
    memo = {} if memo is None else memo
    keys: dict[tuple[Any, ...], int] = memo.setdefault("kinds", {})  # everything a layer's prices depend on -> id
    setting = (options.precision, options.space, options.only, json.dumps(options.min_chunk, sort_keys=True),
               devices)
    uniform = uniform_sharding({"fsdp": options.fsdp, "reshard": options.reshard})
    weighted = [any(p.get("trainable") for p in data.get("params", {}).values()) for _, data in layers]
    fsdp = [w and (options.fsdp if layer_id not in sharding else sharding[layer_id] != "none")
            for layer_id, w in zip(ids, weighted)]
    kind = [keys.setdefault((setting, json.dumps(forced.get(layer_id), sort_keys=True), layer_id in rerun,
                             options.checkpointing, layer_key(data, layer_id in block_outputs),
                             sharding.get(layer_id, uniform) if w else "none"), len(keys))
            for (layer_id, data), w in zip(layers, weighted)]
    # per kind: (space, compute, comm, memory, sync, comm bytes, runnable, sync bytes, optimizer); never changed in
    # place
    priced_kinds: dict[int, tuple[Any, ...]] = memo.setdefault("layers", {})
    # a layer's configurations depend on its shape, the devices and whether it is sharded, not on recomputation or
    # which sharding: settings that differ only there share them (checking runnability is most of pricing a kind)
    layer_spaces: dict[tuple[Any, ...], tuple[SplitSpace, np.ndarray]] = memo.setdefault("spaces", {})
    for v, (layer_id, data) in enumerate(layers):
        if kind[v] not in priced_kinds:
            space_key = (setting, layer_key(data, False), fsdp[v], json.dumps(forced.get(layer_id), sort_keys=True))
            if space_key not in layer_spaces:
                layer_spaces[space_key] = layer_space(layer_id, data, devices, replace(options, fsdp=fsdp[v]),
                                                      forced.get(layer_id))
            space, mask = layer_spaces[space_key]
            parts: dict[str, np.ndarray] = {}
            costs = model.layer_costs(data, space, block_output=layer_id in block_outputs, parts=parts,
                                      recomputed=(layer_id in rerun) if options.checkpointing else None,
                                      sharding=sharding.get(layer_id))
            priced_kinds[kind[v]] = (space, *costs, parts["weight_sync"], parts["comm_bytes"], mask,
                                     parts["sync_bytes"], parts["optimizer"])
    spaces, compute, comm, memory, weight_sync, comm_bytes, runnable, sync_bytes, optimizer = (
        list(column) for column in zip(*(priced_kinds[k] for k in kind)))
    # a sharded layer's configurations are those of the same layer unsharded, less the ones with no sharded runtime:
    # its edges are priced on the unsharded configurations (shared with every setting that prices them) and cut down
    bases: dict[tuple[Any, ...], SplitSpace] = memo.setdefault("unsharded", {})
    base = list(spaces)
    rows: list[np.ndarray | None] = [None] * len(ids)  # the configurations kept, in the unsharded space (None: all)
    for v, (layer_id, data) in enumerate(layers):
        if fsdp[v]:
            unsharded = (setting, layer_key(data, False), json.dumps(forced.get(layer_id), sort_keys=True))
            if unsharded not in bases:
                bases[unsharded] = layer_space(layer_id, data, devices, replace(options, fsdp=False),
                                               forced.get(layer_id))[0]
            where = {row.tobytes(): i for i, row in enumerate(bases[unsharded].factors)}
            kept = [where.get(row.tobytes()) for row in spaces[v].factors]
            if bases[unsharded].dims == spaces[v].dims and None not in kept:
                base[v] = bases[unsharded]
                rows[v] = np.array(kept, dtype=np.int64) if len(kept) < len(base[v]) else None
    # how the runtime runs a layer's configurations and its edges' prices depend on its attributes and those
    # configurations, and on checkpointing only where its forward runs again (its edges re-lay out again): ``shape``
    shape = [keys.setdefault((setting, layer_key(data, False), layer_id in rerun, base[v].dims,
                              base[v].factors.tobytes()), len(keys)) for v, (layer_id, data) in enumerate(layers)]
    if progress:
        progress("pricing re-layouts")
    through_batch = options.space == "runnable"
    edges = []
    priced_edges: dict[str, np.ndarray] = memo.setdefault("edges", {})
    out_edges = [graph.graph.out_degree(layer_id) for layer_id in ids]
    runs_of: dict[int, list] = memo.setdefault("runs", {})  # per layer shape, how the runtime runs each configuration
    base_runs = []
    for v, (_, data) in enumerate(layers):
        if through_batch and shape[v] not in runs_of:  # (not setdefault: that would run space_runs for every layer)
            runs_of[shape[v]] = space_runs(data, base[v], devices)
        base_runs.append(runs_of[shape[v]] if through_batch else [])
    for src, dst, data in graph.graph.edges(data=True):
        s, d = index[src], index[dst]
        key = edge_key(shape[s], shape[d], data) + f"/{out_edges[s]}"
        if key not in priced_edges:
            if through_batch:
                priced = _edge_through_batch(model, data, graph[src], output_space(graph[src], base[s], base_runs[s]),
                                             graph[dst], base[d], src in rerun, dst in rerun, out_edges[s])
                modes = edge_modes(data, graph[src], base_runs[s], graph[dst], base_runs[d], out_edges[s])
                priced_edges[key] = np.where(modes > 0, 0.0, np.where(modes < 0, np.inf, priced))
            else:
                priced_edges[key] = model.edge_costs(data, graph[src], base[s], graph[dst], base[d])
        matrix = priced_edges[key]
        if rows[s] is not None or rows[d] is not None:
            matrix = matrix[np.ix_(_all_or(rows[s], len(base[s])), _all_or(rows[d], len(base[d])))]
        edges.append((s, d, matrix))
    runs = [r if (kept_rows := rows[v]) is None else [r[i] for i in kept_rows] for v, r in enumerate(base_runs)]
    if through_batch:  # a model's outputs leave in the batch layout too (each rank returns its batch chunk)
        for v, (_, data) in enumerate(layers):
            if out_edges[v] == 0 and data["tensors"].get("output"):
                leaving = _output_relayout(model, data, output_space(data, spaces[v], runs[v]))
                comm[v] = comm[v] + leaving
                comm_bytes[v] = comm_bytes[v] + model.relayout_bytes(leaving)
    if through_batch and forced:
        _check_forced_pairs(ids, spaces, edges, sorted(forced))
    interfaces = [interface_config(data, spaces[v], devices) for v, (_, data) in enumerate(layers)]
    data_parallel = [k for k in interfaces if k is not None]
    return PricedGraph(ids, spaces, compute, comm, memory, edges, weight_sync, comm_bytes, runnable,
                       float(model.relayout_bytes(1.0)), sync_bytes,
                       data_parallel if len(data_parallel) == len(ids) else None,
                       (options.micro_steps - 1) / options.micro_steps, optimizer)


def layer_shardings(graph: LayerGraph, options: PlanOptions) -> dict[str, str]:
    """Per layer, its block's sharding where the options choose it per block (else empty: every layer as the
    options' fsdp and reshard say)."""
    if options.block_sharding is None:
        return {}
    return layer_sharding({"fsdp": options.fsdp, "block_sharding": options.block_sharding}, graph)


def layer_space(layer_id: str, data: LayerAttrs, devices: int, options: PlanOptions,
                forced: dict[str, int] | None = None) -> tuple[SplitSpace, np.ndarray]:
    """(the configurations the search may give ``layer_id``, which of them the runtime runs as planned)."""
    space = split_space(data, devices, options.min_chunk, options.only)
    runnable = runnable_mask(data, space, devices, options.fsdp)
    if options.space == "runnable":
        if not runnable.any():
            batch = interface_config(data, space, devices)
            extent = next((data["dims"][d] for d in data["dims"] if data["roles"][d] == "batch"), 1)
            why = runnable_reason(data, space.config(batch), devices, options.fsdp) if batch is not None else \
                f"its batch ({extent}) does not divide into {devices} equal chunks"
            raise PaseError(f"layer {layer_id} ({data['op']}) has no configuration the runtime runs on {devices} "
                            f"devices: {why}. Use a --batch divisible by the devices, or `--space all` to price "
                            "splits the runtime does not run")
        space, runnable = restrict(space, runnable), runnable[runnable]
    if options.only in ("dp", "fsdp"):  # DDP / FSDP: every device a batch chunk (no replicas of a layer)
        every = interface_config(data, space, devices)
        if every is not None:
            keep = np.arange(len(space)) == every
            space, runnable = restrict(space, keep), runnable[keep]
    if options.only == "tensor":  # a conv, linear or attention that can split its channels or heads does
        if options.space == "runnable":  # (local layers between them may, or may not)
            tensor = np.array([run is not None and run.kind in TENSOR_RUNS
                               for run in space_runs(data, space, devices, options.fsdp)])
        else:
            tensor = np.array([any(data["roles"][d] != "batch" for d in space.config(k)) for k in range(len(space))])
        if tensor.any():
            space, runnable = restrict(space, tensor), runnable[tensor]
    if forced is not None:
        k = space.index_of(forced)
        if k is None:
            full = split_space(data, devices, options.min_chunk, options.only)
            known = full.index_of(forced) is not None
            why = runnable_reason(data, forced, devices, options.fsdp) if known else "it is not one of its splits"
            choices = "; ".join(_splits_text(space.config(i)) for i in range(min(len(space), 12)))
            raise PaseError(f"--force {layer_id}={_splits_text(forced)}: {why}. Its configurations"
                            f"{' the runtime runs' if options.space == 'runnable' else ''}: {choices}")
        one = np.zeros(len(space), dtype=bool)
        one[k] = True
        space, runnable = restrict(space, one), runnable[one]
    return space, runnable


def forced_splits(ids: list[str], force: Mapping[str, Mapping[str, int]] | None) -> dict[str, dict[str, int]]:
    """Per layer id, the splits ``force`` (glob -> splits) gives it; the last matching glob wins. A glob that
    matches no layer is an error (a typo would otherwise force nothing)."""
    result: dict[str, dict[str, int]] = {}
    known = set(ids)
    for pattern, splits in (force or {}).items():
        matched = [pattern] if pattern in known else fnmatch.filter(ids, pattern)
        if not matched:
            raise PaseError(f"--force {pattern}: no layer id matches; `pase graph --model ...` lists them")
        for layer_id in matched:
            result[layer_id] = {d: int(f) for d, f in splits.items() if int(f) > 1}
    return result


def _check_forced_pairs(ids: list[str], spaces: list[SplitSpace], edges: list[tuple[int, int, np.ndarray]],
                        forced: list[str]) -> None:
    """Refuse, naming two neighbours, forced splits that leave no runnable pair on some edge: a forced
    channel-split layer whose neighbours cannot keep its layout. Without ``--force`` the batch layout
    always runs, so only forcing can leave none. Arc consistency over the edges: O(iterations * edges * K^2)."""
    alive = [np.ones(len(space), dtype=bool) for space in spaces]
    changed = True
    while changed:
        changed = False
        for s, d, matrix in edges:
            finite = np.isfinite(matrix)
            for v, other, ok in ((s, d, (finite & alive[d][None, :]).any(axis=1)),
                                 (d, s, (finite & alive[s][:, None]).any(axis=0))):
                left = alive[v] & ok
                if not left.any():
                    raise PaseError(
                        f"--force ({_named_few(forced)}) leaves no runnable plan: with the forced splits, layer "
                        f"{ids[v]} has no configuration that runs next to layer {ids[other]}. " + KEPT_RULE
                        + ": force those neighbours too, or `--space all` to price it without running it")
                if (left != alive[v]).any():
                    alive[v], changed = left, True


def _named_few(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _splits_text(splits: Mapping[str, int]) -> str:
    return ",".join(f"{d}:{f}" for d, f in splits.items() if f > 1) or "none"


def _all_or(rows: np.ndarray | None, count: int) -> np.ndarray:
    return np.arange(count) if rows is None else rows


def _edge_through_batch(model: CostModel, edge: EdgeAttrs, producer: LayerAttrs, src: SplitSpace,
                        consumer: LayerAttrs, dst: SplitSpace, producer_reruns: bool = False,
                        consumer_reruns: bool = False, producer_edges: int = 1) -> np.ndarray:
    """Re-layout seconds for every (producer, consumer) pair when the activation passes through the batch
    layout between them: the producer's way to it plus the consumer's way from it. ``src`` holds the producer's
    configurations as their output leaves the layer (``strategies.runnable.output_space``: after a reduction
    split's reduce-scatter, priced with the layer). The producer re-lays its output once for all its
    ``producer_edges`` consumers (the backward sums their gradients first), so each edge carries its share. A
    layer whose forward runs again under checkpointing (``rerun_layers``) re-lays its side forward again.
    O(K_src + K_dst)."""
    producer_batch, consumer_batch = _interface(producer, model.devices), _interface(consumer, model.devices)
    to_batch = model.edge_costs(edge, producer, src, consumer, consumer_batch)[:, 0]
    from_batch = model.edge_costs(edge, producer, producer_batch, consumer, dst)[0, :]
    if producer_reruns:
        to_batch = to_batch + model.edge_costs(edge, producer, src, consumer, consumer_batch, forward_only=True)[:, 0]
    if consumer_reruns:
        from_batch = from_batch + model.edge_costs(edge, producer, producer_batch, consumer, dst,
                                                   forward_only=True)[0, :]
    return to_batch[:, None] / max(1, producer_edges) + from_batch[None, :]



def _output_relayout(model: CostModel, layer: LayerAttrs, src: SplitSpace) -> np.ndarray:
    """Per configuration, the seconds a model output (``layer``'s, consumed by no layer) takes back to the batch
    layout the model returns it in. O(K)."""
    out_map = [str(d) for d in layer["tensors"]["output"]]
    shape = [int(layer["dims"][d]) for d in out_map]
    edge = EdgeAttrs(src="", dst="", slot=0, tensor="output", shape=shape, dst_shape=shape, dtype="float32",
                     dtype_bytes=4, bytes=4 * int(np.prod(shape)), src_map=[[d] for d in out_map],
                     dst_map=list[str | None](out_map), axis_map=[[a] for a in range(len(shape))], views=[],
                     requires_grad=True)
    return model.edge_costs(edge, layer, src, layer, _interface(layer, model.devices))[:, 0]


def _interface(layer: LayerAttrs, devices: int) -> SplitSpace:
    """The one-configuration space of ``layer``'s batch split over all devices."""
    batch = [d for d in layer["dims"] if layer["roles"][d] == "batch"][:1]
    return SplitSpace(tuple(batch), np.full((1, len(batch)), devices, dtype=np.int64))


def layer_key(data: LayerAttrs, block_output: bool) -> str:
    """Everything a layer's prices depend on: layers with equal keys cost the same in every configuration, and the
    runtime runs the same configurations of them (which may depend on the module class: strategies.runnable)."""
    params = [(p.get("map"), p.get("numel"), p.get("trainable")) for p in data["params"].values()]
    return json.dumps([data["op"], data["dims"], data["roles"], data["tensors"], params, data["flops_fwd"],
                       data["flops_bwd"], data.get("pointwise_elems"), data.get("attrs"), data.get("module_class"),
                       data.get("fused_ops"), block_output], sort_keys=True, default=str)


def edge_key(producer_kind: int, consumer_kind: int, data: Mapping[str, Any]) -> str:
    """Edges between layers of the same kinds carrying the same tensor re-lay out at the same cost."""
    return json.dumps([producer_kind, consumer_kind, {k: v for k, v in data.items() if k not in ("src", "dst")}],
                      sort_keys=True, default=str)


def layer_kinds(graph: LayerGraph, block_outputs: set[str]) -> list[int]:
    """Per layer (in ``graph.layers()`` order), an index shared by the layers that price alike (``layer_key``)."""
    kinds: dict[str, int] = {}
    return [kinds.setdefault(layer_key(data, layer_id in block_outputs), len(kinds))
            for layer_id, data in graph.layers()]


def block_output_layers(graph: LayerGraph, blocks: tuple[str, ...] | None = None) -> set[str]:
    """Layers priced as block outputs: under checkpointing they keep their activations and do not recompute.
    Every layer but those the runtime recomputes (``strategies.checkpointing.recomputed_layers``: the inner
    layers of the blocks it wraps; ``blocks``: of those only, None: of every checkpointable block)."""
    recomputed = recomputed_layers(graph, blocks)
    return {layer_id for layer_id, _ in graph.layers() if layer_id not in recomputed}


def search_cost_model(cluster: Cluster, rates: HardwareRates, options: PlanOptions) -> CostModel:
    """The cost model a search over ``options``' space prices with (the runnable space passes activations in the
    batch layout between layers)."""
    return CostModel(cluster, rates, options.cost_options(batch_interface=options.space == "runnable"))


def plan_graph(graph: LayerGraph, cluster: Cluster, *, profile: dict[str, Any] | None = None,
               options: PlanOptions | None = None, progress: Callable[[str], None] | None = None) -> Plan:
    """The fastest plan that fits memory, with DDP and FSDP priced by the same model."""
    return plan_and_price(graph, cluster, profile=profile, options=options, progress=progress)[0]


def plan_and_price(graph: LayerGraph, cluster: Cluster, *, profile: dict[str, Any] | None = None,
                   options: PlanOptions | None = None, progress: Callable[[str], None] | None = None,
                   memo: dict[str, Any] | None = None) -> tuple[Plan, PricedGraph]:
    """``plan_graph``, also returning the priced graph (for ``explain`` without pricing twice); ``memo``: as for
    ``price_graph`` (the same cluster and ``profile`` on every call)."""
    options = options or PlanOptions()
    started = time.perf_counter()
    rates = HardwareRates(cluster, profile, options.precision)
    model = search_cost_model(cluster, rates, options)
    if progress:
        progress(f"pricing {len(graph)} layers on {cluster.world_size} devices")
    priced = price_graph(graph, model, options, progress, memo)
    priced_at = time.perf_counter()
    limit = cluster.gpu.memory_bytes * options.memory_fraction
    if progress:
        progress("searching")
    try:
        assignment, stats, price, space_note = search_under_memory(priced, limit, cluster, options)
    except PlanDoesNotFit as exc:
        exc.priced = priced  # what was priced, for a caller that searches the same graph otherwise
        raise
    searched = time.perf_counter()
    predicted = _prediction(priced, assignment, graph.batch)
    baselines, notes = {}, {}
    relayouts: dict[str, float] = {}  # re-layouts do not depend on FSDP: priced once for both baselines
    for name, fsdp in (("ddp", False), ("fsdp", True)) if options.baselines else ():
        baselines[name], note = _baseline(graph, cluster, rates, options, fsdp=fsdp, limit=limit, relayouts=relayouts)
        if note:
            notes[name] = note
    layers = []
    for v, (layer_id, data) in enumerate(graph.layers()):
        k = assignment[v]
        layers.append(LayerChoice(layer_id, data["op"], data["block"], priced.spaces[v].config(k),
                                  float(priced.compute[v][k] + priced.comm[v][k]), float(priced.memory[v][k]),
                                  bool(priced.runnable[v][k])))
    search = SearchInfo(seconds=round(searched - priced_at, 3), pricing_seconds=round(priced_at - started, 3),
                        width=stats.width, largest_table=stats.largest_table, pruned_configs=stats.pruned_configs,
                        memory_price=price, conditioned_on=list(stats.conditioned_on), space_note=space_note,
                        proved_gap=stats.proved_gap, hub_combos_solved=stats.hub_combos_solved,
                        messages_reused=stats.messages_reused, configs=int(sum(len(s) for s in priced.spaces)))
    plan = new_plan(graph, cluster, options, rates, layers=layers, predicted=predicted, baselines=baselines,
                    baseline_notes=notes, search=search)
    return plan, priced


def plan_blocks(graph: LayerGraph, options: Mapping[str, Any]) -> list[BlockChoice]:
    """Every module block of ``graph`` in model order, with what the plan's options do to it: recompute it
    (``strategies.checkpointing.planned_blocks``) and shard its state (FSDP: "full"; FSDP keeping the gathered
    weights through the backward: "gradients", ZeRO-2)."""
    checkpointed = set(planned_blocks(dict(options), graph))
    sharding = planned_sharding(options, graph)  # the blocks with weights (one without has nothing to shard)
    names = dict.fromkeys(data["block"] for _, data in graph.layers())
    return [BlockChoice(name, name in checkpointed, sharding.get(name, "none")) for name in names]


def _stack_note(cluster: Cluster, stack: str) -> str:
    """How the plan's step reaches the GPU, for the rates line: an eager stack's host time per operator."""
    if stack == "graphed":
        return "; graphed stack (CUDA graphs: no host dispatch priced)"
    host_us = cluster.gpu.host_us_per_op
    return f"; eager stack: {host_us:g} us of host per operator bounds each layer" if host_us else ""


def new_plan(graph: LayerGraph, cluster: Cluster, options: PlanOptions, rates: HardwareRates, **body: Any) -> Plan:
    """A ``Plan`` for ``graph`` on ``cluster``: the header every planner writes the same way, plus ``body``."""
    plan = Plan(
        model=str(graph.meta.get("model")), model_fingerprint=graph.fingerprint(), cluster=cluster.spec,
        devices=cluster.world_size, batch=graph.batch, precision=options.precision,
        options={"memory_fraction": options.memory_fraction, "only": options.only, "fsdp": options.fsdp,
                 "reshard": options.reshard,
                 "search_gap": options.search_gap,
                 "checkpointing": options.checkpointing, "min_chunk": options.min_chunk,
                 "checkpoint_blocks": list(options.checkpoint_blocks) if options.checkpointing and
                 options.checkpoint_blocks is not None else None,
                 "block_sharding": dict(options.block_sharding) if options.fsdp and
                 options.block_sharding is not None else None,
                 "space": options.space, "force": options.force,
                 "memory_limit_bytes": cluster.gpu.memory_bytes * options.memory_fraction,
                 "rates": rates.compute("conv").source + _stack_note(cluster, options.stack), "stack": options.stack,
                 "grad_clip": options.grad_clip, "ema": options.ema},
        input_shapes=user_input_shapes(graph), **body)
    plan.blocks = plan_blocks(graph, plan.options)
    return plan


def user_input_shapes(graph: LayerGraph) -> list[list[int]] | None:
    """A user factory's positional input shapes, as captured (None for zoo models and diffusers folders)."""
    name = str(graph.meta.get("model"))
    if name in ZOO or ":" not in name or looks_like_folder(name):
        return None
    return [[int(d) for d in shape] for shape in graph.meta.get("inputs", {}).values()] or None


def search_under_memory(priced: PricedGraph, limit: float, cluster: Cluster, options: PlanOptions | None = None
                        ) -> tuple[list[int], SearchStats, float | None, str | None]:
    """(assignment, search stats, memory price used, note on the space searched) under ``limit``.

    When the fastest plan does not fit, memory gets a price per byte (Lagrangian relaxation: the
    limit couples every layer, a price keeps the search separable). Prices come from the dual's
    kinks, where the best plan that fits and the best that does not cost the same, rather than
    bisection; each search also gives a lower bound on every plan that fits, so
    ``stats.proved_gap`` certifies the plan against the best one within the limit.
    Also used by the pipeline planner for each stage's sub-graph on its device group.
    """
    options = options or PlanOptions()
    gap = options.search_gap
    name, devices = "plan", cluster.world_size
    solution, note = _solve_priced(priced, 0.0, devices, gap)
    memory = priced.totals(solution.assignment)[3]
    if memory <= limit:
        return solution.assignment, solution.stats, 0.0, note
    lean = solve(_memory_only(priced, name, devices), dtype=np.float32)
    least = priced.totals(lean.assignment)[3]
    if least > limit:
        raise PlanDoesNotFit(
            f"no plan fits: the leanest needs {size_text(least)} per device, and {cluster.gpu.id} leaves "
            f"{size_text(limit)} ({cluster.gpu.memory_gb:g} GB x memory fraction). Try {fit_remedies(options)}.",
            least, limit)
    step = max(sum(float(c.min()) for c in priced.compute), 1e-9)
    # A search over the restricted space (see _solve_priced) bounds only the plans of that space: its bound
    # steers the price steps (``floor``) but certifies nothing (``certified``: bounds from full-space searches,
    # valid for every plan that fits); a plan that took a restricted search anywhere carries its note.
    floor, certified, restricted = -np.inf, _separable_bound(priced), None

    def bound(solution: Solution, price: float, note: str | None) -> None:
        nonlocal floor, certified, restricted
        value = _lagrangian_bound(solution, price, limit)
        floor = max(floor, value)
        if note is None:
            certified = max(certified, value)
        restricted = restricted or note

    bound(solution, 0.0, note)
    over, over_price = solution, 0.0  # the latest optimum that does not fit, and its memory price
    fitting, fit_price = None, step / max(limit, 1.0)
    while fit_price <= 1e6:  # raise the memory price until the optimum fits
        candidate, note = _solve_priced(priced, fit_price, devices, gap)
        bound(candidate, fit_price, note)
        if _cost_and_memory(priced, candidate)[1] <= limit:
            fitting, best_note = candidate, note
            break
        over, over_price, fit_price = candidate, fit_price, fit_price * 4
    if fitting is None:  # the memory search's own gap says nothing about step time
        lean.stats.proved_gap = max(0.0, _cost_and_memory(priced, lean)[0] / max(certified, 1e-30) - 1)
        return lean.assignment, lean.stats, None, "memory-minimal plan: no memory price gave a faster plan that fits"
    best, best_price = fitting, fit_price
    for _ in range(options.memory_price_steps):
        if _cost_and_memory(priced, best)[0] <= (1 + gap) * floor:
            break  # within the gap of every plan that fits: no price can do better
        # the price at which the two bracketing plans cost the same: the dual's next kink (a cutting-plane step)
        over_cost, over_memory = _cost_and_memory(priced, over)
        fit_cost, fit_memory = _cost_and_memory(priced, fitting)
        price = (fit_cost - over_cost) / (over_memory - fit_memory)
        if not over_price < price < fit_price:
            price = (over_price + fit_price) / 2
        crossing = fit_cost + price * fit_memory
        candidate, note = _solve_priced(priced, price, devices, gap)
        bound(candidate, price, note)
        cost, memory = _cost_and_memory(priced, candidate)
        if memory <= limit:
            fitting, fit_price = candidate, price
            if cost < _cost_and_memory(priced, best)[0]:
                best, best_price, best_note = candidate, price, note
        else:
            over, over_price = candidate, price
        if candidate.optimum >= crossing * (1 - 1e-9) / (1 + candidate.stats.proved_gap):
            break  # no plan beats the two bracketing ones at their crossing: the dual optimum is reached
    assignment = best.assignment
    if priced.data_parallel is not None and priced.totals(priced.data_parallel)[3] <= limit and \
            priced.objective(priced.data_parallel) < _cost_and_memory(priced, best)[0]:
        assignment = list(priced.data_parallel)  # pure data parallelism fits and is faster
    cost = priced.objective(assignment)
    best.stats.proved_gap = max(0.0, cost / max(certified, 1e-30) - 1)
    return assignment, best.stats, best_price, best_note or restricted


def fit_remedies(options: PlanOptions) -> str:
    """What could make a plan fit, leaving out the options already on."""
    remedies = ["more devices", "a smaller --batch"]
    if not options.checkpointing:
        remedies.append("--checkpoint (recompute activations)")
    if not options.fsdp:
        remedies.append("--fsdp (shard weights and optimizer state)")
    return " or ".join(remedies) if len(remedies) == 2 else ", ".join(remedies[:-1]) + ", or " + remedies[-1]


def _cost_and_memory(priced: PricedGraph, solution: Solution) -> tuple[float, float]:
    """(the search's objective: step seconds per micro-step, memory per device) of a solution's assignment."""
    return priced.objective(solution.assignment), priced.totals(solution.assignment)[3]


def _lagrangian_bound(solution: Solution, price: float, limit: float) -> float:
    """A lower bound on the step time of every plan within ``limit``, from a search at memory ``price``.

    For a plan x that fits, cost(x) >= cost(x) + price * (memory(x) - limit) >= OPT(price) - price * limit,
    and the search's value is at most (1 + proved gap) x OPT(price). The best bound over the prices
    tried certifies how far the plan that fits can be from the best one that fits.
    """
    return solution.optimum / (1 + solution.stats.proved_gap) - price * limit


def _separable_bound(priced: PricedGraph) -> float:
    """Every layer and every edge at its own cheapest: a lower bound on the step time of any plan."""
    return (sum(float((c + m - priced.sync_discount * w).min())
                for c, m, w in zip(priced.compute, priced.comm, priced.syncs()))
            + sum(float(matrix.min()) for _, _, matrix in priced.edges))


SEARCH_TABLE_BUDGET = 1 << 26  # entries: above this, idle-device configurations are left out (see _solve_priced)


def _solve_priced(priced: PricedGraph, memory_price: float, devices: int, gap: float
                  ) -> tuple[Solution, str | None]:
    """The search over the full layer spaces, configurations leaving devices idle included.

    Hubs (timestep embedding, text context) are handled by bounds (``solve(gap=...)``): the plan
    is proved within ``gap`` of the optimum, and exact when no hub is conditioned on. Only
    when even that would build a table over ``SEARCH_TABLE_BUDGET`` entries are the idle-device
    configurations left out, and the plan says so. Returns (solution, space note or None).
    """
    full = priced.cost_graph(memory_price, "plan", devices)
    try:
        return solve(full, dtype=np.float32, gap=gap, max_table_entries=SEARCH_TABLE_BUDGET), None
    except TableBudgetExceeded as exceeded:
        peak = exceeded.peak
    keep = [np.flatnonzero(np.isin(space.factors.prod(axis=1), (1, devices))) for space in priced.spaces]
    restricted = CostGraph("plan-full-use", devices, full.ids, full.ops,
                           [np.asarray(full.configs[v])[k] for v, k in enumerate(keep)],
                           [full.vertex_costs[v][k] for v, k in enumerate(keep)],
                           [(s, d, m[np.ix_(keep[s], keep[d])]) for s, d, m in full.edges])
    solution = solve(restricted, dtype=np.float32, gap=gap)
    solution.assignment = [int(keep[v][c]) for v, c in enumerate(solution.assignment)]
    return solution, (f"configurations leaving devices idle were left out: exact search over them would build "
                      f"tables of {peak:,.0f} entries (budget {SEARCH_TABLE_BUDGET:,}); the plan is optimal "
                      "over configurations that use all devices or one")


def size_text(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _memory_only(priced: PricedGraph, name: str, devices: int) -> CostGraph:
    """Minimise memory alone (re-layouts free): the leanest plan there is."""
    configs = [space.factors for space in priced.spaces]
    # memory is a sum over layers: no edges, so the search is separable (zero-cost edges would still
    # join scopes and, on large graphs, build tables of over 64 dimensions)
    return CostGraph(name, devices, priced.ids, [""] * len(priced.ids), configs, list(priced.memory), [])


def _prediction(priced: PricedGraph, assignment: list[int], batch: int) -> Prediction:
    compute, comm, relayout, memory = priced.totals(assignment)
    step = compute + comm + relayout
    sync = sum(float(w[k]) for w, k in zip(priced.weight_sync, assignment))
    sync_bytes = sum(float(b[k]) for b, k in zip(priced.sync_bytes, assignment))
    optimizer = sum(float(o[k]) for o, k in zip(priced.optimizers(), assignment))
    return Prediction(step_seconds=step, samples_per_second=batch / step if step > 0 else 0.0,
                      memory_bytes_per_device=memory, compute_seconds=compute, communication_seconds=comm + relayout,
                      gradient_sync_seconds=sync, comm_bytes_per_device=priced.comm_bytes_per_device(assignment),
                      gradient_sync_bytes_per_device=sync_bytes, optimizer_seconds=optimizer)


def _baseline(graph: LayerGraph, cluster: Cluster, rates: HardwareRates, options: PlanOptions, fsdp: bool,
              limit: float, relayouts: dict[str, float] | None = None) -> tuple[Prediction | None, str | None]:
    """Pure data parallelism (batch split p ways everywhere), as DDP or FSDP, under the same cost
    model (and whatever ``--only`` restricts the plan to). Returns (prediction, why it is missing).

    ``relayouts`` caches re-layout seconds per ``edge_key`` between calls (they do not depend on FSDP)."""
    prediction, note = data_parallel_prediction(graph, cluster, rates, options, fsdp, relayouts)
    if prediction is not None and prediction.memory_bytes_per_device > limit:
        return None, (f"needs {size_text(prediction.memory_bytes_per_device)} per device, over the "
                      f"{size_text(limit)} limit")
    return prediction, note


def data_parallel_prediction(graph: LayerGraph, cluster: Cluster, rates: HardwareRates, options: PlanOptions,
                             fsdp: bool, relayouts: dict[str, float] | None = None
                             ) -> tuple[Prediction | None, str | None]:
    """``_baseline`` without the memory limit: (its prediction, None), or (None, why the batch does not split)."""
    devices = cluster.world_size
    model = CostModel(cluster, rates, options.cost_options(fsdp=fsdp, reshard=True))
    block_outputs = block_output_layers(graph)
    spaces: dict[str, SplitSpace] = {}
    kinds = dict(zip((layer_id for layer_id, _ in graph.layers()), layer_kinds(graph, block_outputs)))
    rerun = rerun_layers(graph) if options.checkpointing else set()  # as the plan prices them (price_graph)
    priced: dict[tuple[int, bool], tuple[float, ...]] = {}  # per layer kind (priced once)
    compute = comm = memory = comm_bytes = sync = sync_bytes = optimizer = 0.0
    for layer_id, data in graph.layers():
        batch_dims = [d for d in data["dims"] if data["roles"][d] == "batch"]
        wanted: dict[str, int] = {}
        if devices > 1 and batch_dims:
            extent = data["dims"][batch_dims[0]]
            if extent % devices:
                return None, f"the batch ({extent} in {layer_id}) does not divide over {devices} devices"
            wanted = {batch_dims[0]: devices}
        space = SplitSpace(tuple(wanted), np.array([list(wanted.values())], dtype=np.int64).reshape(1, len(wanted)))
        spaces[layer_id] = space
        kind = (kinds[layer_id], layer_id in rerun)
        if kind not in priced:
            parts: dict[str, np.ndarray] = {}
            c, m, mem = model.layer_costs(data, space, block_output=layer_id in block_outputs, parts=parts,
                                          recomputed=(layer_id in rerun) if options.checkpointing else None)
            priced[kind] = (float(c[0]), float(m[0]), float(mem[0]), float(parts["comm_bytes"][0]),
                            float(parts["weight_sync"][0]), float(parts["sync_bytes"][0]), float(parts["optimizer"][0]))
        c_, m_, mem_, bytes_, sync_, sync_bytes_, optimizer_ = priced[kind]
        compute, comm, memory, comm_bytes = compute + c_, comm + m_, memory + mem_, comm_bytes + bytes_
        sync, sync_bytes, optimizer = sync + sync_, sync_bytes + sync_bytes_, optimizer + optimizer_
    relayouts = {} if relayouts is None else relayouts
    relayout = 0.0
    for s, d, edge in graph.graph.edges(data=True):
        key = edge_key(kinds[s], kinds[d], edge)
        if key not in relayouts:
            relayouts[key] = float(model.edge_costs(edge, graph[s], spaces[s], graph[d], spaces[d])[0, 0])
        relayout += relayouts[key]
    step = compute + comm + relayout
    prediction = Prediction(step, graph.batch / step if step else 0.0, memory, compute, comm + relayout,
                            gradient_sync_seconds=sync,
                            comm_bytes_per_device=comm_bytes + float(model.relayout_bytes(relayout)),
                            gradient_sync_bytes_per_device=sync_bytes, optimizer_seconds=optimizer)
    return prediction, None


__all__ = ["PlanDoesNotFit", "PlanOptions", "data_parallel_prediction", "forced_splits", "layer_space",
           "plan_and_price", "plan_graph", "price_graph", "new_plan", "search_cost_model", "search_under_memory"]
