"""A picture of a plan (``pase plan --png`` / ``--html``): the UNet's blocks in order on their level of the U, with
the skip connections, each coloured by its split and marked where recomputed or sharded; bars of each block's
compute and communication time and memory; and, for pipeline plans, each stage's schedule as a timeline.

One matplotlib figure serves both outputs; the HTML embeds it as a PNG, beside the predictions, so the file is
self-contained (no network, no scripts beyond one that records whether every image loaded, for the browser test).
"""
from __future__ import annotations

import base64
import html
import io
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pase.atomic import write_bytes, write_text
from pase.planning.plan import Plan, blocks_summary
from pase.planning.report import IMAGES_LOADED, STYLE

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from pase.graph import LayerGraph
    from pase.planning.per_layer import PricedGraph

def block_rows(plan: Plan, graph: LayerGraph, priced: PricedGraph | None) -> list[dict[str, Any]]:
    """Per block in model order: its dominant split, recompute and sharding, compute and communication seconds
    (per micro-step; communication includes the re-layouts into the block) and memory per device."""
    choices = {b.name: b for b in plan.blocks}
    rows: dict[str, dict[str, Any]] = {}
    splits: dict[str, Counter[str]] = defaultdict(Counter)
    syncs = priced.syncs() if priced is not None else []
    for v, layer in enumerate(plan.layers):
        row = rows.setdefault(layer.block, {"block": layer.block, "compute": 0.0, "comm": 0.0, "memory": 0.0})
        splits[layer.block][" ".join(f"{d}={f}" for d, f in sorted(layer.splits.items())) or "replicated"] += 1
        row["memory"] += layer.memory_bytes
        if priced is None:
            row["compute"] += layer.seconds
            continue
        k = priced.spaces[v].index_of(layer.splits)
        row["compute"] += float(priced.compute[v][k])
        row["comm"] += float(priced.comm[v][k] - priced.sync_discount * syncs[v][k])
    if priced is not None:
        assignment = [priced.spaces[v].index_of(layer.splits) for v, layer in enumerate(plan.layers)]
        for s, d, matrix in priced.edges:
            rows[plan.layers[d].block]["comm"] += float(matrix[assignment[s], assignment[d]])
    for name, row in rows.items():
        choice = choices.get(name)
        row.update(split=splits[name].most_common(1)[0][0], recompute=bool(choice and choice.checkpoint),
                   sharding=choice.sharding if choice else "none", level=_level(name))
    downs = max((r["level"] for r in rows.values() if r["level"] is not None and 0 <= r["level"] < MID), default=0)
    for row in rows.values():  # the mid block at the bottom of the U; up_blocks.j climbs back to downs - j
        level = row["level"]
        row["depth"] = 0 if level is None else downs + 1 if level == MID else level if level >= 0 else \
            downs + 1 + level
    return [r for r in rows.values() if not r["block"].startswith("input:")]


MID = 99  # the mid block's level: below every down block


def _level(block: str) -> int | None:
    """Depth on the U from a diffusers-style name: down_blocks.i -> i, mid_block -> MID (the bottom), up_blocks.j ->
    -(j + 1) (counted back up from the bottom); None for the stem and the head."""
    if match := re.match(r"down_blocks\.(\d+)", block):
        return int(match.group(1))
    if block.startswith("mid_block"):
        return MID
    if match := re.match(r"up_blocks\.(\d+)", block):
        return -(int(match.group(1)) + 1)
    return None


def plan_figure(plan: Plan, graph: LayerGraph, priced: PricedGraph | None) -> Figure:
    import matplotlib  # noqa: PLC0415 - about 1 s to import, and only the pictures need it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415 - as above

    rows = block_rows(plan, graph, priced)
    panels = 4 if plan.stages else 3
    figure, axes = plt.subplots(panels, 1, figsize=(max(12, 0.42 * len(rows)), 3.2 * panels),
                                gridspec_kw={"height_ratios": [1.6, 1, 1] + ([1.2] if plan.stages else [])})
    _draw_blocks(axes[0], rows, graph, plan)
    _draw_bars(axes[1], axes[2], rows, plan, priced is not None)
    if plan.stages:
        _draw_schedule(axes[3], plan)
    figure.tight_layout()
    return figure


def _draw_blocks(ax: Axes, rows: list[dict[str, Any]], graph: LayerGraph, plan: Plan) -> None:
    from matplotlib import colormaps  # noqa: PLC0415 - see plan_figure
    from matplotlib.patches import FancyArrowPatch, Patch, Rectangle  # noqa: PLC0415 - see plan_figure

    splits = list(dict.fromkeys(r["split"] for r in rows))
    palette = colormaps["tab10"]
    colour = {split: palette(i % 10) for i, split in enumerate(splits)}
    position = {r["block"]: i for i, r in enumerate(rows)}
    for i, row in enumerate(rows):
        ax.add_patch(Rectangle((i - 0.4, -row["depth"] - 0.35), 0.8, 0.7, facecolor=colour[row["split"]],
                               hatch="///" if row["recompute"] else None,
                               edgecolor="black" if row["sharding"] != "none" else "#888",
                               linewidth=2.5 if row["sharding"] != "none" else 0.8))
        if i:
            ax.plot([i - 0.6, i - 0.4], [-rows[i - 1]["depth"], -row["depth"]], color="#555", linewidth=1)
    drawn = set()
    for src, dst, _ in graph.skip_edges():
        pair = (graph[src]["block"], graph[dst]["block"])
        if pair in drawn or pair[0] not in position or pair[1] not in position:
            continue
        drawn.add(pair)
        a, b = position[pair[0]], position[pair[1]]
        ax.add_patch(FancyArrowPatch((a, -rows[a]["depth"] + 0.35), (b, -rows[b]["depth"] + 0.35),
                                     connectionstyle="arc3,rad=-0.25", arrowstyle="-|>", mutation_scale=8,
                                     color="#999", linewidth=0.8))
    ax.set_xlim(-1, len(rows))
    ax.set_ylim(-max((r["depth"] for r in rows), default=0) - 1, 1.0 + 0.07 * len(rows))  # room for the arcs
    ax.set_xticks(range(len(rows)), [r["block"] for r in rows], rotation=70, fontsize=7, ha="right")
    ax.set_yticks([])
    handles = [Patch(facecolor=colour[s], label=s) for s in splits[:10]]
    handles += [Patch(facecolor="white", hatch="///", edgecolor="#888", label="recomputed"),
                Patch(facecolor="white", edgecolor="black", linewidth=2.5, label="sharded (FSDP)")]
    ax.legend(handles=handles, fontsize=7, ncol=min(6, len(handles)), loc="upper center")
    steps = f", {plan.micro_steps} micro-steps of {plan.micro_batch}" if plan.micro_steps > 1 else ""
    ax.set_title(f"{plan.model} on {plan.cluster}, global batch {plan.batch}{steps}: blocks by split "
                 "(arrows: skip connections)")


def _draw_bars(time_ax: Axes, memory_ax: Axes, rows: list[dict[str, Any]], plan: Plan, split_time: bool) -> None:
    x = range(len(rows))
    compute = [1e3 * r["compute"] for r in rows]
    time_ax.bar(x, compute, color="#4477aa", label="compute" if split_time else "time")
    if split_time:
        time_ax.bar(x, [1e3 * r["comm"] for r in rows], bottom=compute, color="#ee6677", label="communication")
    per = " per micro-step" if plan.micro_steps > 1 else ""
    time_ax.set_ylabel(f"ms{per}")
    time_ax.legend(fontsize=8)
    time_ax.set_xticks([])
    time_ax.set_xlim(-1, len(rows))  # under the blocks above
    unit, scale = ("GiB", 2**30) if max((r["memory"] for r in rows), default=0) >= 2**30 else ("MiB", 2**20)
    memory_ax.bar(x, [r["memory"] / scale for r in rows], color="#228833")
    memory_ax.set_ylabel(f"memory {unit}/device")
    memory_ax.set_xticks([])
    memory_ax.set_xlim(-1, len(rows))


def schedule_timeline(stage_seconds: list[float], microbatches: int, schedule: str
                      ) -> list[list[tuple[float, float, str, int]]]:
    """Per stage, (start, duration, "F"/"B", microbatch) of each pass: forward a third of a stage's microbatch
    time and backward two thirds, each pass waiting for its neighbour stage and for this stage's previous pass,
    in GPipe order (all forwards, then all backwards) or 1F1B (a warm-up of forwards, then one of each)."""
    stages = len(stage_seconds)
    order: list[list[tuple[str, int]]] = []
    for s in range(stages):
        if schedule == "gpipe":
            order.append([("F", i) for i in range(microbatches)] + [("B", i) for i in range(microbatches)])
            continue
        warm = min(stages - s - 1, microbatches)
        ops = [("F", i) for i in range(warm)]
        for i in range(microbatches - warm):
            ops += [("F", warm + i), ("B", i)]
        ops += [("B", i) for i in range(microbatches - warm, microbatches)]
        order.append(ops)
    done: dict[tuple[str, int, int], float] = {}
    cursor, free = [0] * stages, [0.0] * stages
    timeline: list[list[tuple[float, float, str, int]]] = [[] for _ in range(stages)]
    while any(c < len(order[s]) for s, c in enumerate(cursor)):
        progressed = False
        for s in range(stages):
            if cursor[s] >= len(order[s]):
                continue
            kind, i = order[s][cursor[s]]
            needs = [(kind, s - 1, i)] if kind == "F" and s else [("B", s + 1, i)] if kind == "B" and s < stages - 1 \
                else []
            needs += [("F", s, i)] if kind == "B" else []
            if any(n not in done for n in needs):
                continue
            start = max([free[s], *(done[n] for n in needs)])
            duration = stage_seconds[s] / 3 * (1 if kind == "F" else 2)
            timeline[s].append((start, duration, kind, i))
            done[kind, s, i] = free[s] = start + duration
            cursor[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocked")  # an ordering bug, not user input
    return timeline


def _draw_schedule(ax: Axes, plan: Plan) -> None:
    timeline = schedule_timeline([stage.seconds for stage in plan.stages], plan.microbatches, plan.schedule or "1f1b")
    for s, passes in enumerate(timeline):
        for start, duration, kind, i in passes:
            ax.broken_barh([(1e3 * start, 1e3 * duration)], (s - 0.4, 0.8),
                           facecolors="#4477aa" if kind == "F" else "#ccbb44", edgecolor="white")
            if duration * 1e3 > 0:
                ax.text(1e3 * (start + duration / 2), s, f"{kind}{i}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(timeline)), [f"stage {s}" for s in range(len(timeline))])
    ax.invert_yaxis()
    ax.set_xlabel("ms (F: forward, B: backward of a microbatch)")
    ax.set_title(f"{plan.schedule or '1f1b'} schedule, {plan.microbatches} microbatches per replica")


def _png(figure: Figure) -> bytes:
    from matplotlib import pyplot as plt  # noqa: PLC0415 - see plan_figure

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def write_plan_png(plan: Plan, graph: LayerGraph, priced: PricedGraph | None, path: Path) -> None:
    write_bytes(path, _png(plan_figure(plan, graph, priced)))


def write_plan_html(plan: Plan, graph: LayerGraph, priced: PricedGraph | None, path: Path) -> None:
    """One self-contained file: the predictions beside the baselines, and the picture."""
    image = base64.b64encode(_png(plan_figure(plan, graph, priced))).decode()
    rows = [("pase plan", plan.predicted), *plan.baselines.items()]
    table = ["<table><tr><th>strategy</th><th>step ms</th><th>samples/s</th><th>micro-steps</th>"
             "<th>memory GiB/device</th></tr>"]
    for name, p in rows:
        cells = ([f"{1e3 * p.step_seconds:.2f}", f"{p.samples_per_second:,.0f}", str(p.micro_steps),
                  f"{p.memory_bytes_per_device / 2**30:.2f}"] if p else
                 [html.escape(plan.baseline_notes.get(name, "n/a")), "", "", ""])
        table.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table.append("</table>")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>pase plan: {html.escape(plan.model)}</title>"
             f"<style>{STYLE}</style>{IMAGES_LOADED}</head><body>",
             f"<h1>Plan: {html.escape(plan.model)} on {html.escape(plan.cluster)} ({plan.devices} devices), global "
             f"batch {plan.batch}, {html.escape(plan.precision)}</h1>",
             f"<p class='summary'>{html.escape(blocks_summary(plan))}</p>", *table,
             f"<img alt='the plan, block by block' src='data:image/png;base64,{image}'>",
             "<p>Predicted by pase's cost model; check it on your hardware with <code>pase verify</code>.</p>"
             "</body></html>"]
    write_text(path, "\n".join(parts))


__all__ = ["block_rows", "plan_figure", "schedule_timeline", "write_plan_html", "write_plan_png"]
