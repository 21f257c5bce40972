"""Count the bytes every torch.distributed collective moves, at the call boundary, in the cost model's convention.

``CommCounter`` is a ``TorchDispatchMode``: every c10d op dispatched while it is active is seen, whoever
issues it. On gloo and NCCL that is the runtime's own collectives (``strategies.collectives``,
``GradientSync``), DDP's C++ bucket all-reduces, FSDP2's all-gathers and reduce-scatters, and
``torch.distributed.pipelining``'s sends. A call's bytes are its buffer's bytes times the bus factor of
``cost_models.conventions`` for its group size (all-reduce 2(g-1)/g of the buffer, all-gather (g-1)/g of
the output, reduce-scatter and all-to-all (g-1)/g of the input (``MOVED_FACTOR``), a send its bytes; a receive is the
sender's). That is the figure the cost model predicts per device (``Prediction.comm_bytes_per_device``),
so the two compare directly.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from cost_models.conventions import MOVED_FACTOR


def _bytes(tensors: Any) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, (list, tuple)):
        return sum(_bytes(t) for t in tensors)
    return 0


# c10d op -> (convention, which argument holds the buffer the convention counts)
_OPS: dict[str, tuple[str, Callable[[tuple], int]]] = {
    "allreduce_": ("all_reduce", lambda a: _bytes(a[0])),
    "allreduce_coalesced_": ("all_reduce", lambda a: _bytes(a[0])),
    "_allgather_base_": ("all_gather", lambda a: _bytes(a[0])),
    "allgather_": ("all_gather", lambda a: _bytes(a[0])),
    "allgather_coalesced_": ("all_gather", lambda a: _bytes(a[0])),
    "allgather_into_tensor_coalesced_": ("all_gather", lambda a: _bytes(a[0])),
    "_reduce_scatter_base_": ("reduce_scatter", lambda a: _bytes(a[1])),
    "reduce_scatter_": ("reduce_scatter", lambda a: _bytes(a[1])),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", lambda a: _bytes(a[1])),
    "alltoall_base_": ("all_to_all", lambda a: _bytes(a[1])),
    "alltoall_": ("all_to_all", lambda a: _bytes(a[1])),
    "send": ("send_recv", lambda a: _bytes(a[0])),
    "broadcast_": ("broadcast", lambda a: _bytes(a[0])),
}
_UNCOUNTED = {"recv_", "recv_any_source_", "barrier", "monitored_barrier_"}  # the sender counts a transfer


class CommCounter(TorchDispatchMode):
    """``with CommCounter() as count: ...`` then ``count.total_bytes`` (this rank), ``count.bytes`` and
    ``count.calls`` per convention op."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func.namespace == "c10d":
            self._record(func._schema.name.split("::", 1)[1], args)
        return func(*args, **(kwargs or {}))

    def _record(self, name: str, args: tuple) -> None:
        if name in _UNCOUNTED:
            return
        op, buffer = _OPS.get(name, (name, lambda a: 0))
        size = _group_size(args)
        factor = MOVED_FACTOR[op](size) if op in MOVED_FACTOR else (size - 1) / size
        self.calls[op] += 1
        self.bytes[op] += buffer(args) * factor if size > 1 else 0.0


def _group_size(args: tuple) -> int:
    """The size of the process group among a c10d op's arguments (a boxed ``ProcessGroup``)."""
    for arg in args:
        if isinstance(arg, torch.ScriptObject):
            return dist.ProcessGroup.unbox(arg).size()
    return 1


__all__ = ["CommCounter"]
