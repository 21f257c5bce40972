"""SRDS (Selvam, Merchant, Ermon, NeurIPS 2024): Parareal iterations over B blocks of N / B steps.

Coarse G_i: one DDIM jump across block i. Fine F_i: the block's own N / B steps (DDPM steps use
their pre-drawn noise). Iteration 0 is a B-step coarse sample; iteration p solves every block
whose input changed with F in one batched call per step, then sweeps
x_{i+1}^p = F_i(x_i^{p-1}) + (G_i(x_i^p) - G_i(x_i^{p-1})). Written in that order, block i's
boundary is bitwise F_i of an exact input once x_i is exact, so after iteration p blocks 1..p
equal the serial solution, after B iterations all do, and blocks that are already exact are not
solved again. Stops when the output's relative change is below the tolerance, or at B.

The schedule is a dependency graph of network calls; each "pass" evaluates every call that is
ready in one batch. Non-pipelined: an iteration's fine solves wait for the previous sweep to end,
and its sweep for all its fine solves. Pipelined: block i's fine solve starts as soon as the
sweep has produced its input, and sweep steps join whatever batch is running.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from pase.errors import PaseError
from pase.sampling.core import SamplerCore
from pase.sampling.distributed import Evaluator
from pase.sampling.sequential import Progress, SampleResult

IterationHook = Callable[[int, list[torch.Tensor]], None]  # (iteration, boundaries x_0..x_B)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_blocks(steps: int) -> int:
    """The divisor of ``steps`` closest to sqrt(steps) (the smaller one on a tie)."""
    return min(divisors(steps), key=lambda d: (abs(d - math.sqrt(steps)), d))


def srds(core: SamplerCore, evaluator: Evaluator, x_t: torch.Tensor, noise: torch.Tensor, blocks: int | None = None,
         tol: float = 1e-3, max_iters: int | None = None, pipelined: bool = False,
         on_iteration: IterationHook | None = None, progress: Progress | None = None) -> SampleResult:
    """Parareal sampling with ``blocks`` blocks (default: the divisor of N nearest sqrt(N)).

    ``tol``: stop when ||x_B^p - x_B^{p-1}|| / ||x_B^{p-1}|| <= tol for every sample (0: run to
    ``max_iters``, default B, which is exact). Memory O(B * iterations * S * D).
    """
    steps = core.steps
    blocks = default_blocks(steps) if blocks is None else blocks
    if blocks < 1 or steps % blocks:
        raise PaseError(f"--blocks {blocks} must divide --steps {steps}; choose one of {divisors(steps)}")
    max_iters = blocks if max_iters is None else max_iters
    if not 1 <= max_iters <= blocks:
        raise PaseError(f"max_iters {max_iters} must be between 1 and the number of blocks {blocks}")
    if tol < 0:
        raise PaseError(f"--tol must be >= 0, not {tol}")
    started = time.perf_counter()
    evaluator.reset()
    schedule = SrdsSchedule(core, blocks, max_iters, tol, pipelined, x_t, noise, on_iteration)
    samples = x_t.shape[0]
    while schedule.result is None:
        schedule.tick(evaluator)
        if progress:
            progress(schedule.iterations_done, max_iters)
    stats = evaluator.reset()
    return SampleResult("srds-pipelined" if pipelined else "srds", schedule.result, stats.passes,
                        stats.rows / samples, time.perf_counter() - started, iterations=schedule.iterations_done,
                        extra={"blocks": blocks, "tol": tol, "pipelined": pipelined, **stats.timing(),
                               "changes": schedule.changes})


class SrdsSchedule:
    """The SRDS dependency graph and its state: x[(p, i)] = x_i^p (stored from iteration i on, when it
    first becomes exact), y[(p, i)] = F_i(x_i^{p-1}), g[(p, i)] = G_i(x_i^p)."""

    def __init__(self, core: SamplerCore, blocks: int, max_iters: int, tol: float, pipelined: bool,
                 x_t: torch.Tensor, noise: torch.Tensor, on_iteration: IterationHook | None,
                 stop_after: int | None = None) -> None:
        """``stop_after``: end after that iteration whatever the tolerance (dry runs that price a schedule)."""
        self.stop_after = stop_after
        self.core, self.blocks, self.max_iters, self.tol, self.pipelined = core, blocks, max_iters, tol, pipelined
        self.noise, self.on_iteration = noise, on_iteration
        self.size = core.steps // blocks
        self.x: dict[tuple[int, int], torch.Tensor] = {(0, 0): x_t}
        # the latest iteration with a boundary: nothing of an iteration past top + 1 can be ready (its fine solves
        # start from the previous iteration's boundaries), so the loops below stop there instead of at max_iters
        self.top = 0
        self.frontier: dict[int, int] = {}  # per iteration, its first boundary not yet resolved
        self.y: dict[tuple[int, int], torch.Tensor] = {}
        self.g: dict[tuple[int, int], torch.Tensor] = {}
        self.fine: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}  # in flight: (state, steps done)
        self._pointers()
        self.iterations_done = 0
        self.changes: list[float] = []
        self.result: torch.Tensor | None = None

    def _pointers(self) -> None:
        """Per iteration: the next block whose fine solve can start, the next boundary to jump from, and
        (non-pipelined) whether all its fine solves are done; what keeps each pass's readiness check short."""
        self.started: dict[int, int] = {}
        self.jumped: dict[int, int] = {}
        self.fine_done: set[int] = set()

    def boundary(self, p: int, i: int) -> torch.Tensor | None:
        return self.x.get((min(p, i), i))

    # ------------------------------------------------------------------ what can run now
    def _ready_fine(self) -> list[tuple[int, int]]:
        """Fine solves to step now, iteration by iteration. Block i of iteration p starts once x_i^{p-1} is
        exact; those arrive in block order, so each iteration keeps a pointer to its next block to start."""
        for p in range(1, min(self.max_iters, self.top + 1) + 1):
            if not self.pipelined and (p - 1, self.blocks) not in self.x:
                break  # the previous sweep has not finished
            i = self.started.get(p, p - 1)
            while i < self.blocks and (p - 1, i) in self.x:
                if (p, i) not in self.y and (p, i) not in self.fine:
                    self.fine[(p, i)] = (self.x[(p - 1, i)], 0)
                i += 1
            self.started[p] = i
        # every solve in flight belongs to an iteration reached above; by iteration, each in the order it started
        return sorted(self.fine, key=lambda key: key[0])

    def _ready_coarse(self) -> list[tuple[int, int]]:
        """Coarse jumps to take now. Every ready jump is taken in the same pass, and boundaries arrive in block
        order, so each iteration keeps a pointer to its first boundary not yet jumped from."""
        ready = []
        for p in range(0, min(self.max_iters, self.top) + 1):
            if p and not self.pipelined and p not in self.fine_done:
                if any((p, i) not in self.y for i in range(p - 1, self.blocks)):
                    break  # the sweep waits for all of this iteration's fine solves
                self.fine_done.add(p)
            i = self.jumped.get(p, p)
            while i < self.blocks and (p, i) in self.x:
                if (p, i) not in self.g:
                    ready.append((p, i))
                i += 1
            self.jumped[p] = i
        return ready

    # ------------------------------------------------------------------ one batched network call
    def tick(self, evaluator: Evaluator) -> None:
        core, n = self.core, self.size
        fines, coarses = self._ready_fine(), self._ready_coarse()
        if not fines and not coarses:
            raise RuntimeError("SRDS schedule stalled with nothing to evaluate (a bug in pase)")
        states = [self.fine[key][0] for key in fines] + [self.x[key] for key in coarses]
        fine_index = [key[1] * n + self.fine[key][1] for key in fines]
        coarse_index = [key[1] * n for key in coarses]
        samples = states[0].shape[0]
        rows = torch.cat(states)
        device = rows.device
        index = torch.tensor(fine_index + coarse_index, dtype=torch.long, device=device).repeat_interleave(samples)
        out = evaluator(rows, core.timesteps[index])
        split = len(fines) * samples
        if fines:
            stepped = core.step(out[:split], rows[:split], index[:split])
            if not core.is_ode:
                stepped = stepped + torch.cat([self.noise[j] for j in fine_index])
            for k, key in enumerate(fines):
                state = stepped[k * samples:(k + 1) * samples]
                done = self.fine[key][1] + 1
                if done == n:
                    self.y[key] = state
                    del self.fine[key]
                else:
                    self.fine[key] = (state, done)
        if coarses:
            start = index[split:]
            end = core.prev[start + n - 1]
            jumped = core.jump(out[split:], rows[split:], core.timesteps[start], end)
            for k, key in enumerate(coarses):
                self.g[key] = jumped[k * samples:(k + 1) * samples]
        self._resolve()

    # ------------------------------------------------------------------ the sweep, as values arrive
    def _resolve(self) -> None:
        """Every boundary whose inputs have arrived, iteration by iteration. An iteration's boundaries resolve in
        block order (x_{i+1}^p needs G_i(x_i^p)), so each iteration is looked at only from its first missing one."""
        changed = True
        while changed and self.result is None:
            changed = False
            for p in range(0, min(self.max_iters, self.top + 1) + 1):
                i = self.frontier.get(p, max(p, 1))
                while i <= self.blocks:
                    value = self._boundary_value(p, i)
                    if value is None:
                        break
                    self.x[(p, i)] = value
                    self.top = max(self.top, p)
                    changed = True
                    i += 1
                    self.frontier[p] = i
                    if i > self.blocks:
                        self._finish_iteration(p)
                        if self.result is not None:  # a later iteration resolved in this sweep must not win
                            return

    def _boundary_value(self, p: int, i: int) -> torch.Tensor | None:
        if p == 0:
            return self.g.get((0, i - 1))
        if i == p:  # its input x_{p-1} is unchanged since iteration p-1, so the correction is exactly zero
            return self.y.get((p, p - 1))
        y, g_new, g_old = self.y.get((p, i - 1)), self.g.get((p, i - 1)), self.g.get((p - 1, i - 1))
        if y is None or g_new is None or g_old is None:
            return None
        return y + (g_new - g_old)

    def _finish_iteration(self, p: int) -> None:
        if self.on_iteration:
            self.on_iteration(p, [self.boundary(p, i) for i in range(self.blocks + 1)])
        if p == 0:
            return
        new, old = self.x[(p, self.blocks)], self.x[(p - 1, self.blocks)]
        change = float(((new - old).flatten(1).norm(dim=1) / old.flatten(1).norm(dim=1).clamp(min=1e-30)).max())
        self.changes.append(change)
        self.iterations_done = p
        if change <= self.tol or p == self.max_iters or p == self.stop_after:
            self.result = new


class SrdsPassCounter(SrdsSchedule):
    """The SRDS schedule's passes without tensors, for pricing: the same readiness and sweep rules, with every
    value 0.0 (only which calls are ready matters), stopped after ``iterations``. Thousands of times faster than a
    dry run on tensors, which is what lets ``sample-plan`` price 1,000-step schedules in seconds."""

    def __init__(self, steps: int, blocks: int, iterations: int, pipelined: bool) -> None:
        if blocks < 1 or steps % blocks:
            raise PaseError(f"{blocks} blocks must divide {steps} steps; choose one of {divisors(steps)}")
        self.stop_after, self.blocks, self.max_iters, self.tol, self.pipelined = iterations, blocks, blocks, -1.0, \
            pipelined
        self.size, self.on_iteration = steps // blocks, None
        self.x, self.y, self.g = {(0, 0): 0.0}, {}, {}  # type: ignore[dict-item]
        self.fine = {}
        self.top, self.frontier, self.iterations_done, self.changes, self.result = 0, {}, 0, [], None
        self._pointers()

    def rows_per_pass(self) -> list[int]:
        """State-rows evaluated in each batched network call, in order."""
        rows = []
        while self.result is None:
            fines, coarses = self._ready_fine(), self._ready_coarse()
            if not fines and not coarses:
                raise RuntimeError("SRDS schedule stalled with nothing to evaluate (a bug in pase)")
            for key in fines:
                done = self.fine[key][1] + 1
                if done == self.size:
                    self.y[key] = 0.0  # type: ignore[assignment]
                    del self.fine[key]
                else:
                    self.fine[key] = (0.0, done)  # type: ignore[assignment]
            for key in coarses:
                self.g[key] = 0.0  # type: ignore[assignment]
            rows.append(len(fines) + len(coarses))
            self._resolve()
        return rows

    def _finish_iteration(self, p: int) -> None:
        if p:
            self.iterations_done = p
            if p in (self.max_iters, self.stop_after):
                self.result = 0.0  # type: ignore[assignment]
