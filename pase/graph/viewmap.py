"""Where each axis of a viewed tensor comes from: the axis maps of view, reshape and permute.

Views are folded into the edges of the layer graph, so an edge must say which producer axes
each consumer axis is made of. ``view_axis_map`` answers that for one view op; maps compose
by lookup. All functions are O(ndim).
"""
from __future__ import annotations

from math import prod
from typing import Any

AxisMap = list[tuple[int, ...]]  # out axis -> the input axes it is made of (empty: broadcast / new)


def view_axis_map(op: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], attrs: dict[str, Any]) -> AxisMap:
    """The axis map of one view op from ``in_shape`` to ``out_shape``."""
    if "perm" in attrs:
        return [(p % len(in_shape),) for p in attrs["perm"]]
    if attrs.get("reverse"):
        return [(i,) for i in reversed(range(len(in_shape)))]
    if "movedim" in attrs:
        return [(p,) for p in movedim_permutation(len(in_shape), *attrs["movedim"])]
    if "swap" in attrs:
        perm = list(range(len(in_shape)))
        a, b = (d % len(in_shape) for d in attrs["swap"])
        perm[a], perm[b] = perm[b], perm[a]
        return [(p,) for p in perm]
    if len(in_shape) == len(out_shape) and (op != "view" and op != "reshape" or in_shape == out_shape):
        # slicing keeps each axis (possibly shorter); an axis that grew was broadcast
        return [(i,) if out_shape[i] <= in_shape[i] else () for i in range(len(in_shape))]
    if op in ("expand", "expand_as", "broadcast_to"):
        return broadcast_axis_map(in_shape, out_shape)
    if prod(in_shape) == prod(out_shape):
        return reshape_axis_map(in_shape, out_shape)
    return _greedy_axis_map(in_shape, out_shape)


def movedim_permutation(ndim: int, source: int | list[int], destination: int | list[int]) -> list[int]:
    """``torch.movedim``'s result as a permutation: out axis i comes from input axis perm[i]."""
    sources = [s % ndim for s in (source if isinstance(source, (list, tuple)) else [source])]
    destinations = [d % ndim for d in (destination if isinstance(destination, (list, tuple)) else [destination])]
    perm: list[int | None] = [None] * ndim
    for s, d in zip(sources, destinations):
        perm[d] = s
    rest = iter(i for i in range(ndim) if i not in sources)
    return [p if p is not None else next(rest) for p in perm]


def broadcast_axis_map(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> AxisMap:
    """Right-aligned broadcasting: an axis maps when its extent is kept, not when it is 1 -> n."""
    offset = len(out_shape) - len(in_shape)
    result: AxisMap = []
    for j in range(len(out_shape)):
        i = j - offset
        result.append((i,) if i >= 0 and in_shape[i] == out_shape[j] and in_shape[i] != 1 else ())
    return result


def reshape_axis_map(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> AxisMap:
    """Group axes by equal running products: merged axes map to all their sources, split ones share them."""
    result: AxisMap = [() for _ in out_shape]
    in_axes = [i for i, d in enumerate(in_shape) if d != 1]
    out_axes = [j for j, d in enumerate(out_shape) if d != 1]
    i = j = 0
    while i < len(in_axes) and j < len(out_axes):
        group_in, group_out = [in_axes[i]], [out_axes[j]]
        p_in, p_out = in_shape[in_axes[i]], out_shape[out_axes[j]]
        while p_in != p_out:
            if p_in < p_out:
                i += 1
                group_in.append(in_axes[i])
                p_in *= in_shape[in_axes[i]]
            else:
                j += 1
                group_out.append(out_axes[j])
                p_out *= out_shape[out_axes[j]]
        for axis in group_out:
            result[axis] = tuple(group_in)
        i, j = i + 1, j + 1
    return result


def _greedy_axis_map(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> AxisMap:
    """Indexing that drops or slices axes: match extents left to right."""
    result: AxisMap = []
    i = 0
    for extent in out_shape:
        while i < len(in_shape) and in_shape[i] < extent:
            i += 1
        if i < len(in_shape) and extent != 1:
            result.append((i,))
            i += 1
        else:
            result.append(())
    return result


def compose(outer: AxisMap, inner: AxisMap) -> AxisMap:
    """Map of ``inner`` after ``outer``: out axis -> base axes, through one more view."""
    return [tuple(sorted({b for a in axes for b in outer[a]})) if axes else () for axes in inner]
