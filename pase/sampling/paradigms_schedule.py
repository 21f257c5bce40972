"""Where each ParaDiGMS pass begins, from a run's counts, and at another window from a measured run.

A pass evaluates the window [begin, min(begin + window, N)): its rows are min(window, N - begin), and
``begin`` moves forward 1 to ``window`` steps a pass (``pase.sampling.paradigms``, as the reference code).
The tolerance scales with each step's noise variance, which vanishes at the last steps, so a run has a
*body* of full windows that advance many steps a pass and a *tail* near the end that advances about a step
a pass through windows the end clips. Pricing every pass as one average advance misses that: ParaDiGMS' own
SD-v2 DDPM-1000 run took 44 passes and 2,040 evaluations at window 80, where 44 evenly spaced windows
evaluate about 3,400.
"""
from __future__ import annotations

import math

from pase.errors import PaseError


def rows_of(begins: list[int], window: int, steps: int) -> list[int]:
    return [min(window, steps - b) for b in begins]


def evenly_spaced(advance: float, end: int) -> list[int]:
    """Begins floor(k x advance) below ``end``, each computed afresh: summing a float advance drifts, and a
    measured 12 passes (advance = steps / 12) would come out as 13."""
    begins: list[int] = []
    while (begin := math.floor(len(begins) * advance + 1e-9)) < end:
        begins.append(begin)
    return begins


def begins_from_counts(steps: int, window: int, passes: int, evaluations: int) -> list[int]:
    """Begins of a run over ``steps`` at ``window`` that took ``passes`` passes and ``evaluations`` evaluations
    (the sum of the passes' rows). Counts fix the work, not the layout; the one kept is as many full windows as
    the counts allow, one pass with the remainder, then a tail falling by one row a pass to 1 (or to the least
    end the counts allow). Every begin is checked against the rule (first 0, each advance 1..window, the last
    pass reaching the end), so a layout the sampler cannot produce is never priced; counts none fits are
    refused."""
    for full in range(min(passes, evaluations // window), -1, -1):
        tail, rest = passes - full, evaluations - full * window
        if tail == 0:  # full windows to the end: the last begins at steps - window
            begins = [round(i * (steps - window) / max(1, full - 1)) for i in range(full)]
        else:
            # the first pass begins at 0, so a clipped one holds every step
            first = steps if full == 0 else min(rest - tail * (tail - 1) // 2, window - 1, steps - full)
            others = tail - 1
            if others:
                spread = rest - first - others * (others - 1) // 2  # over a run e + others - 1, ..., e
                end, extra = divmod(spread, others)
                run = [end + j + (1 if j >= others - extra else 0) for j in range(others)][::-1]
                if run[-1] < 1 or run[0] >= first:
                    continue
            elif rest != first:
                continue
            else:
                run = []
            clipped = [steps - length for length in [first, *run]]
            if full:  # spread from 0 to the last full begin: at most steps - window, before the clipped one
                last = min(steps - window, clipped[0] - 1, (full - 1) * window)
                if last < max(full - 1, clipped[0] - window):
                    continue
                clipped = [round(i * last / max(1, full - 1)) for i in range(full)] + clipped
            begins = clipped
        if begins and follows_rule(begins, window, steps) and sum(rows_of(begins, window, steps)) == evaluations:
            return begins
    raise PaseError(f"no ParaDiGMS run over {steps} steps at window {window} takes {passes} passes and "
                    f"{evaluations} evaluations (each pass evaluates min(window, steps - begin) rows and moves "
                    f"1 to {window} steps)")


def follows_rule(begins: list[int], window: int, steps: int) -> bool:
    """First begin 0, each advance 1..window, and the last pass's advance reaching ``steps``."""
    gaps = [b - a for a, b in zip(begins, begins[1:], strict=False)] + [steps - begins[-1]]
    return begins[0] == 0 and all(1 <= g <= window for g in gaps)


def begins_at_window(measured: list[int], measured_window: int, window: int, steps: int, exponent: float
                     ) -> list[int]:
    """Begins at ``window`` from a run measured at ``measured_window``: its tail (the passes after its full
    windows) kept where it was, since the end's vanishing variance sets it, not the window; its body's advance
    per pass, (tail start) / (full passes), carried to ``window`` by the default law's shape,
    1 + (a - 1) ((window - 1) / (measured_window - 1))^exponent, at most ``window``. An advance past ``window``
    (a tail step longer than a smaller window) is split into passes of ``window``."""
    full = sum(1 for r in rows_of(measured, measured_window, steps) if r == measured_window)
    tail = measured[full:]
    body_end = tail[0] if tail else steps
    begins: list[int] = []
    if full and body_end > 0:
        advance = body_end / full
        if measured_window > 1:
            advance = 1 + (advance - 1) * ((window - 1) / (measured_window - 1)) ** exponent
        begins = evenly_spaced(min(float(window), max(1.0, advance)), body_end)
    laid: list[int] = []
    for begin in [*begins, *tail, steps]:
        while laid and begin - laid[-1] > window:
            laid.append(laid[-1] + window)
        if begin < steps and (not laid or begin > laid[-1]):
            laid.append(begin)
    return laid
