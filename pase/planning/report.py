"""The what-if report as one self-contained HTML file: tables plus matplotlib charts embedded as PNG."""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pase.atomic import write_text
from pase.planning.whatif import ClusterResult, WhatIfReport, pareto_front, seconds_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# records on <body> whether every image loaded (data-images-loaded="yes"), for the headless-browser test
IMAGES_LOADED = ("<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded="
                 "[...document.images].every(i=>i.complete&&i.naturalWidth>0)?'yes':'no'})</script>")
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}.summary{font-size:17px}"""


def write_html(report: WhatIfReport, path: Path) -> None:
    """Write ``report`` to ``path`` atomically (one file, no external resources)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>pase what-if: {_e(report.model)}</title>"
             f"<style>{STYLE}</style>{IMAGES_LOADED}</head><body>",
             f"<h1>What if: {_e(report.model)}, global batch {report.batch}, {_e(report.precision)}</h1>",
             f"<p class='summary'>{_e(report.summary)}</p>",
             _cluster_table(report.clusters, report.samples)]
    fitting = [r for r in report.clusters if r.fits]
    if fitting:
        speeds = [(r.cluster, r.throughput) for r in fitting]
        parts.append(_chart(lambda ax: _bars(ax, speeds, "samples/s")))
        prices = [(r.cluster, r.dollars_for_samples) for r in fitting if r.dollars_for_samples is not None]
        if prices:
            parts.append(_chart(lambda ax: _bars(ax, prices, f"$ for {report.samples:.3g} samples")))
            parts.append(f"<h2>Cost against time for {report.samples:.3g} samples</h2>"
                         "<p>Each cluster a point; the line joins the Pareto front, the clusters no other beats on "
                         "both time and cost.</p>")
            parts.append(_chart(lambda ax: _cost_vs_time(ax, report)))
    if report.scaling:
        parts.append("<h2>Scaling with the number of GPUs</h2>")
        parts.append(_chart(lambda ax: _scaling(ax, report)))
    if report.interconnect:
        parts.append("<h2>NVLink against PCIe only</h2><table><tr><th>cluster</th><th>NVLink step s</th>"
                     "<th>PCIe-only step s</th><th>NVLink speed-up</th></tr>")
        for pair in report.interconnect:
            speedup = f"{pair['nvlink_speedup']:.2f}x" if pair["nvlink_speedup"] else "n/a"
            parts.append(f"<tr><td>{_e(pair['cluster'])}</td><td>{seconds_text(pair['nvlink_step_seconds'])}</td>"
                         f"<td>{seconds_text(pair['pcie_step_seconds'])}</td><td>{speedup}</td></tr>")
        parts.append("</table>")
    parts.append("<p>Predicted by pase's cost model from catalog figures; validate on your hardware with "
                 "<code>pase verify</code>.</p></body></html>")
    write_text(path, "\n".join(parts))


def _cluster_table(rows: list[ClusterResult], samples: float) -> str:
    head = ("cluster", "interconnect", "fits", "step s", "samples/s", "per GPU", "MFU", "headroom GiB", "$/h",
            "hours", f"$ for {samples:.3g} samples", "kWh", "note")
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = [r.cluster, r.interconnect, "yes" if r.fits else "no", seconds_text(r.step_seconds),
                 _f(r.samples_per_second, ",.0f"), _f(r.samples_per_second_per_gpu, ",.1f"), _f(r.mfu, ".0%"),
                 _f(r.memory_headroom_bytes and r.memory_headroom_bytes / 2**30, ".1f"),
                 _f(r.dollars_per_hour, ",.2f"), _f(r.hours_for_samples, ",.1f"), _f(r.dollars_for_samples, ",.0f"),
                 _f(r.energy_kwh_for_samples, ",.0f"), r.note]
        out.append("<tr>" + "".join(f"<td>{_e(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _bars(ax: Axes, bars: list[tuple[str, float]], label: str) -> None:
    """One horizontal bar per (cluster, value), the first on top."""
    ax.barh([cluster for cluster, _ in bars], [value for _, value in bars], color="#4477aa")
    ax.set_xlabel(label)
    ax.invert_yaxis()


def _cost_vs_time(ax: Axes, report: WhatIfReport) -> None:
    def point(r: ClusterResult) -> tuple[float, float]:
        return float(r.hours_for_samples or 0.0), float(r.dollars_for_samples or 0.0)

    points = [r for r in report.clusters if r.fits and r.hours_for_samples is not None
              and r.dollars_for_samples is not None]
    front = [point(r) for r in pareto_front(report.clusters)]
    ax.scatter([point(r)[0] for r in points], [point(r)[1] for r in points], color="#999", label="cluster")
    ax.plot([x for x, _ in front], [y for _, y in front], marker="o", color="#cc3311", label="Pareto front")
    for r in points:
        ax.annotate(r.cluster, point(r), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(f"hours for {report.samples:.3g} samples")
    ax.set_ylabel("$")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _scaling(ax: Axes, report: WhatIfReport) -> None:
    for gpu_id, points in report.scaling.items():
        fitting = [p for p in points if p.fits]
        ax.plot([p.devices for p in fitting], [p.throughput for p in fitting], marker="o", label=gpu_id)
        bound = [p for p in fitting if p.communication_bound]
        ax.scatter([p.devices for p in bound], [p.throughput for p in bound], marker="x", color="red",
                   zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs (x: communication-bound)")
    ax.set_ylabel("samples/s")
    ax.legend()
    ax.grid(alpha=0.3)


def _chart(draw: Callable[[Axes], None]) -> str:
    import matplotlib  # noqa: PLC0415 - about 1 s to import, and only the charts need it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415 - as above

    figure, ax = plt.subplots(figsize=(9, 3.6))
    draw(ax)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return f"<img alt='chart' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _f(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)
