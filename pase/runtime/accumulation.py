"""Gradient accumulation under every runtime: the data-parallel gradient reduction paused for the micro-steps
before an optimizer step's last, so it runs once per step on the summed gradients (``--grad-accum``)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.parallel import DistributedDataParallel


@contextmanager
def gradient_sync_paused(model: nn.Module) -> Iterator[None]:
    """Forward and backward passes inside add this rank's gradients locally, without reducing them over the
    ranks: DDP's ``no_sync``, and the hooks of a tensor plan's ``GradientSync`` skipped; the next backward outside
    reduces the sums. FSDP2 units keep reducing at every micro-step (their reduce-scatter into sharded
    gradients): pausing them would hold whole unsharded gradients, more memory than the plan priced."""
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    sync = getattr(model, "pase_sync", None)
    if sync is None:  # one process, or FSDP2 alone
        yield
        return
    with sync.paused():
        yield


__all__ = ["gradient_sync_paused"]
