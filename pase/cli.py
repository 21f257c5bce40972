"""The ``pase`` command line: typer commands that print rich tables.

Commands parse and validate their options here and call library functions; user errors
(``PaseError``) print one clear line and exit with status 2, never a traceback.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pase import __version__
from pase.errors import InputShapeError, PaseError

if TYPE_CHECKING:
    from pase.graph import LayerGraph
    from pase.planner import PricedGraph
    from pase.plans import Plan

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pase: plan and run parallel training of diffusion UNets.")
# Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
console = Console(width=shutil.get_terminal_size((150, 24)).columns)
err_console = Console(stderr=True, width=shutil.get_terminal_size((150, 24)).columns)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _version(value: bool) -> None:
    if value:
        console.print(f"pase {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """pase: plan and run parallel training of diffusion UNets."""


def parse_input_shapes(values: list[str]) -> tuple[dict[str, tuple[int, ...]], list[tuple[int, ...]]]:
    """``name=8,4,64,64`` overrides a zoo input; a bare ``8,3,32,32`` is a positional input of a user model."""
    named: dict[str, tuple[int, ...]] = {}
    positional: list[tuple[int, ...]] = []
    for value in values:
        name, _, shape_text = value.rpartition("=")
        try:
            shape = tuple(int(part) for part in shape_text.replace("x", ",").split(",") if part.strip())
        except ValueError:
            raise InputShapeError(
                f"--input-shape {value!r} is not a shape: write comma-separated integers, batch first, "
                "e.g. 8,3,32,32 (or name=8,3,32,32 to override one input of a zoo model)") from None
        if any(d <= 0 for d in shape):
            raise InputShapeError(f"--input-shape {value!r} has a non-positive extent; every extent must be >= 1")
        if name:
            named[name] = shape
        else:
            positional.append(shape)
    return named, positional


def _human(value: float, unit: str = "") -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 1000 or prefix == "P":
            return f"{value:.3g} {prefix}{unit}".strip()
        value /= 1000
    return f"{value:.3g}"


def _bytes(value: float) -> str:
    if abs(value) < 1024:
        return f"{int(value)} B"
    for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or prefix == "TiB":
            return f"{value:.3g} {prefix}"
        value /= 1024
    return f"{value:.3g}"


@app.command()
def models() -> None:
    """List the built-in model zoo."""
    from pase.models.zoo import ZOO

    table = Table(title="pase model zoo (built from configs, no downloads)")
    for column in ("name", "family", "inputs (B = batch)", "description"):
        table.add_column(column)
    for spec in ZOO.values():
        inputs = ", ".join(f"{i.name} ({', '.join(map(str, i.shape))})" for i in spec.inputs)
        table.add_row(spec.name, spec.family, inputs, spec.description)
    console.print(table)


@app.command()
def graph(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model name (see `pase models`) or "
                                        "package.module:factory for your own nn.Module.")] = "sd15-unet",
    batch: Annotated[int | None, typer.Option("--batch", "-b", min=1,
                                              help="Batch size to capture with (default: the model's).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the LayerGraph as JSON here.")] = None,
    dtype: Annotated[str, typer.Option(help="Capture dtype: fp32, bf16 or fp16.")] = "fp32",
    capture: Annotated[str, typer.Option(help="auto (meta_trace, then torch.export, then symbolic_trace), "
                                         "meta_trace, export or symbolic_trace.")] = "auto",
    input_shape: Annotated[list[str] | None, typer.Option(
        "--input-shape", help="Input shape, batch first: name=8,4,64,64 overrides a zoo input; for "
        "module:factory models give one per positional input (e.g. 8,3,32,32 and 8).")] = None,
    layers: Annotated[bool, typer.Option("--layers", help="Print every layer, not only blocks.")] = False,
) -> None:
    """Capture a model's layer graph and print its blocks: parameters, FLOPs and activation bytes."""
    import torch

    from pase.graph import CAPTURE_METHODS, extract_model

    if dtype not in DTYPES:
        raise PaseError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if capture not in ("auto", *CAPTURE_METHODS):
        raise PaseError(f"unknown --capture {capture!r}; choose auto, {', '.join(CAPTURE_METHODS)}")
    named, positional = parse_input_shapes(input_shape or [])
    with err_console.status(f"capturing {model} on the meta device ({capture}) ..."):
        layer_graph = extract_model(model, batch, dtype=getattr(torch, DTYPES[dtype]), method=capture,
                                    input_shapes=named or None, user_input_shapes=positional or None)
    meta = layer_graph.meta
    per_sample = max(layer_graph.batch, 1)
    table = Table(title=f"{model}: {len(layer_graph)} layers, {layer_graph.graph.number_of_edges()} tensor edges "
                        f"(captured with {meta['capture']} in {meta['capture_seconds']:.1f} s, batch "
                        f"{layer_graph.batch}, {meta['dtype']})")
    table.add_column("block" if not layers else "layer")
    if layers:
        table.add_column("op")
    for column in ("layers" if not layers else "dims", "params", "fwd / sample", "fwd+bwd / sample",
                   "outputs (whole batch)"):
        table.add_column(column, justify="right" if column != "dims" else "left")
    if layers:
        for layer_id, data in layer_graph.layers():
            dims = " ".join(f"{k}={v}" for k, v in data["dims"].items())
            table.add_row(layer_id, data["op"], dims, _human(data["param_count"]),
                          _human(data["flops_fwd"] / per_sample, "FLOP"),
                          _human((data["flops_fwd"] + data["flops_bwd"]) / per_sample, "FLOP"),
                          _bytes(data["out_bytes"]))
    else:
        for block in layer_graph.blocks():
            table.add_row(block.block, str(block.layers), _human(block.params),
                          _human(block.flops_fwd / per_sample, "FLOP"),
                          _human((block.flops_fwd + block.flops_bwd) / per_sample, "FLOP"), _bytes(block.out_bytes))
    table.add_section()
    table.add_row("total", *([""] if layers else []), str(len(layer_graph)), _human(layer_graph.param_count),
                  _human(meta["flops_fwd"] / per_sample, "FLOP"),
                  _human((meta["flops_fwd"] + meta["flops_bwd"]) / per_sample, "FLOP"),
                  _bytes(layer_graph.total("out_bytes")), style="bold")
    console.print(table)
    console.print(f"{len(layer_graph.skip_edges())} skip-connection edges from encoder to decoder; "
                  f"{_human(layer_graph.param_count)} parameters "
                  f"({_bytes(layer_graph.total('param_bytes'))} in {meta['dtype']}).")
    if json_path is not None:
        write_output(json_path, "--json", layer_graph.to_json)


@app.command()
def plan(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model or package.module:factory.")] = "sd15-unet",
    cluster: Annotated[str, typer.Option("--cluster", "-c", help="Cluster spec (e.g. 8xH100-SXM, "
                                         "2x8xA100-80GB-SXM+IB-NDR400x4), a JSON/YAML system file, or local (this "
                                         "machine: its GPUs, or --devices gloo processes on its CPU).")]
    = "8xH100-SXM",
    devices: Annotated[int | None, typer.Option("--devices", min=1, help="With --cluster local: how many "
                                                "devices (GPUs, or CPU processes) the run will use.")] = None,
    batch: Annotated[int, typer.Option("--batch", "-b", min=1, help="Global batch per training step.")] = 64,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the plan JSON here.")] = None,
    explain: Annotated[str | None, typer.Option(help="Show the best alternatives for this layer id.")] = None,
    only: Annotated[str | None, typer.Option(help="Restrict to one kind of parallelism: dp (batch splits), fsdp "
                                             "(batch splits, sharded weights), tensor (channel and head splits) or "
                                             "pipeline (pipeline stages).")] = None,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Shard weights, gradients and optimizer state.")] = False,
    checkpoint: Annotated[bool, typer.Option("--checkpoint", help="Recompute activations inside blocks.")] = False,
    gap: Annotated[float, typer.Option(help="Stop the search once the plan is proved within this relative "
                                            "distance of the optimum (0: exact, slower at 32+ devices).")] = 5e-3,
    precision: Annotated[str | None, typer.Option(help="bf16, fp16 or fp32 (default bf16; fp32 for --cluster "
                                                  "local on CPU).")] = None,
    memory_fraction: Annotated[float, typer.Option(min=0.05, max=1.0, help="Share of GPU memory a plan may "
                                                   "use.")] = 0.9,
    profile: Annotated[Path | None, typer.Option(help="Calibration profile to price with.")] = None,
    gpu_file: Annotated[list[Path] | None, typer.Option("--gpu-file", help="Extra catalog entries.")] = None,
    input_shape: Annotated[list[str] | None, typer.Option("--input-shape", help="As for `pase graph`.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Capture again (and refresh the cache) instead "
                                           "of reusing the cached layer graph of a zoo model.")] = False,
    pipeline: Annotated[bool, typer.Option("--pipeline/--no-pipeline", help="Also search pipeline stages "
                                           "(cut points, device groups, microbatches, PP x DP).")] = False,
    schedule: Annotated[str, typer.Option(help="Pipeline schedule: 1f1b or gpipe.")] = "1f1b",
    max_stages: Annotated[int, typer.Option(min=1, help="Most pipeline stages to consider.")] = 8,
) -> None:
    """Plan how to split every layer of a model over a cluster, and compare with DDP and FSDP."""
    import torch

    from cost_models.calibrate import load_profile
    from cost_models.catalog import Catalog
    from cost_models.cluster import load_cluster
    from cost_models.rates import profile_mismatch
    from pase.graph import extract_model
    from pase.planner import PlanOptions, plan_and_price

    if devices is not None and cluster != "local":
        raise PaseError("--devices goes with --cluster local; a cluster spec already says how many devices")
    if cluster == "local":
        from cost_models.local import CPU_DEVICE, local_cluster

        with err_console.status("probing this machine ...") as status:
            target, measured = local_cluster(devices, profile, Catalog.load(gpu_file or []),
                                             progress=lambda what: status.update(f"{what} ..."))
        precision = precision or ("fp32" if target.gpu.id == CPU_DEVICE else "bf16")
    else:
        target = load_cluster(cluster, Catalog.load(gpu_file or []))
        measured = load_profile(profile) if profile else None
    precision = precision or "bf16"
    if precision not in DTYPES:
        raise PaseError(f"unknown --precision {precision!r}; choose one of {', '.join(DTYPES)}")
    if measured is not None and (reason := profile_mismatch(target, measured)):
        raise PaseError(reason)
    named, positional = parse_input_shapes(input_shape or [])
    with err_console.status(f"capturing {model} at batch {batch} ...") as status:
        graph = extract_model(model, batch, dtype=getattr(torch, DTYPES[precision]), input_shapes=named or None,
                              user_input_shapes=positional or None, use_cache=True, refresh_cache=no_cache)
        options = PlanOptions(precision=precision, memory_fraction=memory_fraction, only=only, fsdp=fsdp,
                              checkpointing=checkpoint, search_gap=gap)
        if pipeline or only == "pipeline":
            from pase.pipeline_planner import PipelineOptions, plan_with_pipeline

            result, priced = plan_with_pipeline(graph, target, profile=measured, options=options,
                                                pipeline=PipelineOptions(schedule=schedule, max_stages=max_stages),
                                                progress=lambda what: status.update(f"{what} ..."))
        else:
            from pase.planner import PlanDoesNotFit

            try:
                result, priced = plan_and_price(graph, target, profile=measured, options=options,
                                                progress=lambda what: status.update(f"{what} ..."))
            except PlanDoesNotFit as exc:  # stages hold only their own layers' weights: a pipeline may fit
                if target.world_size < 2:
                    raise
                raise PlanDoesNotFit(f"{exc} Or add --pipeline: pipeline stages each hold only their own layers.",
                                     exc.least_bytes, exc.limit_bytes) from None
    print_plan(result)
    if explain:
        if result.stages or priced is None:
            raise PaseError("--explain shows alternatives within a per-layer plan; run it without --pipeline")
        _print_explain(graph, result, priced, explain)
    if json_path is not None:
        write_output(json_path, "--json", result.save)


def write_output(path: Path, option: str, write: Callable[[Path], object], announce: bool = True) -> None:
    """``write(path)``; a path that cannot be written is the user's error, named with its option."""
    try:
        write(path)
    except OSError as exc:
        raise PaseError(f"cannot write {option} {path}: {exc.strerror or exc}") from None
    if announce:
        console.print(f"wrote {path}")


def print_plan(result: Plan) -> None:
    from pase.planner import summarize_blocks

    table = Table(title=f"plan for {result.model} on {result.cluster} ({result.devices} devices), global batch "
                        f"{result.batch}, {result.precision}")
    for column in ("block", "layers", "split (most layers)", "time ms", "memory GiB"):
        table.add_column(column, justify="left" if column in ("block", "split (most layers)") else "right")
    for block in summarize_blocks(result):
        split, count = block["splits"].most_common(1)[0]
        others = f" (+{block['layers'] - count} other)" if count < block["layers"] else ""
        table.add_row(block["block"], str(block["layers"]), split + others, f"{block['seconds'] * 1e3:.2f}",
                      f"{block['memory'] / 2**30:.2f}")
    console.print(table)
    if result.stages:
        from pase.cli_pipeline import print_stages

        print_stages(result, console)
    compare = Table(title="predicted step (same cost model for every row)")
    bubbles = any(p and p.bubble_seconds for p in (result.predicted, *result.baselines.values()))
    for column in ("strategy", "step ms", "samples/s", "compute ms", "communication ms", "memory GiB/device",
                   *(("bubble ms",) if bubbles else ())):
        compare.add_column(column, justify="left" if column == "strategy" else "right")
    rows = [("pase plan", result.predicted), *((name, p) for name, p in result.baselines.items())]
    for name, prediction in rows:
        if prediction is None:
            compare.add_row(name, "n/a", "", "", "", "", *(("",) if bubbles else ()))
            continue
        compare.add_row(name, f"{prediction.step_seconds * 1e3:.2f}", f"{prediction.samples_per_second:,.0f}",
                        f"{prediction.compute_seconds * 1e3:.2f}", f"{prediction.communication_seconds * 1e3:.2f}",
                        f"{prediction.memory_bytes_per_device / 2**30:.2f}",
                        *((f"{prediction.bubble_seconds * 1e3:.2f}",) if bubbles else ()))
    console.print(compare)
    for name, note in result.baseline_notes.items():
        console.print(f"{name}: n/a because {note}")
    if result.search.get("space_note"):
        console.print(f"note: {result.search['space_note']}")
    if result.search.get("pipeline"):
        from pase.cli_pipeline import pipeline_summary

        console.print(pipeline_summary(result))
    best = [p for name, p in result.baselines.items() if p and name in ("ddp", "fsdp")]
    if best:
        speedup = min(p.step_seconds for p in best) / result.predicted.step_seconds
        console.print(f"pase plan runs at {speedup:.2f}x the speed of the best pure data-parallel baseline. "
                      + (f"Pricing {result.search['pricing_seconds']:.2f} s, search "
                         if "pricing_seconds" in result.search else "Search ")
                      + f"{result.search['seconds']:.2f} s over {result.search['configs']:,} configurations "
                      f"(elimination width {result.search['width']}, largest table "
                      f"{result.search['largest_table']:,}"
                      + (f", conditioned on hubs {', '.join(result.search['conditioned_on'])}"
                         if result.search.get("conditioned_on") else "")
                      + (f", proved within {result.search['proved_gap']:.2%} of the optimum"
                         if result.search.get("proved_gap") else ", exact")
                      + f"); rates: {result.options['rates']}.")


def _print_explain(graph: LayerGraph, result: Plan, priced: PricedGraph, layer_id: str) -> None:
    from pase.planner import explain as explain_layer

    rows = explain_layer(graph, result, priced, layer_id)
    table = Table(title=f"alternatives for {layer_id} (every other layer as planned; layer + its re-layouts"
                        + (", memory priced as in the search" if result.search.get("memory_price") else "") + ")")
    for column in ("split", "seconds", "vs plan", "memory GiB", ""):
        table.add_column(column)
    for row in rows:
        table.add_row(" ".join(f"{d}={f}" for d, f in row["splits"].items()), f"{row['seconds'] * 1e3:.3f} ms",
                      f"{row['delta_seconds'] * 1e3:+.3f} ms", f"{row['memory_bytes'] / 2**30:.3f}",
                      "chosen" if row["chosen"] else "")
    console.print(table)


@app.command()
def search(
    cost_graph: Annotated[Path, typer.Option("--cost-graph", help="A pase-cost-graph v1 file (JSON or gzip JSON).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print {optimum, assignment, seconds} as JSON.")] = False,
    no_prune: Annotated[bool, typer.Option("--no-prune", help="Keep dominated configurations.")] = False,
) -> None:
    """Solve a cost graph exactly (min-sum variable elimination) and print the optimum."""
    import json
    import time

    from pase.search import CostGraph, solve

    started = time.perf_counter()
    graph = CostGraph.load(cost_graph)
    loaded = time.perf_counter()
    solution = solve(graph, prune=not no_prune)
    seconds = time.perf_counter() - started
    if as_json:
        print(json.dumps({"optimum": solution.optimum,
                          "assignment": {graph.ids[v]: c for v, c in enumerate(solution.assignment)},
                          "seconds": round(seconds, 4)}))
        return
    stats = solution.stats
    table = Table(title=f"{graph.name}: {len(graph.sizes)} vertices, {len(graph.edges)} edges, "
                        f"{min(graph.sizes)}-{max(graph.sizes)} configs per vertex")
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in (("optimum", f"{solution.optimum:.6g}"), ("load s", f"{loaded - started:.3f}"),
                        ("solve s", f"{stats.seconds:.3f}"), ("elimination width", str(stats.width)),
                        ("largest table", f"{stats.largest_table:,}"), ("pruned configs", f"{stats.pruned_configs:,}")):
        table.add_row(what, value)
    console.print(table)


def _register_subcommands() -> None:
    from pase import cli_runtime, cli_sample, cli_train, cli_whatif
    from pase.cli_hw import hw_app

    app.add_typer(hw_app, name="hw")
    for module in (cli_whatif, cli_sample, cli_runtime, cli_train):
        module.register(app)


_register_subcommands()


def main() -> None:
    """Console-script entry point. typer reports usage errors itself (exit 2); user errors that
    pase detects (``PaseError``) become one red line and exit status 2 too."""
    try:
        app()
    except PaseError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)


# Commands that only compute and print: once they have, nothing is left for the interpreter's teardown
# to do but free torch, the model and the layer graph, which takes 1-2 s of a 10 s `pase plan`.
_NOTHING_TO_TEAR_DOWN = {"plan", "whatif", "search", "graph", "models", "hw", "sample-plan"}


def run() -> None:
    """The process entry point (console script, ``python -m pase``): ``main``, then, for the commands that
    hold no files, processes or process groups open, exit without tearing the interpreter down."""
    code = 0
    try:
        main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"): what the interpreter would print, with status 1
            err_console.print(str(exc.code))
            code = 1
    if len(sys.argv) > 1 and sys.argv[1] in _NOTHING_TO_TEAR_DOWN:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
