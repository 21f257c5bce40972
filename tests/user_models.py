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
