"""Parallel sampling: the time axis of a sampler as a parallel dimension.

Owns the configurations the sample planner considers (which sampler, ParaDiGMS window, SRDS
block count and schedule) and how the runtime applies one (``pase.sampling.runner``). Costs are
priced in ``pase.sampling.planner`` over ``cost_models`` rates; the samplers live in
``pase.sampling``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingConfig:
    """One point of the search space: sampler plus its one structural knob."""

    sampler: str  # sequential, batch, paradigms, srds, srds-pipelined
    window: int | None = None  # ParaDiGMS: steps per pass
    blocks: int | None = None  # SRDS: blocks (divides the steps)


def window_candidates(steps: int, devices: int) -> list[int]:
    """ParaDiGMS windows: powers of two and multiples of the device count, 2..N."""
    found = {2 ** k for k in range(int(math.log2(steps)) + 1)}
    found |= {devices * k for k in (1, 2, 4, 8, 16, 32) if devices * k <= steps}
    return sorted(w for w in found if 2 <= w <= steps)


def block_candidates(steps: int) -> list[int]:
    """SRDS block counts: every divisor of N other than 1 and N (both are plain serial sampling)."""
    return [b for b in range(2, steps) if steps % b == 0]


def candidates(steps: int, devices: int) -> list[SamplingConfig]:
    """Every configuration worth pricing for N steps on ``devices`` devices."""
    out = [SamplingConfig("sequential")]
    if devices > 1:
        out.append(SamplingConfig("batch"))
    out += [SamplingConfig("paradigms", window=w) for w in window_candidates(steps, devices)]
    for blocks in block_candidates(steps):
        out += [SamplingConfig("srds", blocks=blocks), SamplingConfig("srds-pipelined", blocks=blocks)]
    return out
