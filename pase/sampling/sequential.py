"""The baselines: sequential sampling (N network calls of the samples' batch) and plain
batch-parallel sampling (each rank samples its share of the samples sequentially)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pase.sampling.core import SamplerCore
from pase.sampling.distributed import Evaluator, gather_samples, local_slice

Progress = Callable[[int, int], None]  # (steps done, steps in all)


@dataclass
class SampleResult:
    """What a sampler returns: the samples and how much work the latency-critical path took."""

    sampler: str
    sample: torch.Tensor  # (S, C, H, W)
    passes: int  # sequential batched network calls
    evals: float  # network evaluations per sample (sum of window lengths, blocks x steps, ...)
    seconds: float
    iterations: int | None = None  # SRDS refinement iterations
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        evals = int(self.evals) if float(self.evals).is_integer() else self.evals  # --json promises an int
        out = {"sampler": self.sampler, "passes": self.passes, "evals": evals, "seconds": self.seconds}
        if self.iterations is not None:
            out["iterations"] = self.iterations
        return out


def sequential(core: SamplerCore, evaluator: Evaluator, x_t: torch.Tensor, noise: torch.Tensor,
               progress: Progress | None = None) -> SampleResult:
    """x_{j+1} = step_j(x_j) + sigma_j z_j for j = 0..N-1, one network call of the S samples per step."""
    started = time.perf_counter()
    evaluator.reset()
    x = x_t
    samples = x.shape[0]
    for j in range(core.steps):
        t = core.timesteps[j].expand(samples)
        out = evaluator(x, t)
        x = core.step(out, x, torch.full((samples,), j, dtype=torch.long, device=x.device)) + noise[j]
        if progress:
            progress(j + 1, core.steps)
    stats = evaluator.reset()
    return SampleResult("sequential", x, stats.passes, stats.rows / samples, time.perf_counter() - started,
                        extra=stats.timing())


def batch_parallel(core: SamplerCore, evaluator: Evaluator, x_t: torch.Tensor, noise: torch.Tensor,
                   progress: Progress | None = None) -> SampleResult:
    """Each rank samples its contiguous share of the S samples sequentially; results all-gathered.
    Noise was drawn for all samples on every rank, so the output equals one process's."""
    started = time.perf_counter()
    mine = local_slice(x_t.shape[0], evaluator.group)
    if mine.stop > mine.start:
        local = Evaluator(evaluator.denoiser, split=False)  # this rank's samples only
        share = sequential(core, local, x_t[mine], noise[:, mine], progress).sample
    else:  # more ranks than samples: this rank has no share but must still join the gather
        share = x_t[mine]
    sample = gather_samples(share, x_t.shape[0], evaluator.group)
    return SampleResult("batch", sample, core.steps, float(core.steps), time.perf_counter() - started)
