"""Replicated layers: a batch split over fewer ranks than the world, run on sub-groups of the mesh.

A configuration ``{batch: b}`` with ``b < p`` (``b`` dividing ``p``; ``b = 1``: the layer unsplit) gives
each of ``b`` groups of ``t = p / b`` consecutive ranks one batch chunk of the layer. PaSE prices it as
``b`` devices busy: compute ``flops / b`` per device, the weight's gradient all-reduced over ``b`` peers,
and on its edges the consumer's block (``N / b`` samples) gathered from the producer's (``N / p``), the
gradient of the producer's own block already on hand. The runtime runs exactly that, with every rank of
a group computing the group's chunk (replicas, not idle devices: the same time, and no rank waits on
another's broadcast):

- in: the group's batch all-gathered (forward); its gradient is the same on every replica, so the
  backward keeps this rank's chunk of it without communication;
- out: this rank's chunk of the group's output kept (forward, no communication); the backward
  all-gathers the output's gradient over the group (the layer needs its whole chunk's);
- weights: each replica's gradient is its group's, so it is summed over the ``b`` data-parallel peers
  (the ranks holding the same position in the other groups), not the world.

It applies to layers that are a module's whole forward (Conv2d, Linear, GroupNorm, LayerNorm: a forward
pre-hook and hook on the module, whose names and parameters stay as they are) and to attention computed
by ``scaled_dot_product_attention`` (q, k and v gathered, the output's chunk kept). Ops fused after such a
module in its parent's forward (a SiLU after a norm) run on this rank's chunk, after the module.

An output-channel split whose batch is split over fewer ranks than the world runs the same way on its
parts (``replicate_split``): ``r`` replicas per output part gather their input over the replicas, the split
gathers the group's batch over its ``f`` parts, and its output part goes to the batch chunks' ranks by one
all-to-all over the parts (its backward gathers the part's gradient over the replicas): the re-layouts the
cost model prices for ``{batch: b, out_channel: f}`` through the batch layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.overrides import TorchFunctionMode

from strategies.collectives import own_chunk, parts_to_chunk, replicate
from strategies.tensor import REPLICA_GROUPS, SHARD_GROUP, TensorGroups


def replicate_module(module: nn.Module, groups: Any) -> nn.Module:
    """Run ``module`` (one tensor in, one out, batch first) on its group's batch: hooks gather its input and keep
    this rank's chunk of its output; its parameters' gradients are summed over ``groups.dp``."""
    group = groups.tp

    def gather_input(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"a replicated {type(module).__name__} takes a tensor first, not {type(args[0]).__name__}"
                            if args else f"a replicated {type(module).__name__} got no positional input")
        return (replicate(args[0], group), *args[1:])

    def keep_chunk(_: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return own_chunk(output, group)

    module.register_forward_pre_hook(gather_input)
    module.register_forward_hook(keep_chunk)
    for param in module.parameters(recurse=False):
        setattr(param, SHARD_GROUP, groups.dp)
    setattr(module, REPLICA_GROUPS, groups)
    return module


@dataclass
class ReplicaSplitGroups(TensorGroups):
    """An output-channel split over ``f`` ranks whose batch is split over fewer ranks than the world: a 3-D mesh
    (dp, tp, rep) of ``b x f x r`` ranks (``rep`` consecutive). ``tp`` and ``dp`` serve ``ChannelSplit`` as a
    ``TensorGroups``' do (the split and the gradient peers: replicas compute the same gradient, so it is summed over
    ``dp`` alone); ``rep`` holds the replicas of one output part."""
    rep: Any = None

    @classmethod
    def build_replicas(cls, device_type: str, world: int, f: int, r: int) -> ReplicaSplitGroups:
        mesh = init_device_mesh(device_type, (world // (f * r), f, r), mesh_dim_names=("dp", "tp", "rep"))
        return cls(tp=mesh.get_group("tp"), dp=mesh.get_group("dp"), tp_size=f, mesh=mesh, rep=mesh.get_group("rep"))


def replicate_split(split: nn.Module, groups: ReplicaSplitGroups, channel: int) -> nn.Module:
    """Hooks around an out-split ``ChannelSplit`` that keeps its output part of its group's batch: the input
    gathered over the replicas first (the split then gathers over ``tp``), and the output part sent to the ranks
    whose batch chunks it holds (``parts_to_chunk``)."""
    def gather_input(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (replicate(args[0], groups.rep), *args[1:])

    def to_chunk(_: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return parts_to_chunk(output, channel, groups.tp, groups.rep)

    split.register_forward_pre_hook(gather_input)
    split.register_forward_hook(to_chunk)
    return split


class ReplicatedAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` on the group's batch: q, k and v gathered, this rank's output chunk kept."""
    def __init__(self, groups: Any) -> None:
        super().__init__()
        self.groups = groups
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        if kwargs.get("attn_mask", args[3] if len(args) > 3 else None) is not None:
            raise NotImplementedError("replicated attention with an attention mask")
        group = self.groups.tp
        self.calls += 1
        q, k, v = (replicate(x, group) for x in args[:3])
        return own_chunk(func(q, k, v, *args[3:], **kwargs), group)


__all__ = ["ReplicaSplitGroups", "ReplicatedAttention", "replicate_module", "replicate_split"]
