"""The attributes of LayerGraph vertices and edges, as typed dictionaries.

They are the contract between capture and everything downstream (cost model, planners, runtime):
networkx stores plain JSON-ready dicts, and these types say which keys each one has.
"""
from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class ParamInfo(TypedDict, total=False):
    shape: list[int]
    numel: int
    bytes: int
    trainable: bool
    map: list[str | None]  # the layer dimension each weight axis runs over


class TensorMaps(TypedDict):
    operands: list[list[str | None]]  # per operand of the anchor op: the dimension of each axis
    inputs: list[list[str | None]]  # per input activation (an edge's dst_map)
    inputs_grad: NotRequired[list[bool]]  # per input activation: does a gradient flow back (older graphs: yes)
    output: list[str | None]


class LayerAttrs(TypedDict):
    """One layer: its op, where it came from, its iteration space and what it costs."""

    index: int  # capture order
    op: str  # conv, linear, matmul, attention, group_norm, ..., elementwise, concat, input
    module: str
    module_class: str
    block: str  # the module block it belongs to (the plan table's rows)
    dims: dict[str, int]  # iteration dimension -> extent
    roles: dict[str, str]  # iteration dimension -> batch, out_channel, reduction, channel, spatial, ...
    tensors: TensorMaps
    params: dict[str, ParamInfo]
    param_count: int
    param_bytes: int
    buffer_bytes: int
    flops_fwd: int
    flops_bwd: int
    pointwise_elems: int
    out_bytes: int
    fused_ops: list[str]
    anchor: str
    attrs: dict[str, Any]  # the anchor op's arguments (stride, padding, groups, ...)
    is_output: bool


class EdgeAttrs(TypedDict):
    """One tensor a consumer reads: its shape as produced and as read, and how their axes map."""

    src: str
    dst: str
    slot: int
    tensor: str
    shape: list[int]
    dst_shape: list[int]
    dtype: str
    dtype_bytes: int
    bytes: int
    src_map: list[list[str]]  # producer dimensions per produced axis
    dst_map: list[str | None]  # consumer dimension per read axis
    axis_map: list[list[int]]  # produced axes each read axis comes from
    views: list[Any]  # the folded view ops
    requires_grad: NotRequired[bool]  # does a gradient flow back along it (absent in older graphs: yes)


__all__ = ["EdgeAttrs", "LayerAttrs", "ParamInfo", "TensorMaps"]
