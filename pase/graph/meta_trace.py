"""Capture a forward as a torch.fx Graph by running it once on the meta device and recording each call.

torch.export spends most of SD-1.5's capture in fake tensors, proxies and its Python dispatcher;
none of that is needed when the shapes are static and the model already lives on the meta device.
Here the forward runs eagerly on meta tensors under a ``TorchFunctionMode`` that records every
top-level torch call (``F.conv2d``, ``Tensor.view``, ``x + y`` ...) as an fx node, with the module
path from global forward hooks. Python control flow resolves on the given shapes, as in non-strict
export; a branch on a tensor's value raises (meta tensors have no values) and ``capture`` falls
back to torch.export.

The graph is export's, node for node: each node is named after the ATen op that export's
pre-dispatch trace records for the same call (``float()`` is ``to``, ``1 / x`` is ``reciprocal``
then ``mul``, ``x[:, None]`` is ``unsqueeze``, a no-op ``contiguous()`` is no node), so both front
ends give equal OpGraphs and LayerGraphs (tests/test_meta_trace.py). Calls that the C++ bindings
or torch's Python code lower to other ATen ops (indexing, ``F.interpolate``, the reflected
operators) are recorded as the ATen ops a ``TorchDispatchMode`` sees them issue. Cost: one eager
meta forward plus one Python callback per torch call, O(calls); meta kernels are memoized on their
inputs' metadata (``_Recorder.run``), as a UNet repeats each signature many times.
"""
from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MetaCompositeError", "MetaTrace", "MetaValueError", "meta_trace"]


class MetaValueError(RuntimeError):
    """The forward read a tensor's value (``if x.sum() > 0``, ``x.item()``): meta tensors have none."""


class MetaCompositeError(RuntimeError):
    """The forward calls a Python composition of layers that a meta trace would record as one node."""


@dataclass
class MetaTrace:
    """A recorded forward: the fx Graph, and the tensors its ``get_attr`` nodes name."""

    graph: torch.fx.Graph
    attrs: dict[str, torch.Tensor]  # get_attr target -> parameter, buffer or constant
    trainable: frozenset[str]  # the targets that are trainable parameters

    def graph_module(self) -> torch.fx.GraphModule:
        """A runnable GraphModule over the recorded tensors (meta ones: load real weights to run it)."""
        return torch.fx.GraphModule(dict(self.attrs), self.graph)


def meta_trace(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *,
               on_meta: bool = True) -> MetaTrace:
    """Run ``model(*args, **kwargs)`` once on the meta device and record it as a torch.fx Graph.

    A model or inputs that are not on the meta device are traced through meta copies (the model is
    called with ``torch.func.functional_call``), so no real compute happens and ``model`` is untouched.
    ``on_meta=False`` runs the forward on the tensors as given instead (real compute; device arguments
    in the graph are then real ones), which gives a graph to replay against the model.
    """
    kwargs = kwargs or {}
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tensors = [*state.values(), *_tensor_leaves((args, kwargs))]
    copies = on_meta and not all(t.is_meta for t in tensors)
    if copies:
        state = {name: _to_meta(t) for name, t in state.items()}
        args, kwargs = _map_tensors((args, kwargs), _to_meta)
    recorder = _Recorder(model, state)
    for name, value in _named_inputs(model, args, kwargs):
        recorder.placeholder(name, value)
    with recorder.module_hooks(), recorder:
        out = torch.func.functional_call(model, state, args, kwargs) if copies else model(*args, **kwargs)
    recorder.output(out)
    return MetaTrace(recorder.graph, recorder.attrs, frozenset(n for n, _ in model.named_parameters()))


# --------------------------------------------------------------------------- how calls become nodes

# Tensor operators -> the Tensor method (or torch function, with its operands reversed or not) export records.
_OPERATORS: dict[str, str | tuple[Callable, bool]] = {
    "__add__": "add", "__radd__": "add", "__iadd__": "add_", "__sub__": "sub", "__isub__": "sub_",
    "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul_", "__truediv__": "div", "__div__": "div",
    "__itruediv__": "div_", "__idiv__": "div_", "__mod__": "remainder", "__imod__": "remainder_", "__pow__": "pow",
    "__matmul__": "matmul", "__rmatmul__": (torch.matmul, True), "__neg__": "neg", "__pos__": "positive",
    "__abs__": "abs", "__invert__": "bitwise_not", "__and__": "bitwise_and", "__rand__": "bitwise_and",
    "__iand__": "bitwise_and_", "__or__": "bitwise_or", "__ror__": "bitwise_or", "__ior__": "bitwise_or_",
    "__xor__": "bitwise_xor", "__rxor__": "bitwise_xor", "__ixor__": "bitwise_xor_", "__eq__": "eq", "__ne__": "ne",
    "__lt__": "lt", "__le__": "le", "__gt__": "gt", "__ge__": "ge",
}
# Casts that reach ATen as ``to``, and the dtype each names.
_CAST_DTYPES = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16,
                "int": torch.int32, "long": torch.int64, "short": torch.int16, "char": torch.int8, "byte": torch.uint8,
                "bool": torch.bool}
_CASTS = frozenset({*_CAST_DTYPES, "cpu", "cuda", "type"})
# Calls whose ATen ops are recorded as a TorchDispatchMode sees them issued (see the module docstring).
_LOWERED = frozenset({
    torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.__rsub__, torch.Tensor.__rdiv__,
    torch.Tensor.__rtruediv__, torch.Tensor.__rpow__, torch.Tensor.__floordiv__, torch.Tensor.__rfloordiv__,
    torch.Tensor.__rmod__, torch.Tensor.__ipow__, torch.Tensor.__rlshift__, torch.Tensor.__rrshift__,
    torch.Tensor.split, torch.split, F.interpolate, F.upsample,
})
# Convolutions' arguments after the weight: (name, default, is a per-spatial-dim list); ATen receives the
# lists expanded and export drops trailing defaults, which is what the layer attributes are read from.
_CONV = (("bias", None, False), ("stride", 1, True), ("padding", 0, True), ("dilation", 1, True), ("groups", 1, False))
_CONV_TRANSPOSE = (("bias", None, False), ("stride", 1, True), ("padding", 0, True), ("output_padding", 0, True),
                   ("groups", 1, False), ("dilation", 1, True))
_CONV_ARGS = {**{f"conv{n}d": (_CONV, n) for n in (1, 2, 3)},
              **{f"conv_transpose{n}d": (_CONV_TRANSPOSE, n) for n in (1, 2, 3)}}
# Python functions of torch.nn.functional that check __torch_function__ and then run layers export records one by
# one (nn.MultiheadAttention's projections and attention, lp_pool's avg_pool, local_response_norm's avg_pool):
# recorded as one call they would hide those layers, their FLOPs and their weights' maps, so the trace stops there
# and ``capture`` falls back to torch.export, which traces through them.
_COMPOSITES = frozenset(getattr(F, name) for name in (
    "multi_head_attention_forward", "lp_pool1d", "lp_pool2d", "lp_pool3d", "local_response_norm",
    "linear_cross_entropy") if hasattr(F, name))
# Calls that read values: on meta tensors they fail, and the message should say why.
_VALUE_READS = frozenset({"__bool__", "__int__", "__float__", "__index__", "__complex__", "item", "tolist",
                          "numpy", "__array__"})


class _Recorder(TorchFunctionMode):
    """Builds the fx Graph while the forward runs; one instance per trace."""

    def __init__(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.graph = torch.fx.Graph()
        self.attrs: dict[str, torch.Tensor] = {}
        self.nodes: dict[int, torch.fx.Node] = {}  # id(tensor) -> the node that holds its current value
        self.alive: list[Any] = []  # every tensor seen, so that no id() is reused while the trace runs
        self.state_names = {id(t): name for name, t in state.items()}
        self.trainable = {name for name, _ in model.named_parameters()}
        self.module_names = {id(m): name for name, m in model.named_modules()}
        # per running module, as export's nn_module_stack has it: (key, (path, class)); None outside the model
        self.stack: list[tuple[str, tuple[str, type]] | None] = []
        self.calls: dict[str, int] = {}  # calls so far per module path: a module's second call is key "path@1"
        self.stack_meta: dict[str, tuple[str, type]] = {}  # the current stack as a dict, shared by its nodes
        self.memo: dict[tuple, Any] = {}  # see run()

    # ---------------------------------------------------------------- module paths
    def module_hooks(self) -> _Hooks:
        return _Hooks(self)

    def enter_module(self, module: nn.Module, *_: Any) -> None:
        path = self.module_names.get(id(module))
        if path is None:  # a module outside the model: its calls belong to the caller
            self.stack.append(None)
            return
        count = self.calls.get(path, 0)
        self.calls[path] = count + 1
        self.stack.append(("L__self__" + path + (f"@{count}" if count else ""), (path, type(module))))
        self.stack_meta = dict(entry for entry in self.stack if entry is not None)

    def exit_module(self, *_: Any) -> None:
        if self.stack:
            self.stack.pop()
        self.stack_meta = dict(entry for entry in self.stack if entry is not None)

    # ---------------------------------------------------------------- graph building
    def placeholder(self, name: str, value: torch.Tensor) -> None:
        node = self.graph.placeholder(name)
        self.bind(value, node)

    def output(self, out: Any) -> None:
        self.graph.output(tuple(self.node_of(t) for t in _tensor_leaves(out)))

    def bind(self, value: torch.Tensor, node: torch.fx.Node) -> None:
        node.meta["val"] = value
        self.nodes[id(value)] = node
        self.alive.append(value)

    def node_of(self, tensor: torch.Tensor) -> torch.fx.Node:
        node = self.nodes.get(id(tensor))
        if node is not None:
            return node
        target = self.state_names.get(id(tensor))
        if target is None:  # a tensor made outside the forward and not registered: a constant, as export lifts it
            target = f"_tensor_constant{sum(1 for k in self.attrs if k.startswith('_tensor_constant'))}"
            prefix = "c"
        else:
            prefix = "p" if target in self.trainable else "b"
        self.attrs[target] = tensor
        # named as export names its parameter placeholders, so that op names never shift
        node = self.graph.create_node("get_attr", target, name=f"{prefix}_{target.replace('.', '_')}")
        self.bind(tensor, node)
        return node

    def arg(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.node_of(value)
        if isinstance(value, torch.fx.Node):
            return value
        if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
            mapped = [self.arg(v) for v in value]
            return type(value)(mapped) if type(value) in (list, tuple) else tuple(mapped)
        if isinstance(value, dict):
            return {k: self.arg(v) for k, v in value.items()}
        return value

    def record(self, kind: str, target: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        node = self.graph.create_node(kind, target, self.arg(args), self.arg(kwargs), name=name)
        node.meta["nn_module_stack"] = self.stack_meta
        if isinstance(out, torch.Tensor):
            self.bind(out, node)
            return
        node.meta["val"] = out
        self.alive.append(out)
        for index, item in enumerate(out):  # one getitem per element, right after the op, as export does
            if isinstance(item, torch.Tensor):
                self.record("call_function", operator.getitem, "getitem", (node, index), {}, item)

    # ---------------------------------------------------------------- the mode
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _VALUE_READS:
            return _read_value(func, name, args, kwargs)
        if func in _LOWERED:
            return self.lowered(func, args, kwargs)
        if func in _COMPOSITES and self.stack:
            raise MetaCompositeError(
                f"the forward calls F.{name}, which meta_trace would record as one node, hiding the layers inside "
                f"it (torch.export traces through it)")
        out = self.run(func, args, kwargs)
        if not self.stack or not _holds_tensors(out):
            return out  # outside the model's forward; or sizes, dtypes, flags: constants, as in export
        if name == "contiguous" and out is args[0]:
            return out  # already contiguous: torch returns the tensor itself and records nothing
        kind, target, node_name, node_args = _target(func, name, args)
        if name in _CONV_ARGS:
            node_args, kwargs = _conv_args(name, node_args, kwargs)
        self.record(kind, target, node_name, node_args, kwargs, out)
        return out

    def run(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``func(*args, **kwargs)``, memoized on the inputs' metadata when every tensor is on meta.

        A meta kernel is a function of shapes, strides, dtypes and the other arguments alone (there are
        no values), and the Python ones (norms, attention, linear) cost milliseconds: a UNet repeats
        each signature many times, so later calls get fresh empty tensors of the recorded layout.
        Views, in-place results and tensors the call was given are never memoized.
        """
        inputs: list[torch.Tensor] = []
        try:
            key = (func, _metadata_key(args, inputs), _metadata_key(kwargs, inputs), torch.is_grad_enabled(),
                   torch.get_default_dtype())
        except _NotMemoizable:
            return func(*args, **kwargs)
        layout = self.memo.get(key)
        if layout is not None:
            return _from_layout(layout)
        out = func(*args, **kwargs)
        layout = _layout(out, inputs)
        if layout is not None:
            self.memo[key] = layout
        return out

    def lowered(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        if not self.stack:
            return func(*args, **kwargs)
        with _AtenLog(self):
            return func(*args, **kwargs)


class _AtenLog(TorchDispatchMode):
    """Records the ATen ops one lowered call issues, with the mode that called it paused."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # detach: autograd saving a result for backward, below the level export records at
        if _holds_tensors(out) and func.overloadpacket is not torch.ops.aten.detach:
            self.recorder.record("call_function", func, func.overloadpacket.__name__, args, kwargs, out)
        return out


class _Hooks:
    """Global forward hooks that keep the recorder's module stack, removed on exit."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder
        self.handles: list[Any] = []

    def __enter__(self) -> None:
        self.handles = [register_module_forward_pre_hook(self.recorder.enter_module),
                        register_module_forward_hook(self.recorder.exit_module, always_call=True)]

    def __exit__(self, *_: Any) -> None:
        for handle in self.handles:
            handle.remove()


def _target(func: Callable, name: str, args: tuple) -> tuple[str, Any, str, tuple]:
    """The fx op, target, node name and arguments of one recorded call."""
    if name == "__get__":  # a tensor-valued property: x.T, x.mT, x.real
        assert hasattr(func, "__self__")  # the bound __get__ of the property's descriptor
        attribute = func.__self__.__name__
        return "call_function", getattr, attribute, (args[0], attribute)
    if name in _OPERATORS:
        mapped = _OPERATORS[name]
        if isinstance(mapped, str):
            return "call_method", mapped, mapped, args
        function, reverse = mapped
        return "call_function", function, function.__name__, tuple(reversed(args)) if reverse else args
    if name in _CASTS:
        dtype = _CAST_DTYPES.get(name)
        return "call_method", "to", "to", (args[0], dtype) if dtype is not None else args
    if getattr(torch.Tensor, name, None) is func:
        return "call_method", name, name, args
    return "call_function", func, name, args


def _conv_args(name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A convolution's arguments as ATen's schema receives them: positional, lists expanded, trailing defaults cut."""
    schema, ndim = _CONV_ARGS[name]
    values, defaults = [], []
    for i, (arg, default, is_list) in enumerate(schema):
        value = args[2 + i] if len(args) > 2 + i else kwargs.get(arg, default)
        if is_list and isinstance(value, int):
            value = [value] * ndim
        values.append(list(value) if isinstance(value, tuple) else value)
        # a string padding ("same") selects the overload whose padding defaults to "valid"
        defaults.append("valid" if isinstance(value, str) else [default] * ndim if is_list else default)
    while values and values[-1] == defaults[len(values) - 1]:
        values.pop()
    return (*args[:2], *values), {}


def _read_value(func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
    try:
        return func(*args, **kwargs)
    except (RuntimeError, NotImplementedError):
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if tensor is None or not tensor.is_meta:
            raise
        raise MetaValueError(
            f"the forward reads a tensor's value (Tensor.{name} on a {tuple(tensor.shape)} tensor), for control flow "
            f"or a shape; a meta trace has shapes but no values (torch.export can trace torch.cond)") from None


class _NotMemoizable(Exception):  # noqa: N818 - control flow inside _Recorder.run, never raised to callers
    pass


_PLAIN = (bool, int, float, str, torch.dtype, torch.device, torch.memory_format, torch.layout)
_Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, bool]


def _metadata_key(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A hashable key of everything a meta kernel can see in ``value``; collects its tensors."""
    if isinstance(value, torch.Tensor):
        if not value.is_meta:
            raise _NotMemoizable  # a real tensor's values matter
        tensors.append(value)
        return tuple(value.shape), value.stride(), value.dtype, value.requires_grad
    if value is None or isinstance(value, _PLAIN):
        return type(value), value  # the type keeps 1, 1.0 and True apart
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_metadata_key(v, tensors) for v in value)
    if isinstance(value, dict):
        return tuple((k, _metadata_key(v, tensors)) for k, v in value.items())
    if isinstance(value, slice):
        return slice, value.start, value.stop, value.step
    raise _NotMemoizable


def _layout(out: Any, inputs: list[torch.Tensor]) -> _Layout | tuple[type, list[_Layout]] | None:
    """What a memo hit must rebuild: a fresh meta tensor's layout, or a plain tuple/list of them; else None."""
    def fresh(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.is_meta and not t._is_view() and all(t is not i for i in inputs)

    def layout(t: torch.Tensor) -> _Layout:
        return tuple(t.shape), t.stride(), t.dtype, t.requires_grad

    if fresh(out):
        return layout(out)
    if type(out) in (tuple, list) and out and all(fresh(t) for t in out):
        return type(out), [layout(t) for t in out]
    return None


# The autograd source of memo hits that require grad (see _from_layout).
_GRAD_SOURCE = torch.empty((), device="meta", requires_grad=True)


def _from_layout(layout: Any) -> Any:
    """A fresh meta tensor (or container of them) of a memoized layout.

    A result that requires grad is made a non-leaf, as the kernel's own result is: a leaf that
    requires grad rejects in-place ops (``ReLU(inplace=True)``, ``h += x``), so a memo hit would
    fail where the first call worked. ``copy_`` from a grad-requiring scalar gives it a grad_fn
    and keeps its strides.
    """
    if isinstance(layout[0], type):
        container, items = layout
        return container(_from_layout(item) for item in items)
    shape, stride, dtype, requires_grad = layout
    tensor = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    if not requires_grad:
        return tensor
    # under no_grad only a factory's requires_grad=True gives such a result, and that is a leaf
    return tensor.copy_(_GRAD_SOURCE) if torch.is_grad_enabled() else tensor.requires_grad_()


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value)


def _tensor_leaves(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensor_leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensor_leaves(item)


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _to_meta(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta


def _named_inputs(model: nn.Module, args: tuple, kwargs: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Each input tensor with export's placeholder name: its argument's name, nested keys joined by '_'."""
    try:
        names = list(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    except TypeError:
        names = []
    for i, value in enumerate(args):
        yield from _named_leaves(names[i] if i < len(names) else f"args_{i}", value)
    for key, value in kwargs.items():
        yield from _named_leaves(key, value)


def _named_leaves(prefix: str, value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _named_leaves(f"{prefix}_{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _named_leaves(f"{prefix}_{i}", item)
