"""The normalized op graph both capture front-ends produce, before grouping into layers.

One ``OpNode`` per fx node that matters, named canonically (see ``opset``), with its tensor
operands in argument order, the few attributes layer rules need, and its output metadata.
Plain data: no torch.fx objects survive past capture.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer of the model, by its qualified name."""

    fqn: str
    meta: TensorMeta
    trainable: bool


@dataclass
class OpNode:
    name: str
    op: str  # canonical op name (opset vocabulary); "input" for model inputs
    operands: list[str]  # names of OpNodes or ParamRef fqns, in argument order
    out: TensorMeta | tuple[TensorMeta | None, ...] | None
    module: str = ""  # innermost module path ("" = the root)
    module_class: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_out(self) -> TensorMeta | None:
        return self.out if isinstance(self.out, TensorMeta) else None


@dataclass
class OpGraph:
    """Ops in topological order, the parameters they read, and the model's inputs and outputs."""

    ops: list[OpNode]
    params: dict[str, ParamRef]
    inputs: list[str]
    outputs: list[str]
    method: str  # the front end that captured it: "meta_trace", "export" or "symbolic_trace"
