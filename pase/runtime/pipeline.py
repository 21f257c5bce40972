"""Pipeline stages of a plan, run with ``torch.distributed.pipelining`` (GPipe or 1F1B).

``pipeline_parallelize(model, plan)`` traces the model (``pipeline()``, torch.export underneath)
with a split point at the first module of every stage after the first, builds this rank's stage
and the plan's schedule. Every tensor that crosses a boundary (the main path, the time embedding,
the decoder's skip tensors) becomes an output of one stage and an input of the next: the split
graph carries them. Two things the tracer needs on torch 2.13:
stage outputs are made contiguous (gloo's send rejects strided views), and stage 0's inputs are
fed in the order the stage module declares them (first use, not the signature's order).

Pipeline x data parallel: the ranks form a (replicas x stages) mesh (``pipeline_mesh``): replica
``j``'s stage ``s`` runs on the ``j``-th rank of the plan's stage ``s``. That covers both forms the
planner writes: ``pipeline_replicas`` copies of the pipeline (replica ``r`` on ranks ``[r S, (r+1) S)``)
and stages on groups of devices that only split the batch (stage ``s`` on ranks ``[s g, (s+1) g)``),
which are the same computation. Each replica has a process group over its stages (the schedule's
point-to-point sends) and each stage one over its replicas (gradient averaging). Anything it would
run otherwise than planned is refused before any work, in one line naming the stage
(``pase.planning.pipeline.pipeline_problem``): stages on unequal groups, a stage group whose layers
split anything but the batch over the whole group, 1F1B with fewer microbatches than stages.

A plan made with ``--checkpoint`` has the blocks of this rank's stage (the traced stage module keeps
the model's module tree under ``model.``) run under activation checkpointing (``strategies.checkpointing``).

Mixed precision: torch.export fixes every tensor's dtype in the traced stages (and the buffers each stage
receives into), so the model is traced under the autocast its steps will run under: ``autocast`` (default:
the plan's precision on a GPU, none on the CPU). The activations then cross stage boundaries in that
precision, as the plan priced them, and a step run under another autocast is refused in one line.

A training step is ``model.pase_step(objective, x0, generator)`` with ``x0`` this replica's share
of the global batch (every rank of a replica passes the same ``x0`` and generator): the objective's
``prepare`` draws the step's inputs and target (the same random numbers as its plain call), the
schedule runs forward and backward over the microbatches (gradients are the mean over
microbatches), the gradients are averaged over the replicas (so they are the global batch's), and
the loss of the global batch is returned on every rank.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pase.errors import PaseError
from pase.graph import LayerGraph
from pase.models.zoo import recorded_model
from pase.planning.pipeline import pipeline_problem
from pase.planning.plan import Plan
from pase.runtime.checks import check_model, check_world, model_graph
from pase.runtime.layout import LayerLayout, ParallelLayout
from strategies.checkpointing import apply_checkpointing, planned_blocks
from strategies.data import GRADIENT_DTYPES, average_gradients
from strategies.pipeline import check_schedule

# the inputs a text-conditioned UNet takes after (sample, timestep), in the order stage 0 is fed them (a model takes a
# prefix of them: none, the text embeddings, or SDXL's three); ``text_embeds`` and ``time_ids`` go in added_cond_kwargs
CONDITIONING = ("encoder_hidden_states", "text_embeds", "time_ids")


class _Prediction(nn.Module):
    """The model as ``(sample, timestep, *conditioning) -> prediction tensor`` (the pipeline tracer needs plain
    tensors)."""
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        # copied in stage 0, so that a later stage's cross-attention receives the text from the stage before it
        # (torch's pipelining feeds the model's own inputs to stage 0 only)
        if encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = encoder_hidden_states.clone()
        if text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds.clone(),
                                           "time_ids": None if time_ids is None else time_ids.clone()}
        out = self.model(sample, timestep, **kwargs)
        return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out


def split_points(plan: Plan, model: nn.Module) -> list[str]:
    """The module each stage after the first begins with (the plan's stage blocks are module paths)."""
    modules = dict(model.named_modules())
    points = []
    for index, stage in enumerate(plan.stages[1:], start=1):
        first = next((block for block in stage.blocks if block in modules), None)
        if first is None or first != stage.blocks[0]:
            raise PaseError(f"pipeline stage {index} of the plan begins with {stage.blocks[0]!r}, which is not a "
                            "module of this model, so there is no place to split it; re-plan with `pase plan --only "
                            "pipeline`")
        points.append(first)
    return points


@dataclass(frozen=True)
class PipelineMesh:
    """``ranks[j][s]``: the rank running stage ``s`` of pipeline replica ``j``."""
    ranks: tuple[tuple[int, ...], ...]

    @property
    def replicas(self) -> int:
        return len(self.ranks)

    @property
    def stages(self) -> int:
        return len(self.ranks[0])

    def position(self, rank: int) -> tuple[int, int]:
        """(replica, stage) of ``rank``."""
        for replica, row in enumerate(self.ranks):
            if rank in row:
                return replica, row.index(rank)
        raise PaseError(f"rank {rank} runs no stage of the plan's pipeline")

    def stage_ranks(self, stage: int) -> list[int]:
        return [row[stage] for row in self.ranks]


def pipeline_mesh(plan: Plan, graph: LayerGraph | None = None) -> PipelineMesh:
    """The (replicas x stages) mesh of ``plan``'s stages, or a one-line refusal of what the runtime would run
    otherwise than planned (``pase.planning.pipeline.pipeline_problem``): stages on unequal groups, a stage
    group whose layers split anything but the batch over the whole group (``graph`` gives the layers'
    roles; the group's devices are replicas of the stage), or fewer 1F1B microbatches than stages."""
    if not plan.stages:
        raise PaseError("the plan has no pipeline stages; run it with pase.parallelize")
    problem = pipeline_problem(plan, graph)
    if problem is not None:
        raise PaseError(f"{problem}; re-plan with `pase plan --only pipeline` (its default space is what the "
                        "runtime runs)")
    rows = tuple(tuple(stage.devices[j] for stage in plan.stages) for j in range(len(plan.stages[0].devices)))
    return PipelineMesh(rows)


def _process_groups(mesh: PipelineMesh, rank: int) -> tuple[Any, Any]:
    """(this rank's replica group over its stages, its stage's group over the replicas); None: the world or
    nothing. Every rank creates every group, in the same order (new_group is collective)."""
    if mesh.replicas == 1:
        return None, None
    pipeline_group = replica_group = None
    for row in mesh.ranks:
        group = dist.new_group(list(row))
        if rank in row:
            pipeline_group = group
    for stage in range(mesh.stages):
        ranks = mesh.stage_ranks(stage)
        group = dist.new_group(ranks)
        if rank in ranks:
            replica_group = group
    return pipeline_group, replica_group


def _contiguous_outputs(graph_module: torch.fx.GraphModule) -> None:
    """Make every output of a stage contiguous (gloo sends only contiguous tensors)."""
    graph = graph_module.graph
    output = next(node for node in graph.nodes if node.op == "output")

    def wrap(value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            with graph.inserting_before(output):
                node = graph.call_method("contiguous", (value,))
                node.meta = dict(value.meta)
            return node
        if isinstance(value, (tuple, list)):
            return type(value)(wrap(v) for v in value)
        return value

    output.args = (wrap(output.args[0]),)
    graph_module.recompile()


class PipelineModel(nn.Module):
    """This rank's stage of the plan's pipeline (``pase_step`` runs a training step; parameter names are the
    original model's)."""
    def __init__(self, stage_module: nn.Module, stage: Any, schedule: Any, mesh: PipelineMesh, rank: int,
                 input_order: list[int], names: dict[str, str], groups: tuple[Any, Any] = (None, None)) -> None:
        super().__init__()
        self.stage_module = stage_module
        self.stage, self.schedule = stage, schedule
        self.gradient_dtype = torch.float32
        self.mesh = mesh
        self.replica, self.index = mesh.position(rank)
        self.replicas, self.stages = mesh.replicas, mesh.stages
        self.pipeline_group, self.replica_group = groups  # over this replica's stages; over this stage's replicas
        self.input_order = input_order
        self.inputs = len(input_order)  # sample, timestep and the conditioning inputs stage 0 is fed
        self.original_names = names  # stage parameter name -> the model's parameter name
        self.criterion: Any = None  # the objective's per-microbatch loss, set by each step
        self.autocast: torch.dtype | None = None  # the autocast the stages were traced under
        self.device_type = "cpu"
        # the ranks of a replica all see its share of the global batch: they are one data-parallel rank
        self.pase_data_parallel = (self.replica, self.replicas)

    @property
    def last_rank(self) -> int:
        """The last stage's rank in this replica's pipeline group."""
        return self.stages - 1

    def pase_step(self, objective: Any, x0: Any, generator: torch.Generator,
                  conditioning: tuple[torch.Tensor, ...] = (), loss_scale: float = 1.0) -> torch.Tensor:
        """One training step of this replica's share ``x0`` (latents, or the batch a text-to-image objective
        prepares: its ``prepare`` gives the conditioning itself); ``conditioning``: the share's text embeddings
        (and SDXL's pooled embeddings and time ids), in ``CONDITIONING`` order, for stage 0 (the other stages
        ignore them). ``loss_scale``: each microbatch's loss is multiplied by it before its backward (fp16's
        dynamic loss scale; the gradients come out scaled), and the loss returned is divided by it again."""
        running = torch.get_autocast_dtype(self.device_type) if torch.is_autocast_enabled(self.device_type) else None
        if running != self.autocast:
            def name(dtype: torch.dtype | None) -> str:
                return "no autocast" if dtype is None else f"{dtype} autocast"
            raise PaseError(f"this pipeline's stages were traced for {name(self.autocast)} but the step runs under "
                            f"{name(running)}; pass autocast= to pipeline_parallelize as the steps will run")
        prepare, criterion = getattr(objective, "prepare", None), getattr(objective, "criterion", None)
        if prepare is None or criterion is None:
            raise PaseError("this training objective cannot run in pipeline stages (it has no prepare/criterion "
                            "split); use a dp, fsdp or tensor plan")
        drawn, target = prepare(x0, generator)
        inputs = (*drawn, *conditioning)
        if self.index == 0 and len(inputs) != self.inputs:
            raise PaseError(f"stage 0 of this pipeline takes {self.inputs} inputs (sample, timestep and the model's "
                            f"conditioning), not {len(inputs)}: pass the conditioning to pase_step")
        self.criterion = criterion if loss_scale == 1.0 else \
            (lambda output, target: criterion(output, target) * loss_scale)
        losses: list[torch.Tensor] = []
        if self.index == 0:
            self.schedule.step(*[inputs[i] for i in self.input_order])
        elif self.index == self.last_rank:
            self.schedule.step(target=target, losses=losses)
        else:
            self.schedule.step()
        if self.replicas > 1:
            average_gradients(list(self.stage_module.parameters()), self.replica_group, self.replicas,
                              self.gradient_dtype)
        loss = torch.stack([v.detach().float() for v in losses]).mean() / loss_scale if losses else \
            torch.zeros((), device=inputs[0].device)
        dist.broadcast(loss, group=self.pipeline_group, group_src=self.last_rank)
        if self.replicas > 1:  # the global batch's loss: the replicas' shares are equal
            dist.all_reduce(loss, group=self.replica_group)
            loss /= self.replicas
        return loss

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise PaseError("a pipeline stage runs whole training steps (pase_step), not single forwards")


PLAN_AUTOCAST = "plan"  # pipeline_parallelize's default: the plan's precision on a GPU, none on the CPU


def planned_autocast(plan: Plan, device: torch.device) -> torch.dtype | None:
    """The autocast a plan's steps run under by default: its precision on a GPU (fp32: none), none on the CPU."""
    if device.type != "cuda" or plan.precision == "fp32":
        return None
    return torch.float16 if plan.precision == "fp16" else torch.bfloat16


def pipeline_parallelize(model: nn.Module, plan: Plan, *, device: torch.device, example_inputs: tuple | None = None,
                         batch: int | None = None, image_size: int | None = None, graph: LayerGraph | None = None,
                         autocast: torch.dtype | str | None = PLAN_AUTOCAST) -> PipelineModel:
    """This rank's stage of ``plan``'s pipeline (one rank per stage of each pipeline replica).

    ``example_inputs``: ``(sample, timestep, *conditioning)`` of one microbatch for the tracer (default: the
    model's inputs at the plan's microbatch size; conditioning in ``CONDITIONING`` order). ``graph``: the
    model's LayerGraph at the plan's batch; given, the model is checked against the plan (``pase.parallelize``
    always checks); needed when the plan's stages run on groups of devices. ``autocast``: the dtype the steps
    will run under ``torch.autocast`` with (None: none), see the module docstring.
    """
    from torch.distributed.pipelining import SplitPoint, pipeline  # noqa: PLC0415 - 1.5 s; only pipelines need it
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe  # noqa: PLC0415 - as above
    world, rank = dist.get_world_size(), dist.get_rank()
    check_world(plan, world)
    checkpointing = bool(plan.options.get("checkpointing"))
    if graph is None and (_grouped(plan) or checkpointing):  # the layers' roles and blocks tell
        graph = model_graph(model, plan)
    if graph is not None:
        check_model(plan, graph)
    mesh = pipeline_mesh(plan, graph)
    schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[check_schedule(plan.schedule or "1f1b")]
    batch = batch or plan.micro_batch
    microbatches = plan.microbatches
    if batch % (mesh.replicas * microbatches):
        raise PaseError(f"the global batch {batch} does not split into {mesh.replicas} pipeline replica(s) of the "
                        f"plan's {microbatches} microbatches each")
    groups = _process_groups(mesh, rank)
    model.to(device)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            dist.broadcast(tensor.data, src=0)
    if example_inputs is None:
        example_inputs = _zoo_inputs(plan, batch // (mesh.replicas * microbatches), device, image_size)
    original = {id(p): name for name, p in model.named_parameters()}
    wrapper = _Prediction(model)
    points = {f"model.{name}": SplitPoint.BEGINNING for name in split_points(plan, model)}
    with warnings.catch_warnings():  # torch's own tracer trips its LeafSpec deprecation: nothing a user can change
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        amp_dtype = planned_autocast(plan, device) if autocast == PLAN_AUTOCAST else autocast
        assert amp_dtype is None or isinstance(amp_dtype, torch.dtype)
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with amp:  # each tensor's dtype is fixed at the trace: the dtypes the steps will see
            pipe = pipeline(wrapper, mb_args=tuple(t.contiguous() for t in example_inputs), split_spec=points)
    if pipe.num_stages != mesh.stages:
        raise PaseError(f"splitting the model at {list(points)} gave {pipe.num_stages} stages, not {mesh.stages}")
    _, index = mesh.position(rank)
    stage_module = pipe.get_stage_module(index)
    _contiguous_outputs(stage_module)
    checkpointed: list[str] = []
    if checkpointing:  # this stage's blocks, as traced (the stage module keeps the model's module tree)
        assert graph is not None
        mine = {graph[layer_id]["block"] for layer_id in plan.stages[index].layers}
        checkpointed = apply_checkpointing(stage_module, [b for b in planned_blocks(plan.options, graph) if b in mine],
                                           prefix="model.")
    placeholders = [n.name for n in pipe.get_stage_module(0).graph.nodes if n.op == "placeholder"]
    names = ["sample", "timestep", *CONDITIONING[:len(example_inputs) - 2]]
    if sorted(placeholders) != sorted(names):
        raise PaseError(f"stage 0 of the traced pipeline takes {placeholders}, not {names}")
    order = [names.index(name) for name in placeholders]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        stage = pipe.build_stage(index, device, group=groups[0])
    holder: list[PipelineModel] = []
    schedule = schedule_class(stage, n_microbatches=microbatches,
                              loss_fn=lambda output, target: holder[0].criterion(output, target))
    names = {name: original.get(id(param), name) for name, param in stage_module.named_parameters()}
    result = PipelineModel(stage_module, stage, schedule, mesh, rank, order, names, groups)
    result.gradient_dtype = GRADIENT_DTYPES[plan.precision]  # replicas average in the plan's precision (as priced)
    result.autocast, result.device_type = amp_dtype, device.type
    holder.append(result)
    model.pase_pipeline = result  # so full_state_dict(model) gathers the stages' weights, not this rank's stale copy
    result.pase_layout = _layout(plan, mesh, world, checkpointed)
    return result


def _grouped(plan: Plan) -> bool:
    """Do the plan's stages run on more devices than it has pipeline replicas (so they must split only the batch)?"""
    return any(len(stage.devices) > plan.pipeline_replicas for stage in plan.stages)


def _zoo_inputs(plan: Plan, microbatch: int, device: torch.device, image_size: int | None = None,
                ) -> tuple[torch.Tensor, ...]:
    """(sample, timestep, *conditioning) of one microbatch of the plan's model, random."""
    spec = recorded_model(plan.model)
    if spec is None:
        raise PaseError(f"{plan.model!r} is neither a zoo model nor a diffusers folder: pass example_inputs=(sample, "
                        "timestep, ...) of one microbatch")
    check_conditioning(spec)
    args, kwargs = spec.example_inputs(microbatch, device="cpu")
    shape = tuple(args[0].shape[:-2]) + ((image_size, image_size) if image_size else tuple(args[0].shape[-2:]))
    sample = torch.randn(shape, device=device)
    return sample, torch.randint(0, 1000, (microbatch,), device=device), \
        *(torch.randn(t.shape, device=device) for t in conditioning_inputs(args[2:], kwargs))


def conditioning_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """A model's inputs after (sample, timestep), given as its call takes them (positional ``args``, keywords and
    SDXL's ``added_cond_kwargs``), in the order pipeline stage 0 takes them (``CONDITIONING``)."""
    named = {**{k: v for k, v in kwargs.items() if k in CONDITIONING}, **(kwargs.get("added_cond_kwargs") or {})}
    return (*args, *(named[key] for key in CONDITIONING if key in named))


def check_conditioning(spec: Any) -> None:
    """A model runs in pipeline stages when its inputs after (sample, timestep) are a prefix of ``CONDITIONING``."""
    extra = [i.name for i in spec.inputs[2:]]
    if extra != list(CONDITIONING[:len(extra)]):
        raise PaseError(f"{spec.name} takes {', '.join(extra)} after (sample, timestep); pipeline stages feed only "
                        f"{', '.join(CONDITIONING)} (a text-conditioned UNet's); plan it without --pipeline")


def _layout(plan: Plan, mesh: PipelineMesh, world: int, checkpointed: list[str]) -> Any:
    """Every layer of the plan runs as planned (``pipeline_problem`` refused the plan otherwise): whole on its
    stage's devices, or its batch split over a stage group's replicas."""
    layers = [LayerLayout(layer.id, layer.op, "", dict(layer.splits), "batch") for layer in plan.layers]
    layout = ParallelLayout("pipeline", world, layers, checkpointed=checkpointed)
    replicas = f" x {mesh.replicas} replicas" if mesh.replicas > 1 else ""
    recompute = f"; activation checkpointing on {len(checkpointed)} blocks of this stage" if checkpointed else ""
    layout.summary = lambda: (f"pipeline of {mesh.stages} stages{replicas} ({plan.schedule}, {plan.microbatches} "  # type: ignore[method-assign]
                              f"microbatches) over {world} ranks; {len(layers)} of {len(plan.layers)} layers as "
                              f"planned{recompute}")
    return layout


__all__ = ["CONDITIONING", "PipelineMesh", "PipelineModel", "check_conditioning", "conditioning_inputs",
           "pipeline_mesh", "pipeline_parallelize", "planned_autocast", "split_points"]
