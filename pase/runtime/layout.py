"""What the runtime does with each layer of a plan: the plan's splits mapped onto the layouts it runs.

``strategies.runnable`` says which configurations run as planned, and on which edges an activation
stays channel-split (``edge_mode``); every layer and edge of a plan must be runnable, or
``layer_layouts`` refuses the plan, naming the layers and why. Nothing runs differently from its
plan: there is no fallback.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pase.errors import PaseError
from pase.graph import LayerGraph
from pase.planning.plan import Plan
from strategies.runnable import KEPT_RULE, LayerRun, NotRunnable, edge_mode, layer_run
from strategies.sharding import layer_sharding

SHOWN_REFUSALS = 3  # reasons, and layers per reason, named in a refusal; the rest are counted


@dataclass(frozen=True)
class LayerLayout:
    layer: str
    op: str
    module: str
    planned: dict[str, int]
    kind: str  # "batch", "out", "in", "heads", "seq", "spatial", "local", "norm", "grid", "outspatial", "replicated"
    factor: int = 1  # tensor-parallel degree (1 for batch; a grid's output-channel split)
    keep_output: bool = False  # an out-split or head split whose output stays channel-split for its consumer
    kept_input: bool = False  # an in-split whose input arrives channel-split
    kept_inputs: tuple[str, ...] = ()  # a head split's projections ("to_q", ...) whose output arrives head-split
    gated: bool = False  # an out-split GEGLU projection (interleaved rows)
    inner: int = 1  # a grid's input-channel split; an outspatial's row split
    axis: int | None = None  # a spatial or outspatial split's axis in the module's input (2: height, 3: width)
    replicas: int = 1  # an out-split on replica groups

    @property
    def applied(self) -> str:
        return LayerRun(self.kind, self.factor, inner=self.inner, replicas=self.replicas).label


class PlanNotRunnable(PaseError):
    """A plan with layers the runtime would run differently from their plan."""


def layer_layouts(plan: Plan, graph: LayerGraph) -> list[LayerLayout]:
    """One ``LayerLayout`` per plan layer, in plan order; ``PlanNotRunnable`` when any layer's splits are not
    ones the runtime runs as planned. O(layers)."""
    runs: dict[str, LayerRun] = {}
    refused: dict[str, list[str]] = {}  # reason -> the layers refused for it
    fsdp = bool(plan.options.get("fsdp"))
    per_layer = layer_sharding(plan.options, graph) if plan.options.get("block_sharding") is not None else {}
    for choice in plan.layers:
        data = graph[choice.id]
        try:
            sharded = fsdp if choice.id not in per_layer else per_layer[choice.id] != "none"
            runs[choice.id] = layer_run(data, choice.splits, plan.devices, sharded)
        except NotRunnable as exc:
            refused.setdefault(str(exc), []).append(f"{choice.id} ({data['op']}, {_splits(choice.splits)})")
    kept: set[tuple[str, str]] = set()  # (producer, consumer) edges whose activation stays channel-split
    for src, dst, edge in graph.graph.edges(data=True):
        if src not in runs or dst not in runs:
            continue
        mode = edge_mode(edge, graph[src], runs[src], graph[dst], runs[dst], graph.graph.out_degree(src))
        if mode == "kept":
            kept.add((src, dst))
        elif mode is None:
            local, other = (src, dst) if runs[src].kind == "local" or runs[src].gated else (dst, src)
            beside = f"next to {other} as {runs[other].label}"
            refused.setdefault(KEPT_RULE, []).append(f"{local} ({runs[local].label}, {beside})")
    result = []
    for choice in plan.layers:
        if choice.id not in runs:
            continue
        run, data = runs[choice.id], graph[choice.id]
        keep_output = run.kind in ("out", "heads") and any((choice.id, dst) in kept
                                                           for dst in graph.graph.successors(choice.id))
        kept_from = [graph[src]["module"] for src in graph.graph.predecessors(choice.id) if (src, choice.id) in kept]
        kept_inputs = tuple(sorted(module.rpartition(".")[2] for module in kept_from)) if run.kind == "heads" else ()
        rows = {"spatial": run.dim, "outspatial": run.inner_dim}.get(run.kind)  # the dimension split by rows
        axis = data["tensors"]["inputs"][0].index(rows) if rows else None
        result.append(LayerLayout(choice.id, data["op"], data["module"], dict(choice.splits), run.kind, run.factor,
                                  keep_output, run.kind == "in" and bool(kept_from), kept_inputs, run.gated, run.inner,
                                  axis, run.replicas))
    if refused:
        count = sum(map(len, refused.values()))
        reasons = [f"{_named(layers)}: {reason}" for reason, layers in refused.items()]
        raise PlanNotRunnable(f"the runtime would not run {count} of {len(plan.layers)} layers as planned: "
                              + "; ".join(reasons[:SHOWN_REFUSALS])
                              + (f"; and {len(reasons) - SHOWN_REFUSALS} other reasons" if len(reasons) > SHOWN_REFUSALS
                                 else "")
                              + ". Re-plan without `--space all` (the default space holds only runnable splits)")
    return result


def _named(layers: list[str]) -> str:
    more = len(layers) - SHOWN_REFUSALS
    return ", ".join(layers[:SHOWN_REFUSALS]) + (f" and {more} more" if more > 0 else "")


def _splits(splits: dict[str, int]) -> str:
    return ", ".join(f"{d}={f}" for d, f in splits.items() if f > 1) or "unsplit"


def is_pure_data_parallel(layouts: list[LayerLayout]) -> bool:
    """No layer needs a tensor-parallel group: DDP or FSDP run the plan."""
    return all(layout.kind == "batch" for layout in layouts)


@dataclass
class ParallelLayout:
    """How a parallelized model runs its plan (``model.pase_layout``). Every layer runs as planned
    (``layer_layouts`` refuses plans otherwise), so ``layers_as_planned`` counts the layers applied."""
    # "single" (one process: the model as it is), "ddp", "fsdp", "zero2", "sharded blocks" (each block as the plan
    # shards it, the rest's gradients all-reduced), "tensor" (with "+" what shards its state) or "pipeline"
    kind: str
    world_size: int
    layers: list[LayerLayout] = field(default_factory=list)
    tensor_degrees: list[int] = field(default_factory=list)
    layers_total: int = 0  # layers in the plan
    checkpointed: list[str] = field(default_factory=list)  # blocks run under activation checkpointing

    def __post_init__(self) -> None:
        self.layers_total = self.layers_total or len(self.layers)

    @property
    def layers_as_planned(self) -> int:
        return len(self.layers)

    def summary(self) -> str:
        split = [layout for layout in self.layers if layout.kind != "batch"]
        text = f"{self.kind} over {self.world_size} ranks; {self.layers_as_planned} of {self.layers_total} layers " \
               "as planned"
        if self.checkpointed:
            text += f"; activation checkpointing on {len(self.checkpointed)} blocks"
        if split:
            kinds = sorted({layout.applied for layout in split})
            text += f" ({len(split)} split: {', '.join(kinds)})"
        return text


__all__ = ["LayerLayout", "ParallelLayout", "PlanNotRunnable", "is_pure_data_parallel", "layer_layouts"]
