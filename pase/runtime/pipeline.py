"""Pipeline stages of a plan, run with ``torch.distributed.pipelining`` (GPipe or 1F1B).

``pipeline_parallelize(model, plan)`` traces the model (``pipeline()``, torch.export underneath)
with a split point at the first module of every stage after the first, builds this rank's stage
and the plan's schedule. Every tensor that crosses a boundary (the main path, the time embedding,
the decoder's skip tensors) becomes an output of one stage and an input of the next: the split
graph carries them. Two things the tracer needs on this torch (reference/cpu_feasibility.md 4c):
stage outputs are made contiguous (gloo's send rejects strided views), and stage 0's inputs are
fed in the order the stage module declares them (first use, not the signature's order).

A training step is ``model.pase_step(objective, x0, generator)``: the objective's ``prepare``
draws the step's inputs and target (the same random numbers as its plain call), the schedule runs
forward and backward over the microbatches (gradients are the mean over microbatches, i.e. the
global batch's), and the last stage's loss is broadcast so every rank reports the same value.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pase.errors import PaseError
from pase.plans import Plan


class _Prediction(nn.Module):
    """The model as ``(sample, timestep) -> prediction tensor`` (the pipeline tracer needs plain tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = self.model(sample, timestep)
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

    def __init__(self, stage_module: nn.Module, stage: Any, schedule: Any, index: int, stages: int,
                 input_order: list[int], names: dict[str, str]) -> None:
        super().__init__()
        self.stage_module = stage_module
        self.stage, self.schedule = stage, schedule
        self.index, self.stages = index, stages
        self.input_order = input_order
        self.original_names = names  # stage parameter name -> the model's parameter name
        self.criterion: Any = None  # the objective's per-microbatch loss, set by each step
        self.pase_data_parallel = (0, 1)  # one pipeline replica: every rank sees the whole global batch

    @property
    def last_rank(self) -> int:
        return self.stages - 1

    def pase_step(self, objective: Any, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        prepare, criterion = getattr(objective, "prepare", None), getattr(objective, "criterion", None)
        if prepare is None or criterion is None:
            raise PaseError("this training objective cannot run in pipeline stages (it has no prepare/criterion "
                            "split); use a dp, fsdp or tensor plan")
        inputs, target = prepare(x0, generator)
        self.criterion = criterion
        losses: list[torch.Tensor] = []
        if self.index == 0:
            self.schedule.step(*[inputs[i] for i in self.input_order])
        elif self.index == self.last_rank:
            self.schedule.step(target=target, losses=losses)
        else:
            self.schedule.step()
        loss = torch.stack([v.detach().float() for v in losses]).mean() if losses else \
            torch.zeros((), device=x0.device)
        dist.broadcast(loss, src=self.last_rank)
        return loss

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise PaseError("a pipeline stage runs whole training steps (pase_step), not single forwards")


def pipeline_parallelize(model: nn.Module, plan: Plan, *, device: torch.device, example_inputs: tuple | None = None,
                         batch: int | None = None, image_size: int | None = None) -> PipelineModel:
    """This rank's stage of ``plan``'s pipeline over the world (one pipeline replica, one rank per stage).

    ``example_inputs``: ``(sample, timestep)`` of one microbatch for the tracer (default: the zoo
    model's inputs at the plan's microbatch size).
    """
    from torch.distributed.pipelining import SplitPoint, pipeline
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe

    from strategies.pipeline import check_schedule

    world, rank = dist.get_world_size(), dist.get_rank()
    if plan.pipeline_replicas != 1 or len(plan.stages) != world:
        raise PaseError(f"the plan has {len(plan.stages)} stages x {plan.pipeline_replicas} replicas; the pipeline "
                        f"runtime runs one replica with one process per stage ({world} here): re-plan with "
                        f"`pase plan --only pipeline --devices {world}`")
    for index, stage in enumerate(plan.stages):
        if stage.devices != [index]:
            raise PaseError(f"pipeline stage {index} is planned on devices {stage.devices}; the runtime puts stage i "
                            f"on rank i")
    schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[check_schedule(plan.schedule or "1f1b")]
    batch = batch or plan.batch
    microbatches = plan.microbatches
    if batch % microbatches:
        raise PaseError(f"the global batch {batch} does not split into the plan's {microbatches} microbatches")
    model.to(device)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            dist.broadcast(tensor.data, src=0)
    if example_inputs is None:
        example_inputs = _zoo_inputs(plan, batch // microbatches, device, image_size)
    original = {id(p): name for name, p in model.named_parameters()}
    wrapper = _Prediction(model)
    points = {f"model.{name}": SplitPoint.BEGINNING for name in split_points(plan, model)}
    pipe = pipeline(wrapper, mb_args=tuple(t.contiguous() for t in example_inputs), split_spec=points)
    if pipe.num_stages != world:
        raise PaseError(f"splitting the model at {list(points)} gave {pipe.num_stages} stages, not {world}")
    stage_module = pipe.get_stage_module(rank)
    _contiguous_outputs(stage_module)
    placeholders = [n.name for n in pipe.get_stage_module(0).graph.nodes if n.op == "placeholder"]
    order = [0 if "sample" in name else 1 for name in placeholders]
    if sorted(order) != [0, 1]:
        raise PaseError(f"stage 0 of the traced pipeline takes {placeholders}, not (sample, timestep)")
    stage = pipe.build_stage(rank, device)
    holder: list[PipelineModel] = []
    schedule = schedule_class(stage, n_microbatches=microbatches,
                              loss_fn=lambda output, target: holder[0].criterion(output, target))
    names = {name: original.get(id(param), name) for name, param in stage_module.named_parameters()}
    result = PipelineModel(stage_module, stage, schedule, rank, world, order, names)
    holder.append(result)
    model.pase_pipeline = result  # so full_state_dict(model) gathers the stages' weights, not this rank's stale copy
    result.pase_layout = _layout(plan, world)
    return result


def _zoo_inputs(plan: Plan, microbatch: int, device: torch.device, image_size: int | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    from pase.models.zoo import ZOO

    if plan.model not in ZOO:
        raise PaseError(f"{plan.model!r} is not a zoo model: pass example_inputs=(sample, timestep) of one microbatch")
    args, _ = ZOO[plan.model].example_inputs(microbatch, device="cpu")
    shape = tuple(args[0].shape[:-2]) + ((image_size, image_size) if image_size else tuple(args[0].shape[-2:]))
    sample = torch.randn(shape, device=device)
    return sample, torch.randint(0, 1000, (microbatch,), device=device)


def _layout(plan: Plan, world: int) -> Any:
    from pase.runtime.parallel import ParallelLayout

    layout = ParallelLayout("pipeline", world)
    layout.summary = lambda: (f"pipeline of {len(plan.stages)} stages ({plan.schedule}, {plan.microbatches} "  # type: ignore[method-assign]
                              f"microbatches) over {world} ranks")
    return layout


__all__ = ["PipelineModel", "pipeline_parallelize", "split_points"]
