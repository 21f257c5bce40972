"""Before any work: is this plan for this model and this world? (Refused with a clear message if not.)"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
from torch import nn

from pase.errors import PaseError
from pase.graph import LayerGraph, extract
from pase.models.zoo import recorded_model, resolution_inputs
from pase.planning.plan import Plan


class PlanMismatch(PaseError):
    """A plan made for another model, batch or world size than the one at hand."""
def check_world(plan: Plan, world_size: int) -> None:
    if plan.devices != world_size:
        replan = "run without --plan (one process has nothing to split)" if world_size == 1 else \
            f"re-plan with `pase plan --devices {world_size}`"
        raise PlanMismatch(
            f"the plan was made for {plan.devices} devices but this run has {world_size} processes; launch "
            f"`torchrun --nproc-per-node {plan.devices} ...` or {replan}")
    if not plan.stages and plan.micro_batch % world_size:  # a pipeline splits it by replicas and microbatches
        raise PlanMismatch(f"the plan's global batch {plan.micro_batch} per micro-step does not split over "
                           f"{world_size} processes; re-plan with a --batch divisible by {world_size}")


def example_inputs_for(plan: Plan, example_inputs: Any = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs the plan's graph was captured with: zoo models know theirs, user factories' plans record their
    shapes; other models pass them."""
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            return (example_inputs,), {}
        if isinstance(example_inputs, dict):
            return (), example_inputs
        return tuple(example_inputs), {}
    spec = recorded_model(plan.model)
    if spec is None and plan.input_shapes:  # a user factory's plan records the shapes it was captured with
        return tuple(torch.zeros(shape, device="meta") for shape in plan.input_shapes), {}
    if spec is None:
        raise PaseError(f"the plan is for {plan.model!r}, which is neither a zoo model nor a diffusers folder: pass "
                        f"example_inputs= (meta tensors at the plan's batch per micro-step, {plan.micro_batch}) so "
                        "pase can check the model matches the plan")
    return planned_inputs(plan, spec, plan.micro_batch)


def planned_inputs(plan: Plan, spec: Any, batch: int, device: str = "meta") -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``spec``'s example inputs at ``batch``, at the resolution and prompt length the plan was made for."""
    shapes = resolution_inputs(spec, batch, plan.options.get("resolution"), plan.options.get("text_length"))
    return spec.example_inputs(batch, device=device, shapes=shapes or None)


def meta_copy(model: nn.Module) -> nn.Module:
    """The model's structure on the meta device, without copying its weights."""
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def model_graph(model: nn.Module, plan: Plan, example_inputs: Any = None) -> LayerGraph:
    args, kwargs = example_inputs_for(plan, example_inputs)
    return extract(meta_copy(model), args, kwargs, name=plan.model)


def check_model(plan: Plan, graph: LayerGraph) -> None:
    found = graph.fingerprint()
    if found != plan.model_fingerprint:
        raise PlanMismatch(
            f"the plan was made for another model: {plan.model} (fingerprint {plan.model_fingerprint}, batch "
            f"{plan.micro_batch}), but this model's layer graph at batch {plan.micro_batch} has fingerprint {found}; "
            "re-plan for this model with `pase plan --model ...` (same config and batch)")
    missing = [layer.id for layer in plan.layers if layer.id not in graph.graph]
    if missing:
        raise PlanMismatch(f"the plan names layers this model lacks ({', '.join(missing[:5])}); re-plan it")
    counts = Counter(layer.id for layer in plan.layers)
    twice = sorted(layer_id for layer_id, count in counts.items() if count > 1)
    if twice:
        raise PlanMismatch(f"the plan gives layer(s) {', '.join(twice[:5])} more than one configuration; re-plan it")
    absent = [layer_id for layer_id, _ in graph.layers() if layer_id not in counts]
    if absent:
        raise PlanMismatch(f"the plan covers {len(counts)} of the model's {len(counts) + len(absent)} layers (no "
                           f"configuration for {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}); re-plan it")
    for layer in plan.layers:
        dims = graph[layer.id]["dims"]
        unknown = sorted(set(layer.splits) - set(dims))
        if unknown:
            raise PlanMismatch(f"the plan splits layer {layer.id} along {', '.join(unknown)}, which it does not have "
                               f"(its dimensions: {', '.join(dims)}); re-plan it")
        uneven = [(d, int(f)) for d, f in layer.splits.items() if int(f) > 1 and int(dims[d]) % int(f)]
        if uneven:
            d, f = uneven[0]
            raise PlanMismatch(f"the plan splits layer {layer.id}'s {d} ({dims[d]}) {f} ways, into unequal parts; "
                               "re-plan it")


__all__ = ["PlanMismatch", "check_model", "check_world", "example_inputs_for", "meta_copy", "model_graph",
           "planned_inputs"]
