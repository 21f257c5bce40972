"""Dynamic loss scaling for fp16 training, agreed across every rank.

fp16 gradients underflow unless the loss is scaled up before the backward. The rule is
``torch.amp.GradScaler``'s: multiply the loss by ``scale``; after the backward (and the gradient
sync), if any gradient is inf or NaN, skip the optimizer step and halve the scale; otherwise divide
the gradients by the scale, step, and double the scale after ``growth_interval`` good steps in a
row. Written out rather than taken from GradScaler because under a plan the gradients are shards
(channel splits, FSDP2 DTensors): one rank's overflow must skip every rank's step, so the check is
all-reduced over the world, and the scale travels in checkpoints so that a resumed run continues
exactly.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pase.runtime.state import local_part


@dataclass
class LossScaler:
    scale: float = 2.0 ** 16
    growth_interval: int = 2000
    good_steps: int = 0  # finite steps since the last change of scale
    skipped: int = 0  # optimizer steps skipped for overflow, this run

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale(self, params: Iterable[nn.Parameter]) -> bool:
        """Divide every gradient by the scale unless some rank's holds inf or NaN; True when the step may go on."""
        grads = [local_part(p.grad) for p in params if p.grad is not None]
        bad = torch.zeros((), device=grads[0].device if grads else "cpu")
        for grad in grads:
            bad = torch.maximum(bad, (~torch.isfinite(grad)).any().to(bad.dtype))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            return False
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)
        return True

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale, self.good_steps, self.skipped = self.scale / 2, 0, self.skipped + 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = self.scale * 2, 0

    def state(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load(self, state: dict[str, Any]) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


__all__ = ["LossScaler"]
