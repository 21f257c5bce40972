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
module names and checkpoints are unchanged. This is what the cost model prices for a spatial split:
the two re-layouts on the edges, the halo (``CostModel._halo``) and the statistics (``_norm_stats``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from strategies.collectives import batch_to_split, split_to_batch, sum_over


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


class SpatialConv(nn.Module):
    """A Conv2d on its rows (``axis`` 2: height, 3: width) of the tensor-parallel group's batch."""
    def __init__(self, module: nn.Conv2d, axis: int, group: Any) -> None:
        super().__init__()
        if module.padding_mode != "zeros" or axis not in (2, 3):
            raise ValueError("only zero-padded convolutions split by height or width")
        along = axis - 2
        kernel, stride, dilation = module.kernel_size[along], module.stride[along], module.dilation[along]
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,) * 2
        if stride != 1 or dilation != 1 or kernel % 2 == 0 or padding[along] != kernel // 2:
            raise ValueError("a spatial split needs stride 1, no dilation and 'same' padding along its axis")
        self.weight, self.bias = module.weight, module.bias  # whole: names and checkpoints unchanged
        self.axis, self.group, self.width = axis, group, kernel // 2
        self.stride, self.dilation, self.groups = module.stride, module.dilation, module.groups
        self.padding = tuple(0 if i == along else p for i, p in enumerate(padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = batch_to_split(x, self.axis, self.group)
        if self.width:
            part = halo(part, self.width, self.axis, self.group)
        out = F.conv2d(part, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return split_to_batch(out, self.axis, self.group)

    def extra_repr(self) -> str:
        return f"Conv2d, {'height' if self.axis == 2 else 'width'} / {dist.get_world_size(self.group)}"


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


__all__ = ["SpatialConv", "SpatialGroupNorm", "halo"]
