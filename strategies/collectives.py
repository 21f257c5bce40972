"""Differentiable re-layouts between a batch-sharded tensor and a layer's channel- or head-split layout.

The runtime keeps every activation *between* layers batch-sharded over all ranks (rank ``r`` holds
rows ``r`` of ``p`` equal chunks). A layer split ``t`` ways over a tensor-parallel group of ``t``
consecutive ranks enters and leaves that layout through these autograd functions (Megatron's
"f/g" operators generalised to a batch-sharded outside world):

- ``gather_batch``: the group's batch chunks concatenated (forward all-gather along dim 0); the
  backward sums the group's partial gradients and hands each rank its own chunk (reduce-scatter).
- ``split_to_batch``: a tensor split along ``dim`` (channels or heads, rank ``i`` holds part ``i``)
  back to batch chunks (forward all-gather along ``dim`` then this rank's batch chunk; backward
  all-gather along dim 0 then this rank's part of ``dim``).
- ``reduce_scatter_batch``: partial sums (in-channel split) summed over the group, each rank keeping
  its batch chunk; the backward all-gathers the gradient along dim 0.

Plain ``torch.distributed`` collectives on local tensors: DTensor's convolution rule is wrong for
channel-sharded operands on torch 2.13 (measured on gloo), these are not.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _chunk(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % size:
        raise RuntimeError(f"dimension {dim} of size {x.shape[dim]} does not split {size} ways")
    return x.chunk(size, dim=dim)[rank].contiguous()


def _reduce_scatter(x: torch.Tensor, group: Any) -> torch.Tensor:
    size = dist.get_world_size(group)
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x.contiguous(), group=group)
    return out


class _GatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return gather(x, 0, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter(grad, ctx.group), None


class _SplitToBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _chunk(gather(x, dim, group), 0, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _chunk(gather(grad, 0, ctx.group), ctx.dim, ctx.group), None, None


class _ReduceScatterBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return gather(grad, 0, ctx.group), None


def gather_batch(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The tensor-parallel group's batch chunks, concatenated (identical on every rank of the group)."""
    return _GatherBatch.apply(x, group)


def split_to_batch(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """From "rank i holds part i of ``dim``" (group's whole batch) to "rank i holds batch chunk i"."""
    return _SplitToBatch.apply(x, dim % x.dim(), group)


def reduce_scatter_batch(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Partial sums over the group added up, each rank keeping its batch chunk."""
    return _ReduceScatterBatch.apply(x, group)


def local_part(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """This rank's part of ``dim`` (plain slicing: its gradient is zero elsewhere, and the
    reduce-scatter in ``gather_batch``'s backward adds the other ranks' parts)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    step = x.shape[dim] // size
    return x.narrow(dim, rank * step, step)


__all__ = ["gather", "gather_batch", "local_part", "reduce_scatter_batch", "split_to_batch"]
