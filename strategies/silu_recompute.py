"""Let a custom layer fed by an ``nn.SiLU`` keep the SiLU's input for backward instead of its output.

In a norm -> SiLU -> conv chain (every diffusers ResnetBlock2D, twice) autograd keeps two tensors of
the same size: the SiLU saves its input h (for silu'(h)) and the conv its input silu(h). A layer
that knows its input is silu(h) can save h instead, the very storage the SiLU node already holds,
and rebuild silu(h) in backward, so one of the two tensors is gone. Exact, not an approximation:
the forward is untouched, and the rebuild runs the same kernel on the same tensor, so it gives the
same bits. TuneQDM's quantized layers do this (``strategies.tuneqdm``).

This module only tags: a forward hook on each ``nn.SiLU`` records on its output the input it came
from, and ``silu_source`` hands that input back while the tag still holds (neither tensor changed in
place since). Ops between the SiLU and the layer that return a new tensor (a view, a copy) drop the
tag and the layer saves its input as usual; dropout with p=0 returns its input, so the tag survives.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

_TAG = "_pase_silu_source"


def _tag(module: nn.SiLU, args: tuple[Any, ...], output: Any) -> None:
    if module.inplace or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) \
            or not output.requires_grad:
        return
    source = args[0]
    setattr(output, _TAG, (source, source._version, output._version))


def tag_silu_outputs(model: nn.Module) -> list[RemovableHandle]:
    """Tag the output of every (not in-place) ``nn.SiLU`` of ``model`` with its input, while grad is on."""
    return [module.register_forward_hook(_tag) for module in model.modules() if isinstance(module, nn.SiLU)]


def silu_source(x: torch.Tensor) -> torch.Tensor | None:
    """h if ``x`` is silu(h) from a tagged SiLU and neither was modified in place since, else None."""
    tag = getattr(x, _TAG, None)
    if tag is None:
        return None
    source, source_version, version = tag
    if x._version != version or source._version != source_version or source.shape != x.shape:
        return None
    return source


def rebuild(source: torch.Tensor) -> torch.Tensor:
    """silu(h) again, for backward: the SiLU module's own kernel on the same tensor."""
    return F.silu(source)
