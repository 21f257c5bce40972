"""Small user models for tests of ``--model module:factory`` and of capture failures."""
from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.stem(x)))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # data-dependent Python branch: no capture on meta tensors can follow it
            return x * 2
        return x


class DataDependentNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


def tiny_convnet() -> nn.Module:
    return TinyConvNet()


def data_dependent() -> nn.Module:
    return DataDependentNet()


def not_a_module() -> str:
    return "oops"


class ParamViews(nn.Module):
    """Parameters used through views and elementwise ops, not as a module's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(16, 8))
        self.proj = nn.Parameter(torch.zeros(8, 8))
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.pos[None] * 2.0
        return torch.nn.functional.linear(h, self.proj.t()) * self.scale


class ViewsAndContractions(nn.Module):
    """einsum, .mT, movedim and a matrix-vector product: ops whose axis maps and FLOPs are easy to get wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(16, 32))
        self.v = nn.Parameter(torch.zeros(32))
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.einsum("bsc,cd->bsd", x, self.w)  # (B, 64, 32)
        z = t @ self.v  # (B, 64): torch.matmul with a 1-D operand
        moved = torch.movedim(self.proj(y), 1, 2)  # (B, 5, 6) -> (B, 6, 5)
        return z, moved.mT


class ConvBatchNorm(nn.Module):
    """BatchNorm's running statistics are buffers, not parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class OptionalContext(nn.Module):
    """A None default decides a branch: symbolic_trace needs it fixed at trace time."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.attn(x, context, context, need_weights=False)[0]


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(100, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


class FailsOnOneRank(nn.Module):
    """Fails in its Nth real forward on the rank named by PASE_TEST_FAIL_RANK: raises, or with PASE_TEST_FAIL_KILL
    set SIGKILLs its own process (a rank that dies without a word). Meta-device captures never fail."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        import os
        import signal

        if x.device.type != "meta":
            FailsOnOneRank.calls += 1
            if FailsOnOneRank.calls == 2 and os.environ.get("PASE_TEST_FAIL_RANK") == os.environ.get("RANK"):
                if os.environ.get("PASE_TEST_FAIL_KILL"):
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ValueError("forward failed on purpose")
        return self.conv(x)


def fails_on_one_rank() -> nn.Module:
    return FailsOnOneRank()


def factory_that_raises() -> nn.Module:
    raise KeyError("missing weight")


def factory_with_arguments(width: int) -> nn.Module:
    return nn.Conv2d(3, width, 1)


NOT_CALLABLE = 3
