"""``parallelize(model, plan)``: the model, changed to run the plan in the current process group.

Order (each step refuses bad input before any work): the world size and the model are checked
against the plan; parameters are broadcast from rank 0 (every rank starts from the same weights);
then either the fast path (DDP, or FSDP2 when the plan was made with ``--fsdp``) for plans that split
only the batch, or the per-layer layouts of ``pase.runtime.layout`` on tensor-parallel groups built
from the plan's split factors (one 2-D device mesh per degree), with gradient synchronisation; with
``--fsdp`` too, FSDP2 shards each module's parameters over its data-parallel peers (the 2-D mesh's dp
axis for a split module, every rank for the others: ``strategies.tensor.shard_parameters``). A plan
made with ``--checkpoint`` has the blocks it priced as recomputing run under activation checkpointing
(``strategies.checkpointing``) on every path, pipeline stages included.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pase.errors import PaseError
from pase.graph import LayerGraph
from pase.planning.plan import Plan
from pase.runtime.checks import check_model, check_world, model_graph
from pase.runtime.layout import LayerLayout, ParallelLayout, is_pure_data_parallel, layer_layouts
from pase.runtime.pipeline import pipeline_parallelize
from strategies.checkpointing import apply_checkpointing, planned_blocks
from strategies.data import GRADIENT_DTYPES, apply_ddp, apply_fsdp, shard_blocks
from strategies.replication import ReplicaSplitGroups, ReplicatedAttention, replicate_module, replicate_split
from strategies.runnable import REPLICABLE_MODULES
from strategies.sharding import planned_sharding
from strategies.spatial import OutSpatialConv, OutSpatialGroups, SpatialConv, SpatialGroupNorm
from strategies.tensor import (
    ChannelGroupNorm,
    ChannelLayerNorm,
    ChannelSplit,
    GradientSync,
    GridGroups,
    GridSplit,
    TensorGroups,
    forward_under,
    shard_parameters,
    split_heads,
    split_sequence,
)

# the torch.nn classes of strategies.runnable's replicable modules (the live modules a replicated layer may be)
REPLICABLE = tuple(getattr(nn, path.rpartition(".")[2]) for path in REPLICABLE_MODULES)


def default_device() -> torch.device:
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def parallelize(model: nn.Module, plan: Plan, *, example_inputs: Any = None, graph: LayerGraph | None = None,
                device: torch.device | None = None) -> nn.Module:
    """``model`` made to run ``plan`` on this process group; each rank feeds it its batch chunk
    (``global batch / world size`` samples) and gets that chunk's output. A plan with pipeline
    stages gives this rank's stage instead (``pase.runtime.pipeline.PipelineModel``), which runs
    whole training steps: ``model.pase_step(objective, x0, generator)``.

    ``example_inputs`` (meta tensors at the plan's batch) are needed only for models outside the zoo;
    ``graph`` skips the capture when the caller already has the model's LayerGraph.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise PaseError("parallelize needs a torch.distributed process group: launch with torchrun, or call it "
                        "inside `with pase.distributed(plan) as run:` (run.parallelize(model))")
    world = dist.get_world_size()
    check_world(plan, world)
    graph = graph if graph is not None else model_graph(model, plan, example_inputs)
    check_model(plan, graph)
    if plan.stages:  # this rank's pipeline stage: it runs whole training steps (pase_step), not forwards
        if plan.options.get("block_sharding") is not None:
            raise PaseError("this plan shards blocks one by one inside pipeline stages, which the pipeline runtime "
                            "does not run; re-plan (pipeline plans shard no block)")
        return pipeline_parallelize(model, plan, device=device or default_device(), graph=graph)
    layouts = layer_layouts(plan, graph)
    device = device or default_device()
    model.to(device)
    _broadcast_from_rank0(model)
    blocks = planned_blocks(plan.options, graph)
    reshard = bool(plan.options.get("reshard", True))  # False: ZeRO-2, the gathered weights kept for the backward
    fsdp = bool(plan.options.get("fsdp"))
    per_block = planned_sharding(plan.options, graph) if fsdp and plan.options.get("block_sharding") is not None \
        else None  # each block sharded as the plan chose it
    sharding = "sharded blocks" if per_block is not None else "fsdp" if reshard else "zero2"
    dtype = GRADIENT_DTYPES[plan.precision]
    if is_pure_data_parallel(layouts):
        apply_checkpointing(model, blocks)  # inside the DDP / FSDP wrapping: the module tree is unchanged
        if world == 1 and not fsdp:  # nothing to synchronise, and DDP's hooks and buckets cost 14-32% of an H200
            model.pase_layout = ParallelLayout("single", world, layouts, checkpointed=blocks)  # SD-1.5 step
            return model
        if per_block is not None:  # FSDP2 on the blocks the plan shards, the others' gradients all-reduced
            whole = shard_blocks(model, per_block, device.type, world, dtype)
            model.pase_sync = GradientSync.install(model, world, dtype=dtype, only=whole)
            result = model
        else:
            result = apply_fsdp(model, device, plan.precision, reshard) if fsdp else apply_ddp(model, device,
                                                                                               plan.precision)
        result.pase_layout = ParallelLayout(sharding if fsdp else "ddp", world, layouts, checkpointed=blocks)
        return result
    result = _apply_tensor_layouts(model, layouts, device, world, plan.precision, sync=not fsdp)
    if fsdp:  # FSDP2 on each module with parameters, a split module's over its data-parallel peers
        whole = shard_parameters(result, device.type, world, plan.precision, reshard, per_block)
        result.pase_sync = GradientSync.install(result, world, dtype=dtype, only=whole)
        result.pase_layout.kind = f"{sharding}+tensor"
    # last: a block's forward that a split replaced (head-split attention) is what recomputes, collectives included
    result.pase_layout.checkpointed = apply_checkpointing(result, blocks)
    return result


def _broadcast_from_rank0(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            dist.broadcast(tensor.data, src=0)


def _apply_tensor_layouts(model: nn.Module, layouts: list[LayerLayout], device: torch.device,
                          world: int, precision: str, sync: bool = True) -> nn.Module:
    degrees = sorted({layout.factor for layout in layouts
                      if layout.kind not in ("batch", "grid", "outspatial") and layout.replicas == 1})
    groups = {t: TensorGroups.build(device.type, world, t) for t in degrees}  # same order on every rank
    grids = {(t, u): GridGroups.build(device.type, world, t, u)
             for t, u in sorted({(layout.factor, layout.inner) for layout in layouts if layout.kind == "grid"})}
    cells = {(f, s): OutSpatialGroups.build(device.type, world, f, s)
             for f, s in sorted({(layout.factor, layout.inner) for layout in layouts if layout.kind == "outspatial"})}
    replica_splits = {(f, r): ReplicaSplitGroups.build_replicas(device.type, world, f, r)
                      for f, r in sorted({(layout.factor, layout.replicas) for layout in layouts
                                          if layout.replicas > 1})}
    modes = []
    for layout in layouts:
        if layout.kind == "batch":
            continue
        module = model.get_submodule(layout.module)
        if layout.kind == "heads":
            modes.append((layout.layer, split_heads(module, groups[layout.factor], layout.kept_inputs,
                                                    layout.keep_output)))
            continue
        if layout.kind == "seq":
            modes.append((layout.layer, split_sequence(module, groups[layout.factor])))
            continue
        if layout.kind == "replicated":
            if layout.op == "attention":
                modes.append((layout.layer, forward_under(module, ReplicatedAttention(groups[layout.factor]),
                                                          "replicas")))
            else:
                _expect(module, REPLICABLE, layout, "replicas")
                replicate_module(module, groups[layout.factor])
            continue
        parent_name, _, child = layout.module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if layout.kind == "spatial":
            assert layout.axis is not None
            _expect(module, (nn.Conv2d, nn.GroupNorm), layout, "a spatial split")
            spatial = SpatialConv if isinstance(module, nn.Conv2d) else SpatialGroupNorm
            setattr(parent, child, spatial(module, layout.axis, groups[layout.factor].tp))
            continue
        if layout.kind == "norm":
            _expect(module, (nn.LayerNorm,), layout, "a channel-split layer norm")
            setattr(parent, child, ChannelLayerNorm(module, groups[layout.factor]))
            continue
        if layout.kind == "local":  # elementwise ops compute on whatever channel part reaches them
            if layout.op == "group_norm":
                _expect(module, (nn.GroupNorm,), layout, "a channel-split group norm")
                setattr(parent, child, ChannelGroupNorm(module, groups[layout.factor]))
            continue
        if layout.kind == "outspatial":
            assert layout.axis is not None
            _expect(module, (nn.Conv2d,), layout, "an output channel x row split")
            setattr(parent, child, OutSpatialConv(module, layout.axis, cells[layout.factor, layout.inner]))
            continue
        _expect(module, (nn.Conv2d, nn.Linear), layout, f"a {layout.kind}-channel split")
        if layout.kind == "grid":
            setattr(parent, child, GridSplit(module, grids[layout.factor, layout.inner]))
            continue
        if layout.replicas > 1:  # an out-split on replica groups: its output part leaves through parts_to_chunk
            split_groups = replica_splits[layout.factor, layout.replicas]
            split = ChannelSplit(module, "out", split_groups, keep_output=True)
            channel = 1 if isinstance(module, nn.Conv2d) else -1
            setattr(parent, child, replicate_split(split, split_groups, channel))
            continue
        setattr(parent, child, ChannelSplit(module, layout.kind, groups[layout.factor], layout.keep_output,
                                            layout.kept_input, layout.gated))
    if sync:  # (under FSDP its reduce-scatters sum the gradients instead)
        model.pase_sync = GradientSync.install(model, world, dtype=GRADIENT_DTYPES[precision])
    model.pase_layout = ParallelLayout("tensor", world, layouts,
                                       sorted({*degrees, *(t * u for t, u in grids), *(f * s for f, s in cells),
                                               *(f * r for f, r in replica_splits)}))
    model.pase_head_modes = modes
    return model


def _expect(module: nn.Module, classes: tuple[type[nn.Module], ...], layout: LayerLayout, planned: str) -> None:
    """A plan made for another model's module tree fails here, by name, instead of running some other way."""
    if not isinstance(module, classes):
        expected = " or ".join(cls.__name__ for cls in classes)
        raise PaseError(f"layer {layout.layer} is planned as {planned} but module {layout.module!r} is a "
                        f"{type(module).__name__}, not {expected}")


__all__ = ["default_device", "parallelize"]
