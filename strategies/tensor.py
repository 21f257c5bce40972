"""Channel (out/in) splits of Conv2d and Linear and head splits of attention, applied to a live model.

The runtime half of the channel/head dimensions of ``strategies.splits``. Between layers every
activation is batch-sharded over all ranks; a split layer runs on a tensor-parallel group of ``t``
consecutive ranks (its data-parallel peers are the ranks with the same position in other groups)
and re-lays its input and output with ``strategies.collectives``:

- out-channel split (column parallel): the group's batch gathered, the local weight rows applied,
  the output channels re-laid to batch chunks;
- in-channel split (row parallel): the group's batch gathered, the local input channels and weight
  columns applied, partial sums reduce-scattered to batch chunks, the bias added once;
- head split: inside the attention module, ``scaled_dot_product_attention`` runs on the local heads
  of the group's batch and its output is re-laid to batch chunks.

Weight shards' gradients are summed over their data-parallel peers, replicated parameters' over
all ranks, both divided by the world size (each rank's loss is its chunk's mean), so gradients
equal the single-process model's on the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.overrides import TorchFunctionMode

from strategies.collectives import gather_batch, local_part, reduce_scatter_batch, split_to_batch
from strategies.data import average_gradients

SHARD_GROUP = "_pase_replica_group"  # attribute naming the group a sharded parameter's gradient is summed over


@dataclass
class TensorGroups:
    """The process groups of one tensor-parallel degree ``t``: a 2-D device mesh (dp = p / t, tp = t)."""
    tp: Any
    dp: Any
    tp_size: int
    mesh: Any = None

    @classmethod
    def build(cls, device_type: str, world: int, t: int) -> TensorGroups:
        mesh = init_device_mesh(device_type, (world // t, t), mesh_dim_names=("dp", "tp"))
        return cls(tp=mesh.get_group("tp"), dp=mesh.get_group("dp"), tp_size=t, mesh=mesh)


class ChannelSplit(nn.Module):
    """A Conv2d or Linear whose output (``"out"``) or input (``"in"``) channels are split over ``groups.tp``."""
    def __init__(self, module: nn.Conv2d | nn.Linear, split: str, groups: TensorGroups) -> None:
        super().__init__()
        if split not in ("out", "in"):
            raise ValueError(f"split must be 'out' or 'in', not {split!r}")
        self.split, self.groups = split, groups
        self.is_conv = isinstance(module, nn.Conv2d)
        if self.is_conv:
            if module.groups != 1 or module.padding_mode != "zeros":
                raise ValueError("only ungrouped, zero-padded convolutions can be channel-split")
            self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation
        t, rank = groups.tp_size, dist.get_rank(groups.tp)
        weight = module.weight.detach()
        self.weight = nn.Parameter(weight.chunk(t, dim=0 if split == "out" else 1)[rank].clone(),
                                   requires_grad=module.weight.requires_grad)
        setattr(self.weight, SHARD_GROUP, groups.dp)
        self.bias: nn.Parameter | None = None
        if module.bias is not None:
            bias = module.bias.detach()
            self.bias = nn.Parameter(bias.chunk(t)[rank].clone() if split == "out" else bias.clone(),
                                     requires_grad=module.bias.requires_grad)
            if split == "out":
                setattr(self.bias, SHARD_GROUP, groups.dp)

    def _apply_op(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, self.weight, bias, self.stride, self.padding, self.dilation)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = 1 if self.is_conv else -1
        whole = gather_batch(x, self.groups.tp)
        if self.split == "out":
            return split_to_batch(self._apply_op(whole, self.bias), channel, self.groups.tp)
        partial = self._apply_op(local_part(whole, channel % x.dim(), self.groups.tp), None)
        out = reduce_scatter_batch(partial, self.groups.tp)
        if self.bias is not None:
            out = out + (self.bias.view(-1, 1, 1) if self.is_conv else self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{'Conv2d' if self.is_conv else 'Linear'}, {self.split}-channels / {self.groups.tp_size}"


class _HeadSplitAttention(TorchFunctionMode):
    """Runs ``scaled_dot_product_attention`` on this rank's heads of the group's batch."""
    def __init__(self, groups: TensorGroups) -> None:
        super().__init__()
        self.groups = groups
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if mask is not None:
            raise NotImplementedError("head-split attention with an attention mask")
        group = self.groups.tp
        q, k, v = (local_part(gather_batch(t, group), 1, group) for t in args[:3])
        self.calls += 1
        return split_to_batch(func(q, k, v, *args[3:], **kwargs), 1, group)


def split_heads(module: nn.Module, groups: TensorGroups) -> _HeadSplitAttention:
    """Make ``module``'s attention run on this rank's heads (its forward runs under the mode; parameter
    names and the module tree stay as they were). Returns the mode, whose ``calls`` counts applications."""
    mode = _HeadSplitAttention(groups)
    forward = module.forward

    def head_split_forward(*args: Any, **kwargs: Any) -> Any:
        with mode:
            return forward(*args, **kwargs)

    module.forward = head_split_forward
    return mode


@dataclass
class GradientSync:
    """After each backward: every parameter's gradient summed over its replica group, divided by the world.

    Runs as an autograd-engine callback queued by the first gradient hook of a backward (as DDP
    does), in flat bucketed all-reduces per replica group (``strategies.data.average_gradients``).
    """
    groups: list[tuple[Any, list[nn.Parameter]]]
    world: int
    _queued: bool = field(default=False, init=False)

    @classmethod
    def install(cls, model: nn.Module, world: int) -> GradientSync:
        by_group: dict[int, tuple[Any, list[nn.Parameter]]] = {}
        for param in model.parameters():
            if param.requires_grad:
                group = getattr(param, SHARD_GROUP, None)
                by_group.setdefault(id(group), (group, []))[1].append(param)
        sync = cls(list(by_group.values()), world)
        for _, params in sync.groups:
            for param in params:
                param.register_post_accumulate_grad_hook(sync._on_grad)
        return sync

    def _on_grad(self, _param: nn.Parameter) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.synchronize)

    def synchronize(self) -> None:
        self._queued = False
        for group, params in self.groups:
            for param in params:  # a parameter this rank's graph did not reach still takes part, with zeros
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            average_gradients(params, group, self.world)


__all__ = ["ChannelSplit", "GradientSync", "split_heads", "SHARD_GROUP", "TensorGroups"]
