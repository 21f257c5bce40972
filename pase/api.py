"""The Python API: plan a model you hold, with the same search and cost model as `pase plan`."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cost_models.cluster import Cluster
from cost_models.local import target_cluster
from cost_models.rates import profile_mismatch
from pase.errors import PaseError
from pase.graph import extract
from pase.planning import Plan, PlanOptions, make_plan


def plan(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    example_kwargs: dict[str, Any] | None = None,
    *,
    cluster: Any = "8xH100-SXM",
    batch: int | None = None,
    profile: dict[str, Any] | str | Path | None = None,
    devices: int | None = None,
    **options: Any,
) -> Plan:
    """Plan ``model`` on ``cluster`` (a spec string, a system-file path, "local" for this machine with ``devices``
    GPUs or gloo processes, as ``pase plan --cluster local --devices N``, or a ``Cluster``).

    ``example_inputs`` fix the shapes (use meta tensors for big models). ``batch`` replaces the
    leading (batch) dimension of every input that has the examples' batch size, so one example
    serves any global batch. ``options`` are ``PlanOptions`` fields (precision, fsdp,
    checkpointing, only, memory_fraction, space, force) and ``micro_steps`` (gradient accumulation: a count;
    default searched, as ``pase plan --micro-steps auto``). Returns a ``pase.planning.plan.Plan``.
    """
    micro_steps = options.pop("micro_steps", None)
    allowed = {f.name for f in fields(PlanOptions)} - {"micro_steps"}
    unknown = set(options) - allowed
    if unknown:
        raise PaseError(f"unknown plan option(s) {sorted(unknown)}; choose from {sorted(allowed)}")
    if isinstance(cluster, Cluster):
        target, measured, precision = cluster, None, "bf16"
        if devices is not None:
            raise PaseError("devices= goes with cluster='local'; a Cluster already says how many devices")
    else:
        path = profile if isinstance(profile, (str, Path)) else None
        target, measured, precision = target_cluster(str(cluster), devices, path)
    if isinstance(profile, dict):
        measured = profile
    options.setdefault("precision", precision)
    if measured is not None and (reason := profile_mismatch(target, measured)):
        raise PaseError(reason)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    if batch is not None:
        args, kwargs = _with_batch(args, kwargs, batch)
    graph = extract(model, args, kwargs)
    return make_plan(graph, target, profile=measured, options=PlanOptions(**options), micro_steps=micro_steps)[0]


def _with_batch(args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    tensors = [t for t in _flatten((*args, *kwargs.values())) if isinstance(t, torch.Tensor) and t.dim()]
    if not tensors:
        raise PaseError("batch= needs at least one tensor input whose first dimension is the batch")
    old = tensors[0].shape[0]

    def resize(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == old:
            return torch.zeros((batch, *value.shape[1:]), dtype=value.dtype, device="meta")
        if isinstance(value, dict):
            return {k: resize(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(resize(v) for v in value)
        return value

    return tuple(resize(a) for a in args), {k: resize(v) for k, v in kwargs.items()}


def _flatten(values: Any) -> list[Any]:
    if isinstance(values, dict):
        values = list(values.values())
    if isinstance(values, (list, tuple)):
        return [leaf for value in values for leaf in _flatten(value)]
    return [values]
