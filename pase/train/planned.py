"""``pase train --plan`` / ``pase finetune --plan``: the training jobs run under a plan.

The plan is checked before any work (data, weights) starts: its world size against the processes
launched, its model name, batch and layer-graph fingerprint against the model the job builds. Then
the loop's ``parallelize`` callable becomes ``pase.parallelize`` with that plan (DDP, FSDP2 or
channel/head splits; pipeline stages in ``pase.runtime.pipeline``). Checkpoints hold full tensors
(``pase.runtime.state``), so ``--resume`` works under the plan exactly as without one.

Which strategy runs under which plan kind:
- full (and ``pase train``): every kind;
- deme: every kind but pipelines; the ranges are trained one after another, each on the whole world
  under the plan (the plan describes one fine-tune over all devices); ``--adapters`` add 1x1 layers
  that the plan does not know, which run batch-parallel;
- tuneqdm: data-parallel plans only (its quantized layers have no channel-split, FSDP or pipeline
  runtime, and it trains only per-channel scales, so there is nothing worth sharding).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pase import paths
from pase.errors import PaseError
from pase.graph import LayerGraph, extract_model
from pase.models.folders import looks_like_folder
from pase.models.zoo import ModelSpec, recorded_model, resolve_model
from pase.planning.plan import Plan
from pase.runtime.checks import check_model, check_world, model_graph
from pase.runtime.layout import is_pure_data_parallel, layer_layouts
from pase.runtime.parallel import parallelize
from pase.runtime.pipeline import pipeline_parallelize
from pase.train.distributed import DistEnv
from pase.train.loop import DataGroup, Parallelize

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class PlannedRun:
    """A plan checked against this job and world, with the model's layer graph (captured once)."""
    plan: Plan
    graph: LayerGraph
    image_size: int | None = None  # the job's resolution (a pipeline is traced at it)

    @property
    def kind(self) -> str:
        if self.plan.stages:
            return "pipeline"
        if not is_pure_data_parallel(layer_layouts(self.plan, self.graph)):
            return "tensor"
        return "fsdp" if self.plan.options.get("fsdp") else "dp"

    def parallelize(self, autocast: str | None = None) -> Parallelize:
        """The loop's ``parallelize(model, group)``: the plan applied over the whole world; ``autocast``: the
        loop's (``autocast_for``), which a pipeline is traced under."""
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast or "")
        def apply(model: nn.Module, group: DataGroup) -> nn.Module:
            if group.size != self.plan.devices:
                raise PaseError(f"the plan runs over {self.plan.devices} devices, but this job's data-parallel group "
                                f"has {group.size} processes")
            if self.plan.stages:
                return pipeline_parallelize(model, self.plan, device=group.device, image_size=self.image_size,
                                            graph=self.graph, autocast=amp)

            return parallelize(model, self.plan, graph=self.graph, device=group.device)

        return apply


def load_plan(path: Path) -> Plan:
    if not Path(path).is_file():
        raise PaseError(f"no plan file {path}; write one with `pase plan --model MODEL --cluster local --devices N "
                        f"--json {path}`")
    return Plan.load(path)


def job_model(model: str, plan: Plan | None) -> ModelSpec:
    """The job's model; for a plan of a user's factory (named on the command line: ``job_settings``), built with the
    input shapes the plan recorded."""
    shapes = None
    if plan is not None and recorded_model(model) is None:
        if not plan.input_shapes:
            raise PaseError(f"the plan for {plan.model!r} does not record its input shapes (an older plan file); "
                            "re-plan it with `pase plan --model ... --input-shape ...`")
        shapes = [tuple(shape) for shape in plan.input_shapes]
    return resolve_model(model, shapes)


def job_settings(plan: Plan, model: str | None, batch: int | None) -> tuple[str, int]:
    """The model and global batch a planned job runs: the plan's, and explicit options must agree with them. A plan
    for a user's ``package.module:factory`` runs only when the command line names that factory too: a plan file
    never makes pase import code."""
    if model is not None and looks_like_folder(model) and ":" not in model:
        model = str(paths.expanded(model).resolve())  # a folder, however it is written
    if model is None and recorded_model(plan.model) is None:
        raise PaseError(f"the plan is for the model factory {plan.model!r}: a plan file never makes pase import code, "
                        f"so name it yourself, `--model {plan.model}`, to run it")
    if model is not None and model != plan.model:
        raise PaseError(f"the plan was made for model {plan.model!r}, not {model!r}; drop --model or re-plan with "
                        f"`pase plan --model {model} ...`")
    if batch is not None and batch != plan.batch:
        raise PaseError(f"the plan was made for a global batch of {plan.batch}, not {batch}; drop --batch or re-plan "
                        f"with `pase plan --batch {batch} ...`")
    return plan.model, plan.batch


def check_plan(plan: Plan, env: DistEnv, spec: ModelSpec, strategy: str) -> PlannedRun:
    """Refuse a plan for another world size, model or strategy before any work starts."""
    check_world(plan, env.world)
    if spec.family != "user":  # a zoo or folder config: its graph comes from the on-disk graph cache
        graph = extract_model(spec.name, plan.micro_batch, use_cache=True)
    else:
        with torch.device("meta"):
            graph = model_graph(spec.build(), plan)
    check_model(plan, graph)
    run = PlannedRun(plan, graph)
    kind = run.kind
    if strategy == "tuneqdm" and kind != "dp":
        raise PaseError(f"TuneQDM cannot run under a {kind} plan: its quantized layers have no channel-split, FSDP or "
                        "pipeline runtime, and it trains only per-channel scales; use a data-parallel plan "
                        "(`pase plan --only dp`)")
    if strategy == "deme" and kind == "pipeline":
        raise PaseError("DeMe cannot run under a pipeline plan (its consistency loss needs the frozen model's "
                        "prediction for every microbatch); use a dp, fsdp or tensor plan")
    return run


def autocast_for(precision: str, device: torch.device, plan: Plan | None) -> str | None:
    """The loop's autocast: bf16 on GPUs (unless fp32 is asked for, or the plan is fp32 or fp16); none on CPU.
    fp16 (with a dynamic loss scale, ``pase.train.loss_scale``) when asked for, or on GPUs for an fp16 plan;
    it runs on the CPU too (torch autocasts fp16 there), slowly, which is how it is tested."""
    if precision not in PRECISIONS:
        raise PaseError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16":
        return "fp16"
    if precision == "bf16" and device.type != "cuda":
        raise PaseError("--precision bf16 (autocast) runs on GPUs only; this process trains on the CPU in fp32 "
                        "(use --precision auto or fp32)")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto" and plan is not None and plan.precision in ("fp32", "fp16"):
        return None if plan.precision == "fp32" else "fp16"
    return "bf16"


__all__ = ["PRECISIONS", "PlannedRun", "autocast_for", "check_plan", "job_model", "job_settings", "load_plan"]
