"""Differentiable re-layouts between a batch-sharded tensor and a layer's channel- or head-split layout.

The runtime keeps every activation *between* layers batch-sharded over all ranks (rank ``r`` holds
rows ``r`` of ``p`` equal chunks). A layer split ``t`` ways over a tensor-parallel group of ``t``
consecutive ranks enters and leaves that layout through these autograd functions (Megatron's
"f/g" operators generalised to a batch-sharded outside world). Each uses the cheapest collective
for its pair of layouts, so that a rank receives exactly what the cost model prices for the edge
(``cost_models.layer_costs``: the consumer's block minus its overlap with the producer's, forward
activation and backward gradient; partial sums of which the consumer needs ``1/t`` as a
reduce-scatter):

- ``gather_batch``: the group's batch chunks concatenated (forward all-gather along dim 0), for a
  layer that needs every input channel of the group's batch (out-channel split); the backward sums
  the group's partial gradients and hands each rank its own chunk (reduce-scatter).
- ``batch_to_split``: from batch chunks to "the group's batch, my part of ``dim``" (channels of an
  in-channel split, heads of q, k, v): one all-to-all, each rank receiving the ``t - 1`` blocks of
  its part of ``dim`` that the other ranks of the group hold, ``(t - 1) / t`` of its input; the
  backward is the inverse all-to-all.
- ``split_to_batch``: the inverse, from "the group's batch, my part of ``dim``" (an out-channel
  split's or head split's output) back to batch chunks: ``(t - 1) / t`` of the local output moves,
  not the ``t - 1`` times it that an all-gather along ``dim`` followed by keeping one batch chunk
  would; the backward is ``batch_to_split``'s forward.
- ``replicate`` / ``own_chunk``: to and from the group's whole batch held alike by every rank of the group
  (a layer run on replicas, ``strategies.replication``): an all-gather whose backward keeps this rank's chunk of
  the (replicated) gradient without communication, and the inverse, whose backward all-gathers.
- ``cells_to_batch``: from a grid of channel x row parts of the group's batch (a convolution split by output
  channels and rows) to batch chunks in one all-to-all; the backward is the inverse.
- ``reduce_scatter_batch``: partial sums (in-channel split) summed over the group, each rank keeping
  its batch chunk; the backward all-gathers the gradient along dim 0.

All move data without arithmetic except the reduce-scatters' sums, so results equal the
single-process model's as the old all-gather-then-slice re-layouts did. Plain ``torch.distributed``
collectives on local tensors: DTensor's convolution rule is wrong for channel-sharded operands on
torch 2.13 (measured on gloo), these are not.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist


def gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group: Any) -> torch.Tensor:
    size = dist.get_world_size(group)
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x.contiguous(), group=group)
    return out


def _to_split(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """All-to-all: this rank's batch chunk, all of ``dim`` -> the group's batch, this rank's part of ``dim``."""
    size = dist.get_world_size(group)
    if x.shape[dim] % size:
        raise RuntimeError(f"dimension {dim} of size {x.shape[dim]} does not split {size} ways")
    send = torch.stack(x.chunk(size, dim=dim)).contiguous()  # send[j]: part j of dim, for rank j
    received = torch.empty(send.shape, dtype=send.dtype, device=send.device)
    dist.all_to_all_single(received, send, group=group)  # received[j]: rank j's batch chunk, my part
    return received.flatten(0, 1)  # batch chunks in rank order: the group's batch


def _to_batch(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """All-to-all: the group's batch, this rank's part of ``dim`` -> this rank's batch chunk, all of ``dim``."""
    size = dist.get_world_size(group)
    if x.shape[0] % size:
        raise RuntimeError(f"a batch of {x.shape[0]} does not split {size} ways")
    send = x.reshape(size, x.shape[0] // size, *x.shape[1:]).contiguous()  # send[j]: rank j's batch chunk
    received = torch.empty(send.shape, dtype=send.dtype, device=send.device)
    dist.all_to_all_single(received, send, group=group)  # received[j]: my batch chunk, rank j's part
    return torch.cat(received.unbind(0), dim=dim)


def _sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _own_chunk(x: torch.Tensor, group: Any) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group))[dist.get_rank(group)].contiguous()


Move = Callable[[torch.Tensor, Any], torch.Tensor]


class _Relayout(torch.autograd.Function):
    """``forward_move(x, group)``, whose backward is ``backward_move(grad, group)``: each public function below is
    one such pair of collectives."""
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, forward_move: Move, backward_move: Move) -> torch.Tensor:
        ctx.group, ctx.backward_move = group, backward_move
        return forward_move(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return ctx.backward_move(grad, ctx.group), None, None, None


def _gather_rows(x: torch.Tensor, group: Any) -> torch.Tensor:
    return gather(x, 0, group)


def _cells_to_batch(x: torch.Tensor, group: Any, channel: int, axis: int, parts: int) -> torch.Tensor:
    """All-to-all over a grid of ``parts`` channel parts x ``size / parts`` row parts (rank ``k * rows + j`` holds
    channel part k, row part j of the grid's batch) -> this rank's batch chunk, every channel and row."""
    size = dist.get_world_size(group)
    rows = size // parts
    send = x.reshape(size, x.shape[0] // size, *x.shape[1:]).contiguous()  # send[i]: rank i's batch chunk
    received = torch.empty(send.shape, dtype=send.dtype, device=send.device)
    dist.all_to_all_single(received, send, group=group)  # received[k * rows + j]: my chunk, part (k, j)
    cells = received.unbind(0)
    return torch.cat([torch.cat(cells[k * rows:(k + 1) * rows], dim=axis) for k in range(parts)], dim=channel)


def _batch_to_cells(x: torch.Tensor, group: Any, channel: int, axis: int, parts: int) -> torch.Tensor:
    """The inverse of ``_cells_to_batch``: this rank's batch chunk -> its cell (channel and row part) of the grid's
    batch."""
    size = dist.get_world_size(group)
    rows = size // parts
    send = torch.stack([cell for part in x.chunk(parts, dim=channel) for cell in part.chunk(rows, dim=axis)])
    received = torch.empty(send.shape, dtype=send.dtype, device=send.device)
    dist.all_to_all_single(received, send.contiguous(), group=group)  # received[i]: rank i's chunk, my cell
    return received.flatten(0, 1)


def cells_to_batch(x: torch.Tensor, channel: int, axis: int, parts: int, group: Any) -> torch.Tensor:
    """From "rank k * rows + j holds channel part k and row part j (along ``axis``) of the group's batch" to batch
    chunks: one all-to-all, ``(size - 1) / size`` of the local tensor moved (backward: the inverse)."""
    channel, axis = channel % x.dim(), axis % x.dim()
    return _Relayout.apply(x, group, partial(_cells_to_batch, channel=channel, axis=axis, parts=parts),
                           partial(_batch_to_cells, channel=channel, axis=axis, parts=parts))


def _parts_to_chunk(x: torch.Tensor, groups: tuple[Any, Any], channel: int) -> torch.Tensor:
    """All-to-all over ``out``: from output part k of the whole group's batch (the same on every replica) to this
    rank's batch chunk (chunk k' * r + q of ``out`` rank k', replica q), every part."""
    out, rep = groups
    parts, replicas, q = dist.get_world_size(out), dist.get_world_size(rep), dist.get_rank(rep)
    chunks = x.chunk(parts * replicas)
    send = torch.stack([chunks[k * replicas + q] for k in range(parts)]).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=out)  # received[k]: part k of my chunk
    return torch.cat(received.unbind(0), dim=channel)


def _chunk_to_parts(grad: torch.Tensor, groups: tuple[Any, Any], channel: int) -> torch.Tensor:
    """The inverse: this rank's chunk's gradient, every part -> part k's gradient for the whole group's batch (an
    all-to-all over ``out``, then an all-gather over the replicas)."""
    out, rep = groups
    parts, replicas = dist.get_world_size(out), dist.get_world_size(rep)
    send = torch.stack(grad.chunk(parts, dim=channel)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=out)  # received[k']: my part, chunk k' * r + q
    gathered = [torch.empty_like(received) for _ in range(replicas)]
    dist.all_gather(gathered, received, group=rep)  # gathered[q'][k']: chunk k' * r + q'
    rows = torch.stack(gathered, dim=1)  # (parts, replicas, chunk rows, ...): chunk order k' * r + q'
    return rows.flatten(0, 2)


def parts_to_chunk(x: torch.Tensor, channel: int, out: Any, rep: Any) -> torch.Tensor:
    """An output-channel split run on replica groups (``strategies.replication``): from this rank's output part of
    the whole group's batch to its own batch chunk, moving only that chunk's other parts (forward); the backward
    sends each part's gradient to its owners and gathers it over the replicas."""
    channel = channel % x.dim()
    return _Relayout.apply(x, (out, rep), partial(_parts_to_chunk, channel=channel),
                           partial(_chunk_to_parts, channel=channel))


def sum_over(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``x`` summed over the group (all-reduce), differentiable: the backward sums the gradients likewise (each rank's
    result feeds its own part of the loss)."""
    return _Relayout.apply(x, group, _sum, _sum)


def gather_batch(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The tensor-parallel group's batch chunks, concatenated (identical on every rank of the group)."""
    return _Relayout.apply(x, group, _gather_rows, _reduce_scatter)


def batch_to_split(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """From "rank i holds batch chunk i" to "rank i holds part i of ``dim``" of the group's whole batch."""
    dim = dim % x.dim()
    return _Relayout.apply(x, group, partial(_to_split, dim=dim), partial(_to_batch, dim=dim))


def split_to_batch(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """From "rank i holds part i of ``dim``" (group's whole batch) to "rank i holds batch chunk i"."""
    dim = dim % x.dim()
    return _Relayout.apply(x, group, partial(_to_batch, dim=dim), partial(_to_split, dim=dim))


def reduce_scatter_batch(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Partial sums over the group added up, each rank keeping its batch chunk."""
    return _Relayout.apply(x, group, _reduce_scatter, _gather_rows)


def replicate(x: torch.Tensor, group: Any) -> torch.Tensor:
    """From this rank's batch chunk to the group's whole batch, the same on every rank of ``group``."""
    return _Relayout.apply(x, group, _gather_rows, _own_chunk)


def own_chunk(x: torch.Tensor, group: Any) -> torch.Tensor:
    """From the group's whole batch (the same on every rank) back to this rank's batch chunk."""
    return _Relayout.apply(x, group, _own_chunk, _gather_rows)


__all__ = ["batch_to_split", "cells_to_batch", "gather", "gather_batch", "own_chunk", "parts_to_chunk",
           "reduce_scatter_batch", "replicate", "split_to_batch", "sum_over"]
