"""What the runtime does with each layer of a plan: the plan's splits mapped onto runnable layouts.

Between layers activations are batch-sharded over all ranks. A layer keeps that layout unless the
plan splits its channels or heads: conv and linear out-channel splits (column parallel), in-channel
splits (row parallel) and attention head splits run on a tensor-parallel group and re-lay their
input and output (``strategies.tensor``). Per-sample layers (group norm, elementwise, concat,
resampling) split by channel are computed on batch chunks with whole channels, so a group norm
always holds whole groups and needs no statistics exchange. Splits with no runtime (spatial and
sequence splits, two tensor dimensions at once) run batch-parallel and are listed, never silent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pase.graph import LayerGraph
from pase.planning.plan import Plan

PER_SAMPLE_OPS = ("group_norm", "elementwise", "concat", "upsample", "downsample")
ROLE_SPLIT = {"out_channel": "out", "reduction": "in"}


@dataclass(frozen=True)
class LayerLayout:
    layer: str
    op: str
    module: str
    planned: dict[str, int]
    kind: str  # "batch", "out", "in" or "heads"
    factor: int = 1  # tensor-parallel degree (1 for batch)
    note: str = ""

    @property
    def applied(self) -> str:
        return "batch" if self.kind == "batch" else f"{self.kind}/{self.factor}"


def layer_layouts(plan: Plan, graph: LayerGraph) -> list[LayerLayout]:
    """One ``LayerLayout`` per plan layer, in plan order. O(layers)."""
    result = []
    for choice in plan.layers:
        data = graph[choice.id]
        roles = data["roles"]
        tensor = {d: f for d, f in choice.splits.items() if f > 1 and roles.get(d) != "batch"}
        kind, factor, note = "batch", 1, ""
        if len(tensor) == 1:
            (dim, factor), = tensor.items()
            role = roles.get(dim)
            if data["op"] in ("conv", "linear") and role in ROLE_SPLIT and _plain(data):
                kind = ROLE_SPLIT[role]
            elif data["op"] == "attention" and role == "head":
                kind = "heads"
            elif data["op"] in PER_SAMPLE_OPS and role == "channel":
                factor, note = 1, "per-sample op on batch chunks with whole channels: no exchange needed"
            else:
                factor, note = 1, f"{role} split of {data['op']} has no runtime yet: runs batch-parallel"
        elif tensor:
            note = f"{len(tensor)} split dimensions at once have no runtime yet: runs batch-parallel"
        result.append(LayerLayout(choice.id, data["op"], data["module"], dict(choice.splits), kind, factor, note))
    return result


def _plain(data: dict) -> bool:
    attrs = data.get("attrs", {})
    return int(attrs.get("groups", 1) or 1) == 1 and not attrs.get("transposed", False)


def is_pure_data_parallel(layouts: list[LayerLayout]) -> bool:
    """No layer needs a tensor-parallel group: DDP or FSDP run the plan (unrunnable splits included,
    which run batch-parallel either way)."""
    return all(layout.kind == "batch" for layout in layouts)


@dataclass
class ParallelLayout:
    """How a parallelized model runs its plan (``model.pase_layout``)."""
    kind: str  # "ddp", "fsdp", "tensor" or "pipeline"
    world_size: int
    layers: list[LayerLayout] = field(default_factory=list)
    tensor_degrees: list[int] = field(default_factory=list)
    checkpointed: list[str] = field(default_factory=list)  # blocks run under activation checkpointing

    def summary(self) -> str:
        split = [layout for layout in self.layers if layout.kind != "batch"]
        fallback = [layout for layout in self.layers if layout.note.endswith("batch-parallel")]
        text = f"{self.kind} over {self.world_size} ranks"
        if self.checkpointed:
            text += f"; activation checkpointing on {len(self.checkpointed)} blocks"
        if split:
            kinds = sorted({layout.applied for layout in split})
            text += f"; {len(split)} layers split ({', '.join(kinds)})"
        if fallback:
            text += f"; {len(fallback)} layers run batch-parallel instead of as planned ({fallback[0].note})"
        return text


__all__ = ["LayerLayout", "ParallelLayout", "PER_SAMPLE_OPS", "is_pure_data_parallel", "layer_layouts"]
