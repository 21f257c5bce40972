"""Pipeline schedules: how many microbatches a stage holds in flight, and the step time they give.

Both schedules run ``m`` microbatches through ``S`` stages. With per-microbatch stage times
``t_s`` (forward + backward, including the stage's share of its once-per-step gradient sync),
a step takes ``sum_s t_s + (m - 1) * max_s t_s``: one microbatch crosses every stage (fill and
drain), the other ``m - 1`` follow at the bottleneck's pace (the bound Alpa and PipeDream use).
GPipe and 1F1B share that time; they differ in memory. GPipe runs every forward before any
backward, so each stage keeps the activations of all ``m`` microbatches; 1F1B starts backward
as soon as the last stage can, so stage ``s`` (0-based) keeps at most ``S - s`` of them.
"""
from __future__ import annotations

from collections.abc import Sequence

from pase.errors import PaseError

SCHEDULES = ("1f1b", "gpipe")


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise PaseError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return schedule


def in_flight(schedule: str, microbatches: int, stages: int, stage: int) -> int:
    """Microbatches whose activations stage ``stage`` (0-based) of ``stages`` holds at its peak."""
    check_schedule(schedule)
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} outside 0..{stages - 1}")
    if schedule == "gpipe":
        return microbatches
    return min(microbatches, stages - stage)


def step_seconds(stage_seconds: Sequence[float], microbatches: int) -> float:
    """Step time of a pipeline whose stages take ``stage_seconds`` per microbatch."""
    if not stage_seconds:
        return 0.0
    return float(sum(stage_seconds) + (microbatches - 1) * max(stage_seconds))


def bubble_seconds(stage_seconds: Sequence[float], microbatches: int) -> float:
    """Idle time of the bottleneck stage per step: the step minus its ``m`` busy microbatches."""
    if not stage_seconds:
        return 0.0
    return step_seconds(stage_seconds, microbatches) - microbatches * max(stage_seconds)


def stage_memory(state_bytes: float, activation_bytes: float, held: int) -> float:
    """Per-device memory of a stage: weights/gradients/optimizer state plus ``held`` microbatches'
    saved activations (and received inputs)."""
    return state_bytes + held * activation_bytes


__all__ = ["SCHEDULES", "bubble_seconds", "check_schedule", "in_flight", "stage_memory", "step_seconds"]
