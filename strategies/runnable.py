"""The configurations the runtime runs exactly as planned: the search's default space, and the runtime's check.

One rule, read by both sides, so that a plan is a promise: ``pase.planning`` searches only these
configurations (unless asked for ``--space all``, whose plans say they are not runnable), and
``pase.runtime`` refuses any layer outside them instead of running it some other way.

Between layers the runtime keeps every activation batch-sharded over all ``p`` ranks (rank ``r``
holds batch chunk ``r``). A layer then runs as one of:

- **batch** (``strategies.data``): ``{batch: p}``, every layer kind; a layer without a batch
  dimension (a table, a constant) runs whole on every rank (``{}``);
- **out** / **in** (``strategies.tensor``, column / row parallel): a plain Conv2d or Linear
  (ungrouped, not transposed) with ``{batch: p/t, out_channel: t}`` or ``{batch: p/t, reduction: t}``
  for ``1 < t | p``, on a tensor-parallel group of ``t`` consecutive ranks;
- **heads** (``strategies.tensor``): attention with ``{batch: p/t, head: t}``.

Under FSDP only the batch layouts run (FSDP2 shards whole modules over all ranks). Every other
configuration (spatial, sequence, norm-channel splits, two tensor dimensions at once, fewer
devices than ``p``) is priced only by ``--space all``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from strategies.splits import SplitSpace

SPACES = ("runnable", "all")  # pase plan --space
TENSOR_LAYOUTS = {("conv", "out_channel"): "out", ("conv", "reduction"): "in", ("linear", "out_channel"): "out",
                  ("linear", "reduction"): "in", ("attention", "head"): "heads"}


@dataclass(frozen=True)
class LayerRun:
    """How the runtime runs one layer: ``kind`` is "batch", "out", "in" or "heads"; ``factor`` the
    tensor-parallel degree (1 for batch)."""
    kind: str
    factor: int = 1


class NotRunnable(ValueError):
    """A configuration the runtime would not run as planned; the message says why."""


def layer_run(layer: Mapping[str, Any], splits: Mapping[str, int], devices: int, fsdp: bool = False) -> LayerRun:
    """The runtime's layout for ``layer`` under ``splits`` on ``devices`` ranks, or ``NotRunnable``."""
    roles = layer["roles"]
    split = {d: int(f) for d, f in splits.items() if int(f) > 1}
    batch_dims = [d for d, role in roles.items() if role == "batch"]
    batch = int(np.prod([split.get(d, 1) for d in batch_dims])) if batch_dims else 1
    others = {d: f for d, f in split.items() if roles.get(d) != "batch"}
    if not others:
        if batch == devices or (not batch_dims and batch == 1):
            return LayerRun("batch")
        split = "unsplit" if batch == 1 else f"split {batch} ways"
        raise NotRunnable(f"its batch is {split} on {devices} ranks, leaving replicas; the runtime splits the batch "
                          "over all ranks")
    if len(others) > 1:
        raise NotRunnable(f"{' x '.join(sorted(others))}: the runtime splits at most one dimension besides the batch")
    (dim, factor), = others.items()
    role, op = roles.get(dim), layer["op"]
    kind = TENSOR_LAYOUTS.get((op, role))
    if kind is None:
        raise NotRunnable(f"{role} splits of {op} layers have no runtime (only {_tensor_kinds()})")
    if fsdp:
        raise NotRunnable("FSDP runs batch layouts only (it shards whole modules over all ranks)")
    if kind in ("out", "in") and not _plain(layer):
        raise NotRunnable(f"{role} splits of grouped or transposed {op} layers have no runtime")
    if batch * factor != devices:
        raise NotRunnable(f"{role} split {factor} x batch split {batch} uses {batch * factor} of {devices} ranks: "
                          "the runtime needs the batch split over the rest")
    return LayerRun(kind, factor)


def runnable_reason(layer: Mapping[str, Any], splits: Mapping[str, int], devices: int,
                    fsdp: bool = False) -> str | None:
    """None when the runtime runs ``splits`` as planned, else why not (one line)."""
    try:
        layer_run(layer, splits, devices, fsdp)
    except NotRunnable as exc:
        return str(exc)
    return None


def runnable_mask(layer: Mapping[str, Any], space: SplitSpace, devices: int, fsdp: bool = False) -> np.ndarray:
    """Per configuration of ``space``: does the runtime run it as planned. O(K)."""
    return np.array([runnable_reason(layer, space.config(k), devices, fsdp) is None for k in range(len(space))],
                    dtype=bool)


def restrict(space: SplitSpace, mask: np.ndarray) -> SplitSpace:
    """The configurations of ``space`` where ``mask`` holds."""
    return SplitSpace(space.dims, space.factors[mask].reshape(int(mask.sum()), len(space.dims)))


def interface_config(layer: Mapping[str, Any], space: SplitSpace, devices: int) -> int | None:
    """Index in ``space`` of the layout activations have between layers (the batch split over all
    ranks), or None when the space lacks it."""
    splits = {d: devices for d in space.dims if layer["roles"].get(d) == "batch"}
    return space.index_of(splits)


def _plain(layer: Mapping[str, Any]) -> bool:
    attrs = layer.get("attrs", {})
    return int(attrs.get("groups", 1) or 1) == 1 and not attrs.get("transposed", False)


def _tensor_kinds() -> str:
    return ", ".join(f"{role} of {op}" for op, role in TENSOR_LAYOUTS)


__all__ = ["LayerRun", "NotRunnable", "SPACES", "interface_config", "layer_run", "restrict", "runnable_mask",
           "runnable_reason"]
