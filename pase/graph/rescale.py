"""One captured LayerGraph serves every batch size: rescale its batch dimension instead of capturing again.

Capture costs seconds (SD-1.5: about 5 s of torch.export plus imports) and does not depend on the
batch, but everything batch-proportional in the graph does: the extent of each layer's batch
dimension, FLOPs, pointwise work, output and edge bytes, and the batch axis of every edge shape.
``with_batch`` rewrites exactly those. It refuses (returns None, so the caller captures) when the
graph does not look batch-proportional: a layer whose batch dimension has another extent than
the graph's batch, or a graph captured at batch 1, where a broadcast and a batch axis look alike.
``tests/test_graph.py`` checks the result against real captures at the target batch.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, cast

from pase.graph.attrs import EdgeAttrs, LayerAttrs
from pase.graph.layer_graph import LayerGraph

BATCH_ROLE = "batch"
_PROPORTIONAL_NODE_KEYS = ("flops_fwd", "flops_bwd", "pointwise_elems", "out_bytes")


def with_batch(graph: LayerGraph, batch: int) -> LayerGraph | None:
    """``graph`` as if captured at global batch ``batch``; None when that cannot be done safely."""
    old = int(graph.batch)
    if batch == old:
        return graph
    if old < 2 or batch < 1:
        return None
    ratio = Fraction(batch, old)
    if any(data["dims"][d] % old for _, data in graph.layers() for d in _batch_dims(data)):
        return None  # a whole multiple of the batch (SDXL's time ids, 6 per sample, flattened) scales with it
    rescaled = copy.deepcopy(graph.graph)
    for node, data in graph.graph.nodes(data=True):
        rescaled.nodes[node].update(layer_with_batch(data, ratio))
    for (src, dst, key, data) in graph.graph.edges(keys=True, data=True):
        rescaled.edges[src, dst, key].update(edge_with_batch(data, graph[src], graph[dst], ratio))
    meta = rescaled.graph
    meta["batch"] = batch
    meta["inputs"] = {name: [batch, *shape[1:]] if shape and shape[0] == old else shape
                      for name, shape in meta.get("inputs", {}).items()}
    for output in meta.get("outputs", []):
        layer = rescaled.nodes.get(output.get("layer"), {})
        axes = _batch_axes(layer.get("tensors", {}).get("output", []), layer.get("roles", {}))
        if "shape" in output and len(output["shape"]) == len(layer.get("tensors", {}).get("output", [])):
            output["shape"] = [_scaled(e, ratio) if axis in axes else e for axis, e in enumerate(output["shape"])]
    meta["rescaled_from_batch"] = old
    result = LayerGraph(rescaled)
    meta.update(flops_fwd=result.total("flops_fwd"), flops_bwd=result.total("flops_bwd"))
    return result


def layer_with_batch(data: Mapping[str, Any], ratio: Fraction) -> LayerAttrs:
    """A layer's attributes with its batch dimension scaled by ``ratio`` (FLOPs and bytes follow)."""
    dims = _batch_dims(data)
    out = dict(data)
    if not dims:
        return cast(LayerAttrs, out)
    out["dims"] = {d: _scaled(extent, ratio) if d in dims else extent for d, extent in data["dims"].items()}
    for key in _PROPORTIONAL_NODE_KEYS:
        if key in data:
            out[key] = _scaled(data[key], ratio)
    return cast(LayerAttrs, out)


def edge_with_batch(edge: Mapping[str, Any], producer: Mapping[str, Any], consumer: Mapping[str, Any],
                    ratio: Fraction) -> EdgeAttrs:
    """An edge's shapes and bytes with the batch axes scaled (axes found through the dim maps)."""
    out = dict(edge)
    src_batch = _batch_axes(edge.get("src_map", []), producer.get("roles", {}))
    dst_batch = _batch_axes(edge.get("dst_map", []), consumer.get("roles", {}))
    out["shape"] = [_scaled(e, ratio) if axis in src_batch else e for axis, e in enumerate(edge["shape"])]
    if "dst_shape" in edge:
        out["dst_shape"] = [_scaled(e, ratio) if axis in dst_batch else e for axis, e in enumerate(edge["dst_shape"])]
    if src_batch:
        out["bytes"] = _scaled(edge["bytes"], ratio)
    return cast(EdgeAttrs, out)


def _batch_dims(data: Mapping[str, Any]) -> list[str]:
    return [d for d, role in data.get("roles", {}).items() if role == BATCH_ROLE]


def _batch_axes(axis_dims: list[Any], roles: dict[str, str]) -> set[int]:
    """Axes of an edge tensor that run over the batch dimension of the layer on that side."""
    axes = set()
    for axis, dims in enumerate(axis_dims):
        names = [dims] if isinstance(dims, str) else list(dims or [])
        if any(roles.get(name) == BATCH_ROLE for name in names):
            axes.add(axis)
    return axes


def _scaled(value: int | float, ratio: Fraction) -> int | float:
    if isinstance(value, int):  # int * Fraction is exact: keep an int when the product is whole
        scaled = value * ratio
        return int(scaled) if scaled.denominator == 1 else float(scaled)
    return float(value * ratio)
