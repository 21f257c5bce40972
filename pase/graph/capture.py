"""Capture a model's forward as an ``OpGraph``: meta_trace first, torch.export second, symbolic_trace last.

``meta_trace`` (see ``meta_trace``) runs the forward once on the meta device and records export's
graph for a fraction of export's time; it cannot branch on tensor values (``torch.cond``,
``.item()``), which torch.export (non-strict) can. Both capture diffusers UNets, whose Python
control flow defeats ``torch.fx.symbolic_trace``, the last resort for plain models. Each gives an
fx Graph; the front-ends here turn it into the same normalized ``OpGraph`` (canonical op names
from ``opset``, operands, shapes, module paths). When capture fails the error names the module
and the source line that broke it, and says what to try.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils.flop_counter import FlopCounterMode

from pase.errors import GraphCaptureError, InputShapeError
from pase.graph.ir import OpGraph, OpNode, ParamRef, TensorMeta
from pase.graph.meta_trace import meta_trace
from pase.graph.opset import PERMUTING_VIEWS

CAPTURE_METHODS = ("meta_trace", "export", "symbolic_trace")

# Python function / method / nn.Module names that differ from the canonical (ATen-like) ones.
_FUNCTION_ALIASES = {"truediv": "div", "floordiv": "div", "iadd": "add", "imul": "mul", "concat": "cat"}
_MODULE_CANONICAL: dict[type[nn.Module], str] = {
    nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
    nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d", nn.Linear: "linear", nn.GroupNorm: "group_norm",
    nn.LayerNorm: "layer_norm", nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm",
    nn.Upsample: "interpolate", nn.AvgPool2d: "avg_pool2d", nn.MaxPool2d: "max_pool2d",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d", nn.Embedding: "embedding",
    nn.SiLU: "silu", nn.ReLU: "relu", nn.GELU: "gelu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
    nn.Mish: "mish", nn.Dropout: "dropout", nn.Identity: "identity", nn.Softmax: "softmax",
    nn.Flatten: "flatten",
}
_META_TRACE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta_trace.py")  # not the user's line
_SHAPE_ERROR_WORDS = ("shape", "size", "channels", "expected input", "mat1 and mat2", "must match", "dimension",
                      "reduction dim", "cannot be multiplied")


def capture(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    method: str = "auto",
) -> OpGraph:
    """Capture ``model(*args, **kwargs)``; ``method`` is "auto" (each of ``CAPTURE_METHODS`` in turn) or one of them."""
    if method not in ("auto", *CAPTURE_METHODS):
        raise ValueError(f"capture method must be 'auto' or one of {', '.join(CAPTURE_METHODS)}, not {method!r}")
    methods = CAPTURE_METHODS if method == "auto" else (method,)
    failures: list[tuple[str, BaseException]] = []
    for name in methods:
        try:
            with quiet_torch_logs():
                return _FRONT_ENDS[name](model, args, kwargs or {})
        except Exception as exc:  # noqa: BLE001 - every capture failure is explained below
            _raise_if_shape_error(model, args, kwargs or {}, exc)
            failures.append((name, exc))
    raise GraphCaptureError(_explain_failures(model, failures))


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """A failed export logs warnings and prints its partial graph to stderr; our error explains it instead.

    Set PASE_DEBUG=1 to see torch's own output.
    """
    if os.environ.get("PASE_DEBUG"):
        yield
        return
    # torch's loggers carry their own levels and handlers bound to the real stderr: disable them all
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


# --------------------------------------------------------------------------- torch.export

def _capture_export(model: nn.Module, args: tuple, kwargs: dict) -> OpGraph:
    exported = _export_without_stack_traces(model, args, kwargs)
    signature = exported.graph_signature
    trainable = dict(signature.inputs_to_parameters)
    frozen = {**signature.inputs_to_buffers, **signature.inputs_to_lifted_tensor_constants}
    alias: dict[str, str] = {}  # placeholder name -> parameter fqn
    params: dict[str, ParamRef] = {}
    ops: list[OpNode] = []
    inputs: list[str] = []
    outputs: list[str] = []
    for node in exported.graph.nodes:
        meta = _meta_of(node.meta.get("val"))
        if node.op == "placeholder":
            if node.name in trainable or node.name in frozen:
                fqn = trainable.get(node.name) or frozen[node.name]
                alias[node.name] = fqn
                if isinstance(meta, TensorMeta):
                    params[fqn] = ParamRef(fqn, meta, trainable=node.name in trainable)
            elif isinstance(meta, TensorMeta):
                ops.append(OpNode(node.name, "input", [], meta, attrs={"input": node.name}))
                inputs.append(node.name)
        elif node.op == "call_function":
            canonical = _canonical_function(node.target)
            operands = [alias.get(n.name, n.name) for n in _nodes_in(node.args, node.kwargs)]
            module, module_class = _module_of(node.meta.get("nn_module_stack"))
            ops.append(OpNode(node.name, canonical, operands, meta, module, module_class,
                              _attrs(canonical, node.args, node.kwargs)))
        elif node.op == "output":
            outputs = [n.name for n in _nodes_in(node.args, {})]
    known = {op.name for op in ops} | set(params)
    for op in ops:  # subgraphs of control-flow ops (torch.cond's branches) are get_attr nodes, not data
        op.operands = [o for o in op.operands if o in known]
    return OpGraph(ops, params, inputs, outputs, method="export")


def _export_without_stack_traces(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """Non-strict export; per-node stack traces are skipped (a tenth of SD-1.5's capture time, never read:
    capture errors are explained from the exception, not from node metadata)."""
    fx_config = getattr(torch.fx, "config", None)
    previous = getattr(fx_config, "do_not_emit_stack_traces", None)
    if fx_config is not None and previous is not None:
        fx_config.do_not_emit_stack_traces = True
    try:
        return torch.export.export(model, args, kwargs or None, strict=False)
    finally:
        if fx_config is not None and previous is not None:
            fx_config.do_not_emit_stack_traces = previous


def _canonical_function(target: Callable) -> str:
    packet = getattr(target, "overloadpacket", None)
    name: str = getattr(packet, "__name__", "") or getattr(target, "__name__", str(target))
    return _FUNCTION_ALIASES.get(name, name)


def _module_of(stack: dict | None) -> tuple[str, str]:
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return path, cls_name


# --------------------------------------------------------------------------- symbolic_trace

def _capture_symbolic(model: nn.Module, args: tuple, kwargs: dict) -> OpGraph:
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    # non-tensor arguments (None defaults, flags) are fixed at trace time, so branches on them resolve
    concrete = {name: value for name, value in bound.arguments.items() if not isinstance(value, torch.Tensor)}
    graph_module = torch.fx.symbolic_trace(model, concrete_args=concrete or None)
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    ShapeProp(graph_module).propagate(*(bound.arguments.get(p.target.lstrip("*")) for p in placeholders))
    trainable = {name for name, _ in model.named_parameters()}
    return fx_to_op_graph(graph_module.graph, model, lambda target: _get_attr(graph_module, target), trainable,
                          "symbolic_trace")


def _capture_meta_trace(model: nn.Module, args: tuple, kwargs: dict) -> OpGraph:
    trace = meta_trace(model, args, kwargs)
    return fx_to_op_graph(trace.graph, model, trace.attrs.__getitem__, trace.trainable, "meta_trace")


def fx_to_op_graph(graph: torch.fx.Graph, model: nn.Module, get_attr: Callable[[str], Any], trainable: set[str] |
                   frozenset[str], method: str) -> OpGraph:
    """A torch-level fx Graph (symbolic_trace's or meta_trace's) as an OpGraph.

    Output metadata comes from ``node.meta["tensor_meta"]`` (ShapeProp) or ``node.meta["val"]``;
    ``call_module`` targets and ``nn_module_stack`` paths name modules of ``model``. O(nodes).
    """
    modules = dict(model.named_modules())
    params: dict[str, ParamRef] = {}
    ops: list[OpNode] = []
    inputs: list[str] = []
    outputs: list[str] = []

    def param(fqn: str, tensor: torch.Tensor) -> str:
        params.setdefault(fqn, ParamRef(fqn, TensorMeta(tuple(tensor.shape), tensor.dtype), fqn in trainable))
        return fqn

    alias: dict[str, str] = {}
    for node in graph.nodes:
        meta = _meta_of(node.meta.get("tensor_meta", node.meta.get("val")))
        if node.op == "placeholder":
            if isinstance(meta, TensorMeta):
                ops.append(OpNode(node.name, "input", [], meta, attrs={"input": node.target}))
                inputs.append(node.name)
        elif node.op == "get_attr":
            value = get_attr(node.target)
            if isinstance(value, torch.Tensor):
                alias[node.name] = param(node.target, value)
        elif node.op in ("call_function", "call_method", "call_module"):
            if meta is None:
                continue  # shape arithmetic and other non-tensor values
            operands = [alias.get(n.name, n.name) for n in _nodes_in(node.args, node.kwargs)]
            stack_path = _module_of(node.meta.get("nn_module_stack"))[0]
            if node.op == "call_module":
                submodule = model.get_submodule(node.target)
                canonical = _MODULE_CANONICAL.get(type(submodule), f"module:{type(submodule).__name__}")
                operands += [param(f"{node.target}.{n}", p) for n, p in
                             (*submodule.named_parameters(), *submodule.named_buffers())]
                attrs = _module_attrs(submodule, canonical, node)
                path = node.target
            else:
                canonical = node.target if node.op == "call_method" else _canonical_function(node.target)
                canonical = _FUNCTION_ALIASES.get(canonical, canonical)
                if canonical == "getattr":  # a tensor-valued attribute: x.mT, x.T, x.real ...
                    canonical = str(node.args[1]) if str(node.args[1]) in PERMUTING_VIEWS else "alias"
                attrs = _attrs(canonical, node.args, node.kwargs)
                path = stack_path
            module = modules.get(path)
            module_class = f"{type(module).__module__}.{type(module).__qualname__}" if module is not None else ""
            ops.append(OpNode(node.name, canonical, operands, meta, path, module_class, attrs))
        elif node.op == "output":
            outputs = [n.name for n in _nodes_in(node.args, {})]
    known = {op.name for op in ops} | set(params)
    for op in ops:  # operands that were dropped as non-tensors (shape arithmetic) are not data
        op.operands = [o for o in op.operands if o in known]
    return OpGraph(ops, params, inputs, [o for o in outputs if o in known], method=method)


def _get_attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _module_attrs(module: nn.Module, canonical: str, node: torch.fx.Node) -> dict[str, Any]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return {"stride": list(module.stride), "padding": module.padding if isinstance(module.padding, str)
                else list(module.padding), "dilation": list(module.dilation), "groups": module.groups,
                "transposed": module.transposed}
    if isinstance(module, nn.GroupNorm):
        return {"groups": module.num_groups}
    if canonical.startswith("module:"):
        return {"flops_fwd": _leaf_module_flops(module, node)}
    return {}


def _leaf_module_flops(module: nn.Module, node: torch.fx.Node) -> int:
    """FLOPs of a leaf module pase has no rule for, counted by running it on meta tensors."""
    metas = [a.meta.get("tensor_meta") for a in _nodes_in(node.args, {})]
    fake_args = [torch.empty(m.shape, dtype=m.dtype, device="meta") for m in metas if isinstance(m, TensorMetadata)]
    with FlopCounterMode(display=False) as counter:
        module(*fake_args)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- shared helpers

def _meta_of(value: Any) -> TensorMeta | tuple | None:
    if isinstance(value, TensorMetadata):
        return TensorMeta(tuple(int(d) for d in value.shape), value.dtype)
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(int(d) for d in value.shape), value.dtype)
    if isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, TensorMetadata)) for v in value):
        return tuple(_meta_of(v) if isinstance(v, (torch.Tensor, TensorMetadata)) else None for v in value)
    return None


def _nodes_in(args: Any, kwargs: dict) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((args, kwargs), found.append)
    return found


def _attrs(canonical: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The non-tensor arguments that layer rules and view maps need, for one op."""
    def arg(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    if canonical in PERMUTING_VIEWS:
        if canonical == "permute":
            dims = arg(1, "dims")
            dims = list(dims) if isinstance(dims, (list, tuple)) else list(args[1:])
            return {"perm": [int(d) for d in dims]}
        if canonical in ("transpose", "swapaxes"):
            return {"swap": (int(arg(1, "dim0")), int(arg(2, "dim1")))}
        if canonical == "t":
            return {"swap": (0, 1)}
        if canonical in ("mT", "mH", "adjoint"):
            return {"swap": (-2, -1)}
        if canonical in ("T", "H"):
            return {"reverse": True}
        if canonical == "movedim":
            return {"movedim": (arg(1, "source"), arg(2, "destination"))}
        return {}
    if canonical == "einsum":
        return {"equation": str(arg(0, "equation"))}
    if canonical in ("cat", "concat", "stack"):
        return {"dim": int(arg(1, "dim", 0))}
    if canonical == "getitem" and isinstance(arg(1, "index"), int):
        return {"index": int(arg(1, "index"))}
    if canonical in ("conv1d", "conv2d", "conv3d"):
        return {"stride": arg(3, "stride", 1), "padding": arg(4, "padding", 0),
                "dilation": arg(5, "dilation", 1), "groups": int(arg(6, "groups", 1)), "transposed": False}
    if canonical in ("convolution", "_convolution"):
        return {"stride": arg(3, "stride"), "padding": arg(4, "padding"), "dilation": arg(5, "dilation"),
                "transposed": bool(arg(6, "transposed")), "groups": int(arg(8, "groups", 1))}
    if canonical.startswith("conv_transpose"):
        return {"stride": arg(3, "stride", 1), "padding": arg(4, "padding", 0), "groups": int(arg(6, "groups", 1)),
                "transposed": True}
    if canonical in ("group_norm", "native_group_norm"):
        groups = arg(1, "num_groups") if canonical == "group_norm" else arg(6, "group")
        return {"groups": int(groups)} if isinstance(groups, int) else {}
    return {}


_FRONT_ENDS: dict[str, Callable[[nn.Module, tuple, dict], OpGraph]] = {
    "meta_trace": _capture_meta_trace,
    "export": _capture_export,
    "symbolic_trace": _capture_symbolic,
}


# --------------------------------------------------------------------------- failures

def _culprit(model: nn.Module, exc: BaseException) -> tuple[str | None, nn.Module | None, str | None, dict]:
    """The innermost module of ``model`` running when ``exc`` was raised, and the user source line.

    Walks the traceback: a frame whose ``self`` is one of the model's modules names the
    module; the last frame outside torch's own files names the operation.
    """
    while exc.__cause__ is not None:  # ShapeProp and friends wrap the error that matters
        exc = exc.__cause__
    names = {id(m): name for name, m in model.named_modules()}
    torch_dir = os.path.dirname(torch.__file__)
    module_name = module = line = None
    frame_locals: dict = {}
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            module_name, module, frame_locals = names[id(owner)], owner, dict(frame.f_locals)
        filename = frame.f_code.co_filename
        if not filename.startswith(torch_dir) and "<eval_with_key>" not in filename and filename != _META_TRACE_FILE:
            source = traceback.FrameSummary(filename, lineno, frame.f_code.co_name).line
            line = f"{os.path.basename(filename)}:{lineno} in {frame.f_code.co_name}: {source}"
    return module_name, module, line, frame_locals


def _describe_module(name: str | None, module: nn.Module | None) -> str:
    if module is None:
        return "the model's top-level forward"
    return f"module '{name or '<root>'}' ({type(module).__name__})"


def _expectation(module: nn.Module | None) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"an input with {module.in_channels} channels in dim 1"
    if isinstance(module, nn.Linear):
        return f"an input whose last dim is {module.in_features}"
    if isinstance(module, nn.GroupNorm):
        return f"an input with {module.num_channels} channels in dim 1"
    if isinstance(module, nn.LayerNorm):
        return f"an input ending in {tuple(module.normalized_shape)}"
    return "a different shape"


def _input_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, tuple[int, ...]]:
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return {f"input{i}": tuple(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    return {k: tuple(v.shape) for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)}


def _raise_if_shape_error(model: nn.Module, args: tuple, kwargs: dict, exc: BaseException) -> None:
    """Turn a shape mismatch inside a known layer into an error naming the input and the expectation."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    if not isinstance(exc, (RuntimeError, ValueError)):
        return
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    name, module, _, frame_locals = _culprit(model, exc)
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.GroupNorm, nn.LayerNorm)):
        return
    if not any(word in message.lower() for word in _SHAPE_ERROR_WORDS):
        return
    given = _input_shapes(model, args, kwargs)
    received = next((tuple(v.shape) for v in frame_locals.values() if isinstance(v, torch.Tensor)
                     and not isinstance(v, nn.Parameter)), None)
    direct = [k for k, shape in given.items() if shape == received]
    subject = (f"input {direct[0]!r} {received}" if direct else f"an activation of shape {received}")
    raise InputShapeError(
        f"{subject} does not fit {_describe_module(name, module)}, which expects {_expectation(module)}: "
        f"{message}. Inputs given: " + ", ".join(f"{k} {v}" for k, v in given.items())
        + ". Fix the input shapes (for a zoo model see `pase graph --help`; for your own, --input-shape)."
    ) from exc


def _explain_failures(model: nn.Module, failures: list[tuple[str, BaseException]]) -> str:
    lines = [f"could not capture {type(model).__name__}'s forward with {' or '.join(m for m, _ in failures)}:"]
    for method, exc in failures:
        name, module, line, _ = _culprit(model, exc)
        while exc.__cause__ is not None:
            exc = exc.__cause__
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        where = _describe_module(name, module)
        lines.append(f"  - {method}: {type(exc).__name__} in {where}" + (f" at {line}" if line else "")
                     + f": {message}")
    lines.append(
        "What to try: remove Python control flow that depends on tensor values (use torch.where or torch.cond), "
        "make shape-dependent branches static for the example inputs, and build the model on the meta device "
        "(pase never needs real weights). With --capture you can force one method."
    )
    return "\n".join(lines)
