"""Spatial (height or width) splits of convolutions and group norms, applied to a live model.

The runtime half of the spatial dimension of ``strategies.splits``. Like a channel split, a spatially
split layer runs on a tensor-parallel group of ``t`` consecutive ranks and enters and leaves the batch
layout between layers through ``strategies.collectives``: its input's rows are exchanged all-to-all so
that each rank holds its ``1/t`` of the rows (height or width) of the group's batch, and its output is
exchanged back to batch chunks. Inside:

- a convolution (stride 1, "same" zero padding along the split axis) first receives the ``k // 2``
  boundary rows of each neighbour (the halo: a send per neighbour, forward; the rows' gradients sent
  back, backward), pads the group's outer edges with zeros as the whole convolution would, and runs
  without padding along that axis;
- a group norm sums each sample's and group's element count, sum and squared deviations over the group
  (two all-reduces of ``batch x groups`` floats, forward and backward), so its statistics are the whole
  image's.

Parameters stay whole on every rank (their gradients are summed over all ranks, as a batch split's), so
module names and checkpoints are unchanged. A convolution split by output channels and rows at once
(``OutSpatialConv``) holds its output rows of the weight instead. This is what the cost model prices for a
spatial split: the two re-layouts on the edges, the halo (``CostModel._halo``) and the statistics (``_norm_stats``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from strategies.collectives import batch_to_split, cells_to_batch, gather_batch, split_to_batch, sum_over
from strategies.tensor import SHARD_GROUP


def _exchange(tail_to_next: torch.Tensor, head_to_previous: torch.Tensor, group: Any
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Send ``head_to_previous`` to the previous rank of ``group`` and ``tail_to_next`` to the next; return (what
    the previous rank sent, what the next rank sent), None at the group's ends."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    from_previous = torch.empty_like(tail_to_next) if rank > 0 else None
    from_next = torch.empty_like(head_to_previous) if rank < size - 1 else None
    ops = []
    if rank > 0:
        previous = dist.get_global_rank(group, rank - 1)
        ops += [dist.P2POp(dist.isend, head_to_previous.contiguous(), previous, group),
                dist.P2POp(dist.irecv, from_previous, previous, group)]
    if rank < size - 1:
        following = dist.get_global_rank(group, rank + 1)
        ops += [dist.P2POp(dist.isend, tail_to_next.contiguous(), following, group),
                dist.P2POp(dist.irecv, from_next, following, group)]
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    return from_previous, from_next


class _Halo(torch.autograd.Function):
    """``x`` with ``width`` rows of each neighbour's boundary on either side along ``axis`` (zeros at the group's
    ends, the whole tensor's zero padding); the backward sends the halo rows' gradients back to their owners."""
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, width: int, axis: int, group: Any) -> torch.Tensor:
        ctx.width, ctx.axis, ctx.group = width, axis, group
        rows = x.shape[axis]
        above, below = _exchange(x.narrow(axis, rows - width, width), x.narrow(axis, 0, width), group)
        zeros = torch.zeros_like(x.narrow(axis, 0, width))
        return torch.cat([zeros if above is None else above, x, zeros if below is None else below], dim=axis)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        width, axis = ctx.width, ctx.axis
        rows = grad.shape[axis] - 2 * width
        inner = grad.narrow(axis, width, rows).clone()
        # the top halo's gradient belongs to the previous rank's last rows, the bottom's to the next rank's first;
        # so the previous rank's bottom-halo gradient is my first rows', the next rank's top-halo gradient my last
        from_previous, from_next = _exchange(grad.narrow(axis, width + rows, width), grad.narrow(axis, 0, width),
                                             ctx.group)
        if from_previous is not None:
            inner.narrow(axis, 0, width).add_(from_previous)
        if from_next is not None:
            inner.narrow(axis, rows - width, width).add_(from_next)
        return inner, None, None, None


def halo(x: torch.Tensor, width: int, axis: int, group: Any) -> torch.Tensor:
    """``x`` extended by ``width`` neighbour rows on both sides along ``axis`` (differentiable)."""
    return _Halo.apply(x, width, axis, group)


def _row_halo(module: nn.Conv2d, axis: int) -> tuple[int, tuple[int, ...]]:
    """(halo rows, padding without the split axis's) of a convolution split along ``axis``: stride 1, no dilation, an
    odd kernel with "same" zero padding there, so that each part needs ``kernel // 2`` neighbour rows a side."""
    if module.padding_mode != "zeros" or axis not in (2, 3):
        raise ValueError("only zero-padded convolutions split by height or width")
    along = axis - 2
    kernel, stride, dilation = module.kernel_size[along], module.stride[along], module.dilation[along]
    padding = module.padding if isinstance(module.padding, tuple) else (module.padding,) * 2
    if stride != 1 or dilation != 1 or kernel % 2 == 0 or padding[along] != kernel // 2:
        raise ValueError("a spatial split needs stride 1, no dilation and 'same' padding along its axis")
    return kernel // 2, tuple(0 if i == along else int(p) for i, p in enumerate(padding))


class SpatialConv(nn.Module):
    """A Conv2d on its rows (``axis`` 2: height, 3: width) of the tensor-parallel group's batch."""
    def __init__(self, module: nn.Conv2d, axis: int, group: Any) -> None:
        super().__init__()
        self.width, self.padding = _row_halo(module, axis)
        self.weight, self.bias = module.weight, module.bias  # whole: names and checkpoints unchanged
        self.axis, self.group = axis, group
        self.stride, self.dilation, self.groups = module.stride, module.dilation, module.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = batch_to_split(x, self.axis, self.group)
        if self.width:
            part = halo(part, self.width, self.axis, self.group)
        out = F.conv2d(part, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return split_to_batch(out, self.axis, self.group)

    def extra_repr(self) -> str:
        return f"Conv2d, {'height' if self.axis == 2 else 'width'} / {dist.get_world_size(self.group)}"


@dataclass
class OutSpatialGroups:
    """The process groups of an output-channel x row grid: a 3-D device mesh (dp, out, rows) of ``p / (f * s)`` x
    ``f`` x ``s`` ranks (``rows`` consecutive); ``grid`` the ``f * s`` ranks of one grid (out x rows, flattened) and
    ``weight`` the ranks holding the same output-channel part (dp x rows: its gradient is summed over them)."""
    out: Any
    rows: Any
    grid: Any
    weight: Any
    out_size: int
    rows_size: int

    @property
    def tp_size(self) -> int:
        return self.out_size * self.rows_size

    @classmethod
    def build(cls, device_type: str, world: int, f: int, s: int) -> OutSpatialGroups:
        mesh = init_device_mesh(device_type, (world // (f * s), f, s), mesh_dim_names=("dp", "out", "rows"))
        grid = mesh["out", "rows"]._flatten(f"out_rows_{f}x{s}").get_group()
        weight = mesh["dp", "rows"]._flatten(f"dp_rows_{f}x{s}").get_group()
        return cls(mesh.get_group("out"), mesh.get_group("rows"), grid, weight, f, s)


class OutSpatialConv(nn.Module):
    """A Conv2d split over its output channels ``f`` ways and its rows (``axis`` 2: height, 3: width) ``s`` ways, on
    an ``f x s`` grid of ranks: the rank at (k, j) computes output part k on row part j of the grid's batch. Its
    input's rows are exchanged all-to-all over ``rows`` and all-gathered over ``out`` (every input channel of row part
    j of the grid's batch, in batch order), the halo exchanged with its ``rows`` neighbours as ``SpatialConv`` does,
    and the output's (channel, row) cells exchanged all-to-all over the grid back to batch chunks: per edge, what the
    cost model prices for the configuration. The weight and bias are this rank's output rows (checkpoints gather them),
    their gradients summed over ``groups.weight``."""
    def __init__(self, module: nn.Conv2d, axis: int, groups: OutSpatialGroups) -> None:
        super().__init__()
        if module.groups != 1:
            raise ValueError("only ungrouped convolutions split by output channels x height or width")
        self.width, self.padding = _row_halo(module, axis)
        self.axis, self.groups = axis, groups
        self.stride, self.dilation = module.stride, module.dilation
        part = dist.get_rank(groups.out)
        self.weight = nn.Parameter(module.weight.detach().chunk(groups.out_size)[part].clone(),
                                   requires_grad=module.weight.requires_grad)
        setattr(self.weight, SHARD_GROUP, groups.weight)
        self.bias: nn.Parameter | None = None
        if module.bias is not None:
            self.bias = nn.Parameter(module.bias.detach().chunk(groups.out_size)[part].clone(),
                                     requires_grad=module.bias.requires_grad)
            setattr(self.bias, SHARD_GROUP, groups.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = gather_batch(batch_to_split(x, self.axis, self.groups.rows), self.groups.out)
        if self.width:
            part = halo(part, self.width, self.axis, self.groups.rows)
        out = F.conv2d(part, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return cells_to_batch(out, 1, self.axis, self.groups.out_size, self.groups.grid)

    def shard_cuts(self, leaf: str) -> tuple[tuple[int, Any], ...]:
        return ((0, self.groups.out),)

    @property
    def shard_halves(self) -> int:
        return 1

    def extra_repr(self) -> str:
        return f"Conv2d, out channels x {'height' if self.axis == 2 else 'width'} / {self.groups.out_size} x " \
               f"{self.groups.rows_size}"


class SpatialGroupNorm(nn.Module):
    """A GroupNorm on its rows (``axis`` >= 2) of the tensor-parallel group's batch, its statistics summed over
    the group (two passes: the mean, then the squared deviations, as the whole tensor's are computed)."""
    def __init__(self, module: nn.GroupNorm, axis: int, group: Any) -> None:
        super().__init__()
        self.num_groups, self.eps, self.affine = module.num_groups, module.eps, module.affine
        self.weight, self.bias = module.weight, module.bias
        self.axis, self.group = axis, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = batch_to_split(x, self.axis, self.group)
        shape = part.shape
        grouped = part.reshape(shape[0], self.num_groups, -1).float()
        count = grouped.shape[-1] * dist.get_world_size(self.group)
        mean = sum_over(grouped.sum(-1), self.group) / count
        centred = grouped - mean[..., None]
        variance = sum_over(centred.pow(2).sum(-1), self.group) / count
        out = (centred * torch.rsqrt(variance + self.eps)[..., None]).reshape(shape).to(part.dtype)
        if self.affine:
            view = (1, -1) + (1,) * (len(shape) - 2)
            out = out * self.weight.view(view) + self.bias.view(view)
        return split_to_batch(out, self.axis, self.group)

    def extra_repr(self) -> str:
        return f"GroupNorm({self.num_groups}), axis {self.axis} / {dist.get_world_size(self.group)}"


__all__ = ["OutSpatialConv", "OutSpatialGroups", "SpatialConv", "SpatialGroupNorm", "halo"]
