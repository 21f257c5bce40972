"""Group a captured ``OpGraph`` into layers and connect them with tensor edges.

Grouping, in one topological pass:
- an anchor op (conv, linear, matmul, attention, norm, up/down-sampling) starts a layer;
- an elementwise op (add, mul, SiLU, cat, softmax, ...) joins the one layer that produced its
  inputs, or starts a join layer of its own when its inputs come from two or more layers (or
  straight from a model input);
- a matmul whose left operand is a softmax of another matmul's scores folds into that layer,
  which becomes attention (the matmul-softmax-matmul pattern);
- view, reshape, permute, slice and cast ops make no layer: they are folded into the edges,
  which record the axis map from the producer's tensor to the shape the consumer reads;
- ops on constants alone (arange, ones, their exp/sin) are folded away as constants.
One edge per (tensor view, consumer layer): a consumer reading two tensors of one producer
gets two edges. The pass is O(ops + edges).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from torch import nn

from pase.graph.ir import OpGraph, OpNode, TensorMeta
from pase.graph.opset import CONCAT_OPS, IGNORED_OPS, SOURCE_OPS, VIEW_OPS, layer_kind
from pase.graph.rules import DimMap, LayerRule, anchor_rule, broadcast_map, generic_names, generic_rule
from pase.graph.viewmap import AxisMap, compose, view_axis_map

SOFTMAX_OPS = frozenset({"softmax", "_softmax", "_safe_softmax", "log_softmax"})
NON_FUSING_KINDS = frozenset({"input"})


@dataclass
class _Value:
    """An fx value as the layer graph sees it: which layer made it, and through which views."""

    layer: str | None  # None: a constant or a parameter
    base: str  # the op whose output this is a view of (the tensor that leaves the layer)
    meta: TensorMeta | tuple | None
    base_meta: TensorMeta | None
    axes: list[tuple[str, ...]]  # producer-layer dims per axis
    axis_map: AxisMap  # this value's axes -> base tensor axes
    views: list[str]
    requires_grad: bool
    params: tuple[str, ...] = ()  # for constants: the parameters they were computed from


@dataclass
class _Layer:
    id: str
    index: int
    op: str
    module: str
    module_class: str
    block: str
    anchor: str
    rule: LayerRule
    fused_ops: list[str] = field(default_factory=list)
    pointwise_elems: int = 0
    flops_fwd: int = 0
    flops_bwd: int = 0
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    input_maps: list[list[str | None]] = field(default_factory=list)  # one per activation edge in
    input_grads: list[bool] = field(default_factory=list)  # per activation edge in: does it carry a gradient back


class _Builder:
    def __init__(self, graph: OpGraph, model: nn.Module | None) -> None:
        self.graph = graph
        self.values: dict[str, _Value] = {}
        self.layers: dict[str, _Layer] = {}
        self.edges: list[dict[str, Any]] = []
        self.edge_keys: set[tuple[str, tuple[str, ...], str]] = set()
        self.owned_params: set[str] = set()
        self.module_classes = {name: f"{type(m).__module__}.{type(m).__qualname__}"
                               for name, m in model.named_modules()} if model is not None else {}
        self.containers = {name for name, m in model.named_modules()
                           if isinstance(m, (nn.ModuleList, nn.ModuleDict))} if model is not None else set()
        self.latest_in_layer: dict[str, str] = {}  # layer -> name of its most recent op

    # ---------------------------------------------------------------- values
    def value(self, name: str) -> _Value:
        if name in self.values:
            return self.values[name]
        param = self.graph.params.get(name)
        if param is not None:
            return _Value(None, name, param.meta, param.meta, [], [], [], param.trainable, (name,))
        raise KeyError(f"operand {name!r} was never produced")  # a capture bug, not user input

    def run(self) -> None:
        for op in self.graph.ops:
            if op.out is None:
                continue
            if op.op == "input":
                self.add_input(op)
            elif op.op in SOURCE_OPS:
                self.values[op.name] = _Value(None, op.name, op.out, op.tensor_out, [], [], [], False)
            elif op.op in VIEW_OPS or op.op in IGNORED_OPS:  # an ignored op that yields a tensor passes it on
                self.add_view(op)
            elif layer_kind(op.op) is not None or op.op.startswith("module:"):
                self.add_anchor(op, layer_kind(op.op) or "other")
            else:
                self.add_elementwise(op)

    # ---------------------------------------------------------------- layers
    def new_layer(self, op: OpNode, kind: str, rule: LayerRule) -> _Layer:
        module = op.module
        leaf = self.module_classes.get(module, op.module_class).startswith("torch.nn.modules.")
        base = module or "<root>"
        layer_id = base if leaf and base not in self.layers and kind != "input" else self.unique_id(f"{base}/{kind}")
        layer = _Layer(layer_id, len(self.layers), kind, module, self.module_classes.get(module, op.module_class),
                       self.block_of(module), op.name, rule)
        self.layers[layer_id] = layer
        return layer

    def unique_id(self, wanted: str) -> str:
        layer_id, suffix = wanted, 1
        while layer_id in self.layers:
            layer_id = f"{wanted}_{suffix}"
            suffix += 1
        return layer_id

    def rename_layer(self, layer: _Layer, new_id: str) -> None:
        old_id = layer.id
        self.layers = {(new_id if k == old_id else k): v for k, v in self.layers.items()}
        layer.id = new_id
        for edge in self.edges:
            edge["src"] = new_id if edge["src"] == old_id else edge["src"]
            edge["dst"] = new_id if edge["dst"] == old_id else edge["dst"]
        self.edge_keys = {(b, v, new_id if d == old_id else d) for b, v, d in self.edge_keys}
        for value in self.values.values():
            if value.layer == old_id:
                value.layer = new_id
        self.latest_in_layer[new_id] = self.latest_in_layer.pop(old_id)

    def block_of(self, path: str) -> str:
        """Display group: the 2nd module level below the root that is not a container, else the 1st."""
        if not path:
            return "<root>"
        parts = path.split(".")
        levels = []
        for i in range(1, len(parts) + 1):
            name, parent = ".".join(parts[:i]), ".".join(parts[: i - 1])
            if name not in self.containers and (parent == "" or parent in self.containers):
                levels.append(name)
        return levels[1] if len(levels) > 1 else (levels[0] if levels else path)

    def produce(self, op: OpNode, layer: _Layer, out_map: DimMap) -> None:
        meta = op.tensor_out if op.tensor_out is not None else (op.out[0] if isinstance(op.out, tuple) else None)
        rg = any(self.value(o).requires_grad for o in op.operands)
        axes: list[tuple[str, ...]] = [(d,) if d else () for d in out_map]
        identity: AxisMap = [(i,) for i in range(len(out_map))]
        self.values[op.name] = _Value(layer.id, op.name, op.out, meta, axes, identity, [], rg)
        self.latest_in_layer[layer.id] = op.name

    def add_input(self, op: OpNode) -> None:
        meta = op.tensor_out
        assert meta is not None
        rule = generic_rule(meta, [])
        layer = self.new_layer(OpNode(op.name, "input", [], op.out, module=f"input:{op.attrs.get('input', op.name)}"),
                               "input", rule)
        layer.attrs["input"] = op.attrs.get("input", op.name)
        self.produce(op, layer, rule.out_map)

    def add_view(self, op: OpNode) -> None:
        source = self.value(op.operands[0]) if op.operands else None
        if source is None or source.layer is None:  # a view of a constant or of a parameter
            self.values[op.name] = _Value(None, op.name, op.out, op.tensor_out, [], [], [],
                                          bool(source and source.requires_grad), source.params if source else ())
            return
        out = op.tensor_out
        if out is None:  # a view producing a tuple (chunk, split, unbind): resolved at getitem
            self.values[op.name] = _Value(source.layer, source.base, op.out, source.base_meta, source.axes,
                                          source.axis_map, [*source.views, op.name], source.requires_grad)
            return
        if isinstance(source.meta, tuple):  # getitem of a tuple: the chunk keeps its source's axes
            index = op.attrs.get("index", 0)
            in_meta = source.meta[index] if index < len(source.meta) else None
        else:
            in_meta = source.meta
        in_shape = in_meta.shape if isinstance(in_meta, TensorMeta) else out.shape
        step = view_axis_map(op.op, in_shape, out.shape, op.attrs)
        consistent = len(source.axes) == len(in_shape) and len(source.axis_map) == len(in_shape)
        axes: list[tuple[str, ...]] = [tuple(sorted({d for a in axes for d in source.axes[a]})) for axes in step] \
            if consistent else [() for _ in out.shape]
        axis_map: AxisMap = compose(source.axis_map, step) if consistent else [() for _ in out.shape]
        self.values[op.name] = _Value(source.layer, source.base, out, source.base_meta, axes, axis_map,
                                      [*source.views, op.name], source.requires_grad)

    def add_anchor(self, op: OpNode, kind: str) -> None:
        out = op.tensor_out if op.tensor_out is not None else (op.out[0] if isinstance(op.out, tuple) else None)
        if out is None:
            return
        operands = [self.value(o) for o in op.operands]
        metas = [v.meta if isinstance(v.meta, TensorMeta) else None for v in operands]
        if kind == "matmul" and self.fold_into_attention(op, operands, metas, out):
            return
        rule = anchor_rule(kind, op.op, metas, out, op.attrs)
        layer = self.new_layer(op, kind, rule)
        layer.attrs.update({k: v for k, v in op.attrs.items() if k != "flops_fwd"})
        layer.flops_fwd = rule.flops_fwd
        layer.flops_bwd = rule.backward_flops([v.requires_grad for v in operands])
        if kind not in ("conv", "linear", "matmul", "attention"):
            layer.pointwise_elems += out.numel
        for slot, (name, value, dim_map) in enumerate(zip(op.operands, operands, rule.operand_maps)):
            self.connect(name, value, layer, dim_map, slot)
        self.produce(op, layer, rule.out_map)

    def fold_into_attention(self, op: OpNode, operands: list[_Value], metas: list, out: TensorMeta) -> bool:
        """``softmax(q @ k^T) @ v``: fold the second matmul into the scores layer, making it attention."""
        if len(operands) != 2 or operands[0].layer is None or operands[1].layer is None:
            return False
        layer = self.layers[operands[0].layer]
        if layer.op != "matmul" or not SOFTMAX_OPS.intersection(layer.fused_ops) or "attention_of" in layer.attrs:
            return False
        if self.latest_in_layer.get(layer.id) != operands[0].base:
            return False
        rename = {"m": "q", "o": "kv", "k": "d"}
        rule = layer.rule
        rule.dims = {rename.get(k, k): v for k, v in rule.dims.items()}
        rule.roles = {rename.get(k, k): ("sequence" if k == "o" else r) for k, r in rule.roles.items()}
        rule.operand_maps = [None if m is None else [rename.get(d, d) if d else d for d in m]
                             for m in rule.operand_maps]
        for edge in self.edges:
            if edge["dst"] == layer.id:
                edge["dst_map"] = [rename.get(d, d) if d else d for d in edge["dst_map"]]
            if edge["src"] == layer.id:
                edge["src_map"] = [[rename.get(d, d) for d in axis] for axis in edge["src_map"]]
        for value in self.values.values():
            if value.layer == layer.id:
                value.axes = [tuple(rename.get(d, d) for d in axis) for axis in value.axes]
        layer.input_maps = [[rename.get(d, d) if d else d for d in m] for m in layer.input_maps]
        v_meta = metas[1]
        batch: DimMap = [d for d in rule.dims if rule.roles[d] in ("batch", "head")]
        d_v = "d" if v_meta.shape[-1] == rule.dims["d"] else rule.add("dv", v_meta.shape[-1], "out_channel")
        v_map = batch[len(batch) - (len(v_meta.shape) - 2):] + ["kv", d_v]
        rule.operand_maps.append(v_map)
        rule.out_map = [*batch, "q", d_v][-len(out.shape):]
        pv = 2 * out.numel * rule.dims["kv"]
        layer.op = "attention"
        layer.attrs["attention_of"] = "matmul-softmax-matmul"
        self.rename_layer(layer, self.unique_id(f"{layer.module or '<root>'}/attention"))
        layer.fused_ops.append(op.op)
        layer.flops_fwd += pv
        rule.flops_fwd = layer.flops_fwd
        layer.flops_bwd += pv * (operands[0].requires_grad + operands[1].requires_grad)
        self.connect(op.operands[1], operands[1], layer, v_map, len(rule.operand_maps) - 1)
        self.produce(op, layer, rule.out_map)
        return True

    def add_elementwise(self, op: OpNode) -> None:
        out = op.tensor_out
        operands = [self.value(o) for o in op.operands]
        producers = {v.layer for v in operands if v.layer is not None}
        if out is None or not producers:
            rg = any(v.requires_grad for v in operands)
            params = tuple(p for v in operands for p in v.params)
            self.values[op.name] = _Value(None, op.name, op.out, out, [], [], [], rg, params)
            return
        only = self.layers[next(iter(producers))] if len(producers) == 1 else None
        if only is not None and only.op not in NON_FUSING_KINDS:
            only.fused_ops.append(op.op)
            only.pointwise_elems += out.numel
            for value in operands:
                for param in value.params if value.layer is None else ():
                    self.own_param(only, param)
            self.produce_fused(op, only, operands, out)
            return
        kind = "concat" if op.op in CONCAT_OPS else "elementwise"
        metas = [v.meta if isinstance(v.meta, TensorMeta) else None for v in operands]
        rule = generic_rule(out, metas)
        rule.grad_flops = [0] * len(metas)
        layer = self.new_layer(op, kind, rule)
        layer.fused_ops.append(op.op)
        layer.pointwise_elems += out.numel
        if kind == "concat":
            layer.attrs["dim"] = op.attrs.get("dim", 0)
        for slot, (name, value, dim_map) in enumerate(zip(op.operands, operands, rule.operand_maps)):
            self.connect(name, value, layer, dim_map, slot)
        self.produce(op, layer, rule.out_map)

    def produce_fused(self, op: OpNode, layer: _Layer, operands: list[_Value], out: TensorMeta) -> None:
        axes: list[tuple[str, ...]] = [() for _ in out.shape]
        for value in operands:
            if value.layer != layer.id or not isinstance(value.meta, TensorMeta):
                continue
            shape = value.meta.shape
            if len(shape) == len(out.shape) and len(value.axes) == len(shape):
                for j in range(len(shape)):
                    axes[j] = tuple(sorted(set(axes[j]) | set(value.axes[j])))
            elif len(value.axes) == len(shape):
                for i, mapped in enumerate(broadcast_map(shape, out.shape, [str(j) for j in range(len(out.shape))])):
                    if mapped is not None:
                        axes[int(mapped)] = tuple(sorted(set(axes[int(mapped)]) | set(value.axes[i])))
        rule = layer.rule
        for j, extent in enumerate(out.shape):
            if axes[j] and any(rule.dims[name] == extent for name in axes[j]):
                axes[j] = tuple(name for name in axes[j] if rule.dims[name] == extent)
            elif extent != 1:  # created by broadcast, or resized (chunk, cat, pad): a dimension of its own
                name, role = generic_names(len(out.shape))[j]
                if axes[j]:
                    name, role = f"{axes[j][0]}_{extent}", rule.roles[axes[j][0]]
                    role = "channel" if role in ("out_channel", "reduction") else role
                base, suffix = name, 1
                while name in rule.dims and rule.dims[name] != extent:
                    name, suffix = f"{base}_{suffix}", suffix + 1
                if name not in rule.dims:
                    rule.add(name, extent, role)
                axes[j] = (name,)
            else:
                axes[j] = ()
        rule.out_map = [a[0] if a else None for a in axes]
        rg = any(v.requires_grad for v in operands)
        self.values[op.name] = _Value(layer.id, op.name, op.out, out, axes, [(i,) for i in range(len(out.shape))],
                                      [], rg)
        self.latest_in_layer[layer.id] = op.name

    # ---------------------------------------------------------------- edges and params
    def own_param(self, layer: _Layer, name: str) -> None:
        """Attach a parameter (or buffer) to the layer that reads it; one owner each, so sums are exact."""
        param = self.graph.params[name]
        if name in self.owned_params:
            layer.params.setdefault(name, {"shape": list(param.meta.shape), "shared": True,
                                           "trainable": param.trainable})
            return
        self.owned_params.add(name)
        layer.params[name] = {"shape": list(param.meta.shape), "numel": param.meta.numel,
                              "bytes": param.meta.nbytes, "trainable": param.trainable}

    def connect(self, name: str, value: _Value, layer: _Layer, dim_map: list | None, slot: int) -> None:
        if value.layer is None:
            for param in value.params:
                self.own_param(layer, param)
            if name in self.graph.params and dim_map is not None:
                layer.params[name]["map"] = list(dim_map)
            return
        if value.layer == layer.id:
            return
        key = (value.base, tuple(value.views), layer.id)
        if key in self.edge_keys:
            return
        self.edge_keys.add(key)
        if dim_map is not None:
            layer.input_maps.append(list(dim_map))
            layer.input_grads.append(bool(value.requires_grad))
        meta = value.meta if isinstance(value.meta, TensorMeta) else value.base_meta
        base = value.base_meta or meta
        assert meta is not None and base is not None
        self.edges.append({
            "src": value.layer, "dst": layer.id, "slot": slot, "tensor": value.base,
            "shape": list(base.shape), "dst_shape": list(meta.shape), "dtype": str(meta.dtype).replace("torch.", ""),
            "dtype_bytes": meta.itemsize, "bytes": min(meta.numel, base.numel) * meta.itemsize,
            "src_map": [list(a) for a in self.values[value.base].axes],
            "dst_map": list(dim_map) if dim_map is not None else [None] * len(meta.shape),
            "axis_map": [list(a) for a in value.axis_map], "views": list(value.views),
            "requires_grad": bool(value.requires_grad),
        })

    # ---------------------------------------------------------------- output
    def to_networkx(self, extra: dict[str, Any]) -> nx.MultiDiGraph:
        graph = nx.MultiDiGraph(**extra)
        leaving: dict[str, dict[str, int]] = {lid: {} for lid in self.layers}
        for edge in self.edges:
            base = self.values[edge["tensor"]].base_meta
            leaving[edge["src"]][edge["tensor"]] = base.nbytes if base else edge["bytes"]
        outputs = []
        for name in self.graph.outputs:
            value = self.values.get(name)
            if value is None or value.layer is None or value.base_meta is None:
                continue
            leaving[value.layer][value.base] = value.base_meta.nbytes
            outputs.append({"layer": value.layer, "tensor": value.base, "shape": list(value.base_meta.shape)})
        for layer in self.layers.values():
            rule = layer.rule
            graph.add_node(
                layer.id, index=layer.index, op=layer.op, module=layer.module, module_class=layer.module_class,
                block=layer.block, dims=dict(rule.dims), roles=dict(rule.roles),
                tensors={"operands": [m for m in rule.operand_maps], "inputs": layer.input_maps,
                         "inputs_grad": layer.input_grads, "output": list(rule.out_map)},
                params=layer.params,
                param_count=sum(p.get("numel", 0) for p in layer.params.values() if p["trainable"]),
                param_bytes=sum(p.get("bytes", 0) for p in layer.params.values() if p["trainable"]),
                buffer_bytes=sum(p.get("bytes", 0) for p in layer.params.values() if not p["trainable"]),
                flops_fwd=layer.flops_fwd, flops_bwd=layer.flops_bwd, pointwise_elems=layer.pointwise_elems,
                out_bytes=sum(leaving[layer.id].values()), fused_ops=layer.fused_ops, anchor=layer.anchor,
                attrs=_jsonable(layer.attrs), is_output=any(o["layer"] == layer.id for o in outputs),
            )
        for edge in self.edges:
            graph.add_edge(edge["src"], edge["dst"], **edge)
        graph.graph["outputs"] = outputs
        return graph


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def build_layer_graph(graph: OpGraph, model: nn.Module | None, extra: dict[str, Any]) -> nx.MultiDiGraph:
    builder = _Builder(graph, model)
    builder.run()
    return builder.to_networkx(extra)
