"""Model -> LayerGraph: capture (meta_trace, torch.export or symbolic_trace) and group ops into layers.

``extract(model, example_inputs)`` works on any module; ``extract_model(name)`` builds a zoo
model on the meta device first, so SD-size UNets are captured without allocating weights.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from pase.errors import InputShapeError
from pase.graph import cache
from pase.graph.build import build_layer_graph
from pase.graph.capture import CAPTURE_METHODS, capture, quiet_torch_logs
from pase.graph.ir import OpGraph
from pase.graph.layer_graph import SCHEMA_VERSION, LayerGraph
from pase.graph.rescale import with_batch
from pase.models.zoo import resolve_model

__all__ = ["CAPTURE_METHODS", "SCHEMA_VERSION", "LayerGraph", "extract", "extract_model", "layer_graph_of"]


def extract(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    example_kwargs: dict[str, Any] | None = None,
    *,
    method: str = "auto",
    name: str | None = None,
) -> LayerGraph:
    """Capture ``model(*example_inputs, **example_kwargs)`` and group it into a ``LayerGraph``.

    Pass meta-device inputs (and a meta model) to avoid any real compute. ``method`` is
    "auto" (meta_trace, then torch.export, then symbolic_trace) or one of ``CAPTURE_METHODS``.
    """
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    started = time.perf_counter()
    op_graph = capture(model, args, example_kwargs, method)
    return layer_graph_of(op_graph, model, args, example_kwargs, name=name, started=started)


def layer_graph_of(
    op_graph: OpGraph,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    name: str | None = None,
    started: float | None = None,
) -> LayerGraph:
    """Group a captured ``OpGraph`` of ``model(*args, **kwargs)`` into a ``LayerGraph`` (``extract`` after capture).

    ``started`` is the ``time.perf_counter()`` at which the capture began, for ``capture_seconds``.
    """
    started = time.perf_counter() if started is None else started
    tensors = [t for t in (*args, *_flat_values(kwargs or {})) if isinstance(t, torch.Tensor)]
    batch = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    info = {
        "model": name or type(model).__name__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "capture": op_graph.method,
        "batch": batch,
        "dtype": str(floats[0] if floats else torch.float32).replace("torch.", ""),
        "inputs": {op.attrs.get("input", op.name): list(meta.shape) for op in op_graph.ops
                   if op.op == "input" and (meta := op.tensor_out) is not None},
        "model_param_count": sum(p.numel() for p in model.parameters()),
    }
    graph = build_layer_graph(op_graph, model, info)
    graph.graph["capture_seconds"] = round(time.perf_counter() - started, 3)
    layer_graph = LayerGraph(graph)
    graph.graph.update(flops_fwd=layer_graph.total("flops_fwd"), flops_bwd=layer_graph.total("flops_bwd"),
                       param_count=layer_graph.param_count)
    return layer_graph


def extract_model(
    name: str,
    batch: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    method: str = "auto",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    user_input_shapes: list[tuple[int, ...]] | None = None,
    use_cache: bool = False,
    refresh_cache: bool = False,
) -> LayerGraph:
    """Build a zoo model (a diffusers folder's, or ``module:factory``) on the meta device and extract its graph.

    ``use_cache`` reads and writes the on-disk graph cache (zoo and folder models, keyed by their config; see
    ``cache``);
    ``refresh_cache`` captures again and overwrites the entry. Without input-shape overrides the
    entry serves every batch: a graph cached at one batch is rescaled (``rescale.with_batch``).
    """
    spec = resolve_model(name, user_input_shapes)
    name = spec.name  # a folder by its absolute path: what plans record
    cacheable = use_cache and spec.family != "user"  # zoo and folder models are built from their config alone
    # overrides whose first extent is the batch (a resolution, a text length) key the entry without it: it serves
    # every batch, as the model's own shapes do
    batch_free: dict[str, tuple[int | str, ...]] | None = None
    if input_shapes and batch is not None and all(len(v) and v[0] == batch for v in input_shapes.values()):
        batch_free = {k: ("B", *v[1:]) for k, v in input_shapes.items()}
    any_batch = cacheable and (not input_shapes or batch_free is not None)
    keyed: dict[str, tuple[int | str, ...]] | None = batch_free if batch_free is not None else \
        {k: tuple(v) for k, v in (input_shapes or {}).items()}
    key = cache.cache_key(name, spec.config, "any" if any_batch else batch, dtype, method, keyed or None) \
        if cacheable else None
    if key is not None and not refresh_cache and (hit := cache.load(key)) is not None:
        wanted = batch if batch is not None else spec.default_batch
        rescaled = with_batch(hit, wanted) if any_batch else hit
        if rescaled is not None:
            return rescaled
    if spec.family == "user" and input_shapes:
        raise InputShapeError(f"{name!r} is your own model: give its --input-shape values positionally, in "
                              f"forward()'s argument order (e.g. --input-shape 8,3,32,32), not as name=shape")
    if spec.family != "user" and user_input_shapes:
        raise InputShapeError(
            f"{name!r} is a zoo model with named inputs; override one as name=shape, e.g. --input-shape "
            f"{spec.inputs[0].name}={','.join(str(d if d != 'B' else 8) for d in spec.inputs[0].shape)}")
    with torch.device("meta"):
        model = spec.build()
    if any(p.dtype != dtype for p in model.parameters()):
        with quiet_torch_logs():  # diffusers warns about fp32-only modules even when there are none
            model = model.to(dtype)
    args, kwargs = spec.example_inputs(batch, dtype=dtype, device="meta", shapes=input_shapes)
    graph = extract(model, args, kwargs, method=method, name=name)
    if key is not None and (not any_batch or graph.batch >= 2):  # batch 1 cannot be rescaled (see rescale)
        cache.store(key, graph)
    return graph


def _flat_values(mapping: dict[str, Any]) -> list[Any]:
    values: list[Any] = []
    for value in mapping.values():
        values.extend(_flat_values(value) if isinstance(value, dict) else [value])
    return values
