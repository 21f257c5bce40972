"""``pase whatif``: which cluster trains a model fastest and cheapest, by the plan each one allows."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pase.cli.console import (
    DTYPES,
    MAX_BATCH,
    check_precision,
    check_writable,
    console,
    err_console,
    finite,
    write_output,
)
from pase.errors import PaseError
from pase.models.zoo import resolution_inputs, resolve_model

if TYPE_CHECKING:
    from rich.console import Console

    from cost_models.catalog import Catalog
    from pase.graph import LayerGraph
    from pase.planning.whatif import ClusterResult, WhatIfReport

DEFAULT_CLUSTERS = "8xH100-SXM,8xA100-80GB-SXM,8xL40S-PCIe,16xRTX4090"
GPU_FLAG_KEYS = {"bf16_tflops", "fp16_tflops", "fp32_tflops", "memory_gb", "memory_bw_gbps", "price", "tdp_w",
                 "pcie_gen", "max_gpus_per_node"}


def whatif(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model or package.module:factory.")] = "sd15-unet",
    batch: Annotated[int, typer.Option("--batch", "-b", min=1, max=MAX_BATCH,
                                       help="Global batch per training step.")] = 2048,
    clusters: Annotated[str, typer.Option("--clusters", help="Comma-separated cluster specs or system files.")]
    = DEFAULT_CLUSTERS,
    samples: Annotated[float, typer.Option(help="Training samples to price (time, $ and energy).",
                                           callback=finite)] = 1e9,
    precision: Annotated[str, typer.Option(help="bf16 (mixed precision), fp16 or fp32.")] = "bf16",
    price: Annotated[list[str] | None, typer.Option("--price", help="GPU=DOLLARS per GPU-hour, overriding the "
                                                    "catalog's typical price (repeatable).")] = None,
    gpu: Annotated[list[str] | None, typer.Option("--gpu", help="Add a GPU the catalog lacks: ID:bf16_tflops=...,"
                                                  "fp32_tflops=...,memory_gb=...,memory_bw_gbps=...[,price=...,"
                                                  "tdp_w=...,pcie_gen=...] (repeatable).")] = None,
    gpu_file: Annotated[list[Path] | None, typer.Option("--gpu-file", help="Extra catalog entries (JSON/YAML, "
                                                        "the catalog's format).")] = None,
    scaling: Annotated[bool, typer.Option(help="Add the 1..N GPU scaling curve per GPU type.")] = True,
    interconnect: Annotated[bool, typer.Option(help="Add the same GPUs with NVLink removed.")] = True,
    pipeline: Annotated[bool, typer.Option(help="Also search pipeline stages x data parallelism for each cluster "
                                           "and its PCIe twin (the scaling curves stay per-layer); several "
                                           "times slower.")] = False,
    memory_fraction: Annotated[float, typer.Option(min=0.05, max=1.0, help="Share of GPU memory a plan may "
                                                   "use.", callback=finite)] = 0.9,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON (for scripts).")] = False,
    resolution: Annotated[int | None, typer.Option("--resolution", min=8, max=16384, help="Images of this many "
                                                   "pixels a side (latent size: over the model's VAE factor; "
                                                   "default: the model's own).")] = None,
    text_length: Annotated[int | None, typer.Option("--text-length", min=1, max=4096, help="Prompt tokens of a "
                                                    "text-conditioned model (default: its own, 77).")] = None,
) -> None:
    """Predict step time, samples/s, MFU, $ and energy of the best plan on each cluster."""
    import torch

    from pase.graph import extract_model
    from pase.planning.per_layer import PlanOptions
    from pase.planning.whatif import check_inputs, run_whatif

    check_precision(precision)
    check_inputs(batch, samples)
    check_writable(html, "--html")
    catalog = _catalog(gpu_file or [], gpu or [])
    targets = _clusters(clusters, catalog, _prices(price or [], catalog))
    graphs: dict[int, LayerGraph] = {}

    sized = resolution is not None or text_length is not None
    spec = resolve_model(model) if sized else None  # (a user's factory needs --input-shape to resolve)
    if spec is not None:
        resolution_inputs(spec, batch, resolution, text_length)  # a bad resolution or text length fails here, once

    def graph_at(micro_batch: int) -> LayerGraph:
        if micro_batch not in graphs:
            shapes = resolution_inputs(spec, micro_batch, resolution, text_length) or None if spec else None
            graphs[micro_batch] = extract_model(model, micro_batch, dtype=getattr(torch, DTYPES[precision]),
                                                input_shapes=shapes, use_cache=True)
        return graphs[micro_batch]

    with err_console.status(f"capturing {model} ...") as status:
        graph_at(batch)
        report = run_whatif(graph_at, targets, batch, samples, PlanOptions(precision=precision,
                            memory_fraction=memory_fraction), catalog, scaling=scaling, interconnect=interconnect,
                            pipeline=pipeline,
                            progress=lambda what: status.update(what))
    if json_out:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print_report(report, console)
    if html is not None:
        from pase.planning.report import write_html

        write_output(html, "--html", lambda path: write_html(report, path), announce=not json_out)


def print_report(report: WhatIfReport, console: Console) -> None:
    from pase.planning.whatif import seconds_text

    table = Table(title=f"what if: {report.model}, global batch {report.batch}, {report.precision}, "
                        f"{report.samples:.3g} samples")
    for column in ("cluster", "interconnect", "step s", "samples/s", "per GPU", "MFU", "headroom GiB", "$/h",
                   "hours", "$ for samples", "kWh", "plan"):
        table.add_column(column, justify="left" if column in ("cluster", "interconnect", "plan") else "right")
    for row in report.clusters:
        table.add_row(*_cells(row))
    console.print(table)
    for gpu_id, points in report.scaling.items():
        curve = Table(title=f"scaling: {gpu_id}, global batch {report.batch}")
        for column in ("GPUs", "samples/s", "per GPU", "MFU", "communication", "note"):
            curve.add_column(column, justify="left" if column == "note" else "right")
        for point in points:
            if not point.fits:
                curve.add_row(str(point.devices), "does not fit", "", "", "", point.note)
                continue
            curve.add_row(str(point.devices), f"{point.samples_per_second:,.0f}",
                          f"{point.samples_per_second_per_gpu:,.1f}", f"{point.mfu:.0%}",
                          f"{point.communication_share:.0%}" + (" (bound)" if point.communication_bound else ""),
                          point.note)
        console.print(curve)
    if report.interconnect:
        links = Table(title="interconnect: the same GPUs with NVLink and over PCIe only")
        for column in ("cluster", "NVLink step s", "PCIe-only step s", "NVLink speed-up"):
            links.add_column(column, justify="left" if column == "cluster" else "right")
        for pair in report.interconnect:
            links.add_row(pair["cluster"], seconds_text(pair["nvlink_step_seconds"]),
                          seconds_text(pair["pcie_step_seconds"]),
                          f"{pair['nvlink_speedup']:.2f}x" if pair["nvlink_speedup"] else "n/a")
        console.print(links)
    for row in report.clusters:
        if row.note:
            console.print(f"{row.cluster}: {row.note}")
        if row.dollars_per_hour is None:
            console.print(f"{row.cluster}: the catalog has no price for {row.gpu}; give one with "
                          f"--price {row.gpu}=DOLLARS_PER_GPU_HOUR")
    console.print(report.summary)


def _cells(row: ClusterResult) -> list[str]:
    from pase.planning.whatif import seconds_text

    if not row.fits:
        return [row.cluster, row.interconnect, "does not fit", "", "", "", "", _num(row.dollars_per_hour, ",.2f"),
                "", "", "", "no plan fits in memory"]
    return [row.cluster, row.interconnect, seconds_text(row.step_seconds), f"{row.samples_per_second:,.0f}",
            f"{row.samples_per_second_per_gpu:,.1f}", f"{row.mfu:.0%}", f"{row.memory_headroom_bytes / 2**30:.1f}",
            _num(row.dollars_per_hour, ",.2f"), f"{row.hours_for_samples:,.1f}",
            _num(row.dollars_for_samples, ",.0f", "no price"), f"{row.energy_kwh_for_samples:,.0f}",
            row.main_split + (f" x{row.accumulation} accum" if row.accumulation > 1 else "")]


def _num(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def _catalog(files: list[Path], flags: list[str]) -> Catalog:
    from cost_models.catalog import Catalog

    catalog = Catalog.load(files)
    for flag in flags:
        gpu_id, _, body = flag.partition(":")
        if not gpu_id or not body:
            raise PaseError(f"--gpu {flag!r}: write ID:key=value,..., e.g. MyGPU:bf16_tflops=400,fp32_tflops=60,"
                            "memory_gb=96,memory_bw_gbps=4000,price=2.5")
        entry: dict[str, object] = {"name": gpu_id}
        for item in body.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in GPU_FLAG_KEYS:
                raise PaseError(f"--gpu {gpu_id}: unknown key {key!r}; use {', '.join(sorted(GPU_FLAG_KEYS))}")
            try:
                number = float(value)
            except ValueError:
                raise PaseError(f"--gpu {gpu_id}: {key} must be a number, not {value!r}") from None
            if key == "price":
                entry["price_usd_per_gpu_hour"] = {"low": number, "typical": number, "high": number,
                                                   "source": "--gpu flag"}
            else:
                entry[key] = int(number) if key in ("pcie_gen", "max_gpus_per_node") else number
        catalog.merge({"gpus": {gpu_id: entry}}, origin=f"--gpu {gpu_id}")
        catalog.gpu(gpu_id)  # validate the entry now: a missing field is named here, not mid-report
    return catalog


def _prices(flags: list[str], catalog: Catalog) -> dict[str, float]:
    from cost_models.catalog import is_positive_number

    prices = {}
    for flag in flags:
        name, _, value = flag.partition("=")
        try:
            dollars = float(value)
        except ValueError:
            raise PaseError(f"--price {flag!r}: write GPU=DOLLARS_PER_GPU_HOUR, e.g. H100-SXM=2.49") from None
        if not is_positive_number(dollars):
            raise PaseError(f"--price {flag!r}: the price must be a positive, finite $ per GPU-hour")
        prices[catalog.gpu(name).id] = dollars
    return prices


def _clusters(specs: str, catalog: Catalog, prices: dict[str, float]) -> list:
    from cost_models.cluster import load_cluster

    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise PaseError("--clusters is empty: name at least one cluster, e.g. 8xH100-SXM,8xA100-80GB-SXM")
    clusters = []
    for name in names:
        cluster = load_cluster(name, catalog)
        if cluster.gpu.id in prices:
            cluster = cluster.with_overrides(price=prices[cluster.gpu.id])
        clusters.append(cluster)
    return clusters


def register(app: typer.Typer) -> None:
    app.command()(whatif)
