"""The pipeline part of ``pase plan``'s output: one row per stage, then how the stage search went."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pase.plans import Plan


def _ranks(devices: list[int]) -> str:
    """Compact rank list: 0-3,8-11."""
    runs: list[list[int]] = []
    for rank in sorted(devices):
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def print_stages(plan: Plan, console: Console) -> None:
    replicas = plan.pipeline_replicas
    table = Table(title=f"pipeline: {len(plan.stages)} stages x {replicas} data-parallel replica"
                        f"{'s' if replicas > 1 else ''}, {plan.microbatches} microbatches, {plan.schedule} schedule")
    for column in ("stage", "blocks", "layers", "devices", "ms / microbatch", "in flight", "memory GiB"):
        table.add_column(column, justify="left" if column in ("blocks", "devices") else "right")
    for k, stage in enumerate(plan.stages):
        first, last = stage.blocks[0].split(" .. ")[0], stage.blocks[-1].split(" .. ")[-1]
        blocks = first if first == last else f"{first} .. {last}"
        table.add_row(str(k), blocks, str(len(stage.layers)), _ranks(stage.devices),
                      f"{stage.seconds * 1e3:.3f}", str(stage.in_flight), f"{stage.memory_bytes / 2**30:.2f}")
    console.print(table)


def pipeline_summary(plan: Plan) -> str | None:
    info = plan.search.get("pipeline")
    if not info:
        return None
    return (f"pipeline search {info['seconds']:.2f} s: {info['settings']} (replicas, microbatches) settings over "
            f"{info['segments']} segments, {info['segment_searches']} segment searches, "
            f"{info['exact_stage_searches']} exact stage searches"
            + (f", stopped {info['gap']:.1%} from the bound" if info.get("gap") else ", exact over the space")
            + "".join(f"; note: {note}" for note in info.get("notes", [])))


__all__ = ["pipeline_summary", "print_stages"]
