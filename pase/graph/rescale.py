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
from fractions import Fraction
from typing import Any

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
    rescaled = copy.deepcopy(graph.graph)
    for _, data in rescaled.nodes(data=True):
        batch_dims = [d for d, role in data.get("roles", {}).items() if role == BATCH_ROLE]
        if not batch_dims:
            continue
        if any(data["dims"][d] != old for d in batch_dims):
            return None
        for d in batch_dims:
            data["dims"][d] = batch
        for key in _PROPORTIONAL_NODE_KEYS:
            if key in data:
                data[key] = _scaled(data[key], ratio)
    for src, dst, data in rescaled.edges(data=True):
        src_batch = _batch_axes(data.get("src_map", []), rescaled.nodes[src].get("roles", {}))
        dst_batch = _batch_axes(data.get("dst_map", []), rescaled.nodes[dst].get("roles", {}))
        data["shape"] = [_scaled(extent, ratio) if axis in src_batch else extent
                         for axis, extent in enumerate(data["shape"])]
        if "dst_shape" in data:
            data["dst_shape"] = [_scaled(extent, ratio) if axis in dst_batch else extent
                                 for axis, extent in enumerate(data["dst_shape"])]
        if src_batch:
            data["bytes"] = _scaled(data["bytes"], ratio)
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


def _batch_axes(axis_dims: list[Any], roles: dict[str, str]) -> set[int]:
    """Axes of an edge tensor that run over the batch dimension of the layer on that side."""
    axes = set()
    for axis, dims in enumerate(axis_dims):
        names = [dims] if isinstance(dims, str) else list(dims or [])
        if any(roles.get(name) == BATCH_ROLE for name in names):
            axes.add(axis)
    return axes


def _scaled(value: int | float, ratio: Fraction) -> int | float:
    scaled = value * ratio
    return int(scaled) if isinstance(value, int) and scaled.denominator == 1 else float(scaled)
