"""Time each planned layer as it runs (`pase verify --per-layer`): forward and backward, per layer kind.

Hooks on the module of every layer that owns one alone (a conv, linear, norm or attention module; functional
ops inside a block share the block's module and are not timed apart) time its forward and its backward. On a
GPU each hook records a CUDA event, read after the step's synchronise, so the kernels are timed where they run,
not where Python launched them; on a CPU the hooks read the clock. Modules nest (an attention module holds its
projections), so each layer's time is exclusive: what its timed children took is taken off. A module whose
inputs need no gradient (the first convolution, on the noisy sample) has its backward hook fired with its
pre-hook by torch: its weight gradients' time is not timed. The hooks cost time of their own: the step time
of a timed run is not the step time of the plan.
"""
from __future__ import annotations

import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pase.graph import LayerGraph

TIMED_KINDS = ("conv", "linear", "group_norm", "layer_norm", "attention")


@dataclass
class _Span:
    """One forward or backward of one timed module: its clock marks and its timed children's spans."""
    layer: str
    start: Any
    end: Any = None
    children: list[_Span] = field(default_factory=list)


class LayerTimer:
    """Forward and backward spans of the planned layers' modules in ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, graph: LayerGraph, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind_of: dict[str, str] = {}
        self.covers: dict[str, list[str]] = {}  # per timed layer, the plan's layers its module runs (itself and more)
        self.spans: list[_Span] = []  # top-level spans of the current step
        self._stack: list[_Span] = []
        self._handles: list[Any] = []
        self.enabled = False
        owners: dict[str, list[str]] = defaultdict(list)
        for layer_id, data in graph.layers():
            owners[data["module"]].append(layer_id)
        modules = dict(_inner(model).named_modules())
        for path, layers in owners.items():
            timed = [layer for layer in layers if graph[layer]["op"] in TIMED_KINDS]
            # one timed op per module; an attention module also runs its elementwise ops (reshapes, the residual)
            if len(timed) != 1 or path not in modules or (len(layers) > 1 and graph[timed[0]]["op"] != "attention"):
                continue
            layer = timed[0]
            self.kind_of[layer] = graph[layer]["op"]
            self.covers[layer] = layers
            module = modules[path]
            self._handles += [module.register_forward_pre_hook(self._opener(layer)),
                              module.register_forward_hook(self._closer()),
                              module.register_full_backward_pre_hook(self._opener(layer)),
                              module.register_full_backward_hook(self._closer())]

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _opener(self, layer: str) -> Any:
        def open_span(*_: Any) -> None:
            if self.enabled:
                span = _Span(layer, self._mark())
                (self._stack[-1].children if self._stack else self.spans).append(span)
                self._stack.append(span)
        return open_span

    def _closer(self) -> Any:
        def close_span(*_: Any) -> None:
            if self.enabled and self._stack:
                self._stack.pop().end = self._mark()
        return close_span

    @contextmanager
    def step(self) -> Iterator[None]:
        """Time what runs inside (one training step); ``take`` reads it afterwards."""
        self.spans, self._stack, self.enabled = [], [], True
        try:
            with warnings.catch_warnings():  # torch says so for the first conv each backward (see the docstring)
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield
        finally:
            self.enabled = False

    def take(self) -> dict[str, float]:
        """Seconds per layer of the step just timed (exclusive of timed children), after a synchronise."""
        if self.cuda:
            torch.cuda.synchronize()
        seconds: dict[str, float] = defaultdict(float)

        def walk(span: _Span) -> float:
            inner = sum(walk(child) for child in span.children)
            if span.end is None:  # a backward whose inputs need no gradient never closes: its own time is unknown
                return inner
            whole = (span.start.elapsed_time(span.end) / 1e3) if self.cuda else span.end - span.start
            seconds[span.layer] += max(0.0, whole - inner)
            return whole

        for span in self.spans:
            walk(span)
        return dict(seconds)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def per_kind(layer_seconds: list[dict[str, float]], timer: LayerTimer,
             predicted: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per layer kind: the layers timed, the median step's measured seconds and the plan's predicted seconds for
    what their modules run (``predicted``: per layer, the plan's seconds per step)."""
    result: dict[str, dict[str, float]] = {}
    for kind in sorted(set(timer.kind_of.values())):
        layers = [layer for layer, k in timer.kind_of.items() if k == kind]
        steps = sorted(sum(step.get(layer, 0.0) for layer in layers) for step in layer_seconds)
        result[kind] = {"layers": float(len(layers)), "measured_seconds": steps[len(steps) // 2] if steps else 0.0,
                        "predicted_seconds": sum(predicted.get(covered, 0.0) for layer in layers
                                                 for covered in timer.covers[layer])}
    return result


__all__ = ["LayerTimer", "TIMED_KINDS", "per_kind"]
