"""ParaDiGMS pass layouts: from a run's counts, and at other windows from a measured run (the rule every pass
follows: rows min(window, N - begin), each advance 1..window)."""
from __future__ import annotations

import random

import pytest

from pase.errors import PaseError
from pase.sampling.paradigms_schedule import begins_at_window, begins_from_counts, follows_rule, rows_of
from pase.sampling.planner import PARADIGMS_ADVANCE, Convergence


def test_published_counts_become_full_windows_then_a_clipped_tail():
    """ParaDiGMS' SD-v2 DDPM-1000 run (44 passes, 2,040 evaluations at window 80): 22 full windows, one pass
    with the remainder, then one-step passes of 21 rows down to 1; its DDIM-200 run (16, 425) likewise."""
    begins = begins_from_counts(1000, 80, 44, 2040)
    assert rows_of(begins, 80, 1000) == [80] * 22 + [49] + list(range(21, 0, -1))
    assert follows_rule(begins, 80, 1000)
    assert rows_of(begins_from_counts(200, 80, 16, 425), 80, 200) == [80] * 4 + [39] + list(range(11, 0, -1))


def test_counts_no_run_can_take_are_refused():
    for impossible in ((3, 4, 3, 3), (1000, 80, 12, 960), (1000, 80, 44, 44 * 80 + 1)):
        with pytest.raises(PaseError, match="no ParaDiGMS run"):
            begins_from_counts(*impossible)


def test_every_run_the_rule_allows_is_laid_out_with_its_counts():
    generator = random.Random(0)
    for _ in range(300):
        steps, window = generator.randint(1, 300), generator.randint(1, 100)
        begin, lengths = 0, []
        while begin < steps:
            lengths.append(min(window, steps - begin))
            begin += generator.randint(1, window)
        begins = begins_from_counts(steps, window, len(lengths), sum(lengths))
        assert follows_rule(begins, window, steps)
        assert len(begins) == len(lengths) and sum(rows_of(begins, window, steps)) == sum(lengths)


def test_other_windows_keep_the_tail_and_carry_the_body_advance():
    """At the measured window the counts come back; at every other window each pass follows the rule, the tail
    near the end is where it was (where it fits the window), and the body's advance follows the law's shape."""
    measured = begins_from_counts(1000, 80, 44, 2040)
    same = begins_at_window(measured, 80, 80, 1000, PARADIGMS_ADVANCE[1])
    assert len(same) == 44 and sum(rows_of(same, 80, 1000)) == 2040
    passes = {}
    for window in range(1, 161):
        begins = begins_at_window(measured, 80, window, 1000, PARADIGMS_ADVANCE[1])
        assert follows_rule(begins, window, 1000), window
        if window >= 28:  # every tail advance fits the window: the tail is kept
            assert begins[-22:] == measured[-22:], window
        passes[window] = len(begins)
    assert passes[1] == 1000  # window 1 is sequential
    assert all(passes[w] >= passes[w + 1] for w in range(1, 160))  # a wider window never takes more passes
    body_advance = 951 / 22
    expected = 1 + (body_advance - 1) * (19 / 79) ** PARADIGMS_ADVANCE[1]  # window 20
    assert passes[20] == pytest.approx(951 / expected + 22 + 1, abs=2)  # body, kept tail, one split tail step


def test_convergence_lays_out_a_measured_run_and_its_neighbours():
    """A window given with its evaluations is priced as laid out from both counts; one given by passes alone
    keeps evenly spaced passes; others come from the nearest window given with evaluations."""
    given = Convergence({80: 44, 16: 150}, {}, "given", {80: 2040})
    assert len(given.paradigms_rows(80, 1000)) == 44 and sum(given.paradigms_rows(80, 1000)) == 2040
    assert len(given.paradigms_rows(16, 1000)) == 150
    assert sum(given.paradigms_rows(40, 1000)) < 40 * len(given.paradigms_rows(40, 1000))  # a clipped tail
    uniform = Convergence({80: 44}, {}, "given")
    assert len(uniform.paradigms_rows(80, 1000)) == 44 and sum(uniform.paradigms_rows(80, 1000)) > 3000


def test_every_count_the_rule_can_reach_on_small_runs_is_laid_out():
    """Every (passes, evaluations) some run of the rule reaches, for up to 14 steps and windows up to 6, gets a
    layout with those counts; every other pair is refused (full windows must not be spread past steps - window)."""
    for steps in range(1, 15):
        for window in range(1, 7):
            reached: set[tuple[int, int]] = set()

            def walk(begin: int, passes: int, evaluations: int, steps: int = steps, window: int = window,
                     reached: set[tuple[int, int]] = reached) -> None:
                if begin >= steps:
                    reached.add((passes, evaluations))
                    return
                for advance in range(1, window + 1):
                    walk(begin + advance, passes + 1, evaluations + min(window, steps - begin))

            walk(0, 0, 0)
            for passes in range(1, steps + 1):
                for evaluations in range(passes, passes * window + 1):
                    if (passes, evaluations) in reached:
                        begins = begins_from_counts(steps, window, passes, evaluations)
                        assert follows_rule(begins, window, steps)
                        assert (len(begins), sum(rows_of(begins, window, steps))) == (passes, evaluations)
                    else:
                        with pytest.raises(PaseError):
                            begins_from_counts(steps, window, passes, evaluations)
