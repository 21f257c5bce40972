"""ParaDiGMS (Shih et al., NeurIPS 2023): Picard iteration over a sliding window of steps.

The trajectory of an N-step sampler satisfies x_{j+1} = x_b + sum_{i=b..j} (d_i(x_i) + sigma_i z_i),
d_i the noise-free drift. Each pass evaluates the drifts of the whole window [b, e) in one batched
call (split over ranks), forms every candidate state with prefix sums, and slides the window to
the first state whose change exceeds the tolerance, measured against the sampler's own noise scale
(squared error per element over sigma^2 of that state's step; the last state's scale is 0, so it
must match exactly). The first state of a window is always exact, so every pass advances at least
one step: at most N passes, and tolerance 0 reproduces sequential sampling.
"""
from __future__ import annotations

import time

import torch

from pase.errors import PaseError
from pase.sampling.core import SamplerCore
from pase.sampling.distributed import Evaluator
from pase.sampling.sequential import Progress, SampleResult


def paradigms(core: SamplerCore, evaluator: Evaluator, x_t: torch.Tensor, noise: torch.Tensor, window: int,
              tol: float, max_passes: int | None = None, progress: Progress | None = None) -> SampleResult:
    """Sample with a Picard window of ``window`` steps and tolerance ``tol`` (relative to sigma_t).

    Memory O(N * S * D) for the trajectory buffer; each pass costs one batched call of
    window x S rows plus O(window * S * D) bookkeeping.
    """
    steps = core.steps
    if window < 1:
        raise PaseError(f"--window must be >= 1, not {window}")
    if tol < 0:
        raise PaseError(f"--tol must be >= 0, not {tol}")
    window = min(window, steps)
    max_passes = steps if max_passes is None else max_passes
    started = time.perf_counter()
    evaluator.reset()
    samples = x_t.shape[0]
    elems = x_t[0].numel()
    device = x_t.device
    # scale[k]: tolerance scale of state X[k] = variance of the step that leaves it; 0 for the output X[N]
    scale = torch.cat([core.variance(), torch.zeros(1, device=device)])
    threshold = tol ** 2 * elems * scale  # squared-error budget per state and sample
    buffer = x_t.unsqueeze(0).repeat(steps + 1, *([1] * x_t.dim()))  # X[0..N], all x_T to start
    begin, end = 0, window
    passes = 0
    while begin < steps and passes < max_passes:
        length = end - begin
        states = buffer[begin:end]  # (L, S, ...)
        rows = states.reshape(length * samples, *x_t.shape[1:])
        index = torch.arange(begin, end, device=device).repeat_interleave(samples)
        out = evaluator(rows, core.timesteps[index])
        drift = (core.step(out, rows, index) - rows).reshape(states.shape)
        increments = drift if core.is_ode else drift + noise[begin:end]
        candidate = buffer[begin] + torch.cumsum(increments, dim=0)  # X'[begin+1 .. end]
        error = (candidate - buffer[begin + 1:end + 1]).pow(2).flatten(2).sum(dim=2)  # (L, S)
        over = (error > threshold[begin + 1:end + 1, None]).any(dim=1)
        first = int(torch.nonzero(over)[0]) if bool(over.any()) else length
        buffer[begin + 1:end + 1] = candidate
        new_begin = begin + min(first + 1, window)
        new_end = min(new_begin + window, steps)
        buffer[end + 1:new_end + 1] = candidate[-1]  # newly exposed states start from the last one computed
        begin, end = new_begin, new_end
        passes += 1
        if progress:
            progress(min(begin, steps), steps)
    stats = evaluator.reset()
    return SampleResult("paradigms", buffer[steps], stats.passes, stats.rows / samples,
                        time.perf_counter() - started,
                        extra={"window": window, "tol": tol, "converged": begin >= steps, **stats.timing()})
