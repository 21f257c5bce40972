"""``pase plan`` and ``pase search``: the optimal plan for a model on a cluster, and the exact solver alone."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from pase.cli.console import (
    DTYPES,
    MAX_BATCH,
    check_precision,
    check_writable,
    console,
    err_console,
    finite,
    parse_input_shapes,
    write_output,
)
from pase.errors import PaseError
from pase.models.zoo import resolution_inputs, resolve_model

if TYPE_CHECKING:
    from cost_models.cluster import Cluster
    from cost_models.rates import HardwareRates
    from pase.graph import LayerGraph
    from pase.planning import Plan, PlanOptions, PricedGraph


def plan(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model or package.module:factory.")] = "sd15-unet",
    cluster: Annotated[str, typer.Option("--cluster", "-c", help="Cluster spec (e.g. 8xH100-SXM, "
                                         "2x8xA100-80GB-SXM+IB-NDR400x4), a JSON/YAML system file, or local (this "
                                         "machine: its GPUs, or --devices gloo processes on its CPU).")]
    = "8xH100-SXM",
    devices: Annotated[int | None, typer.Option("--devices", min=1, help="With --cluster local: how many "
                                                "devices (GPUs, or CPU processes) the run will use.")] = None,
    batch: Annotated[int, typer.Option("--batch", "-b", min=1, max=MAX_BATCH,
                                       help="Global batch per training step.")] = 64,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the plan JSON here.")] = None,
    explain: Annotated[str | None, typer.Option(help="A layer id: its best alternative splits; a block (as the plan "
                                                "table names it): each recompute and sharding choice for it. "
                                                "Everything else as planned.")] = None,
    only: Annotated[str | None, typer.Option(help="Restrict to one kind of parallelism: dp (batch splits), fsdp "
                                             "(batch splits, sharded weights), tensor (every layer that can split "
                                             "channels or heads does) or pipeline (pipeline stages).")] = None,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Shard weights, gradients and optimizer state.")] = False,
    checkpoint: Annotated[bool, typer.Option("--checkpoint", help="Recompute activations inside blocks.")] = False,
    ema: Annotated[bool, typer.Option("--ema", help="Price a moving average of the weights updated every step, as "
                                      "`pase train --ema DECAY` runs.")] = False,
    grad_clip: Annotated[bool, typer.Option("--grad-clip/--no-grad-clip", help="Price clipping the gradients by "
                                            "their global norm, as `pase train` does by default (--max-grad-norm "
                                            "1.0); --no-grad-clip for runs with --max-grad-norm 0.")] = True,
    gap: Annotated[float, typer.Option(help="Stop the search once the plan is proved within this relative "
                                            "distance of the optimum (0: exact, slower at 32+ devices).",
                                            callback=finite)] = 5e-3,
    precision: Annotated[str | None, typer.Option(help="bf16, fp16 or fp32 (default bf16; fp32 for --cluster "
                                                  "local on CPU).")] = None,
    memory_fraction: Annotated[float, typer.Option(min=0.05, max=1.0, help="Share of GPU memory a plan may "
                                                   "use.", callback=finite)] = 0.9,
    profile: Annotated[Path | None, typer.Option(help="Calibration profile to price with.")] = None,
    gpu_file: Annotated[list[Path] | None, typer.Option("--gpu-file", help="Extra catalog entries.")] = None,
    input_shape: Annotated[list[str] | None, typer.Option("--input-shape", help="As for `pase graph`.")] = None,
    resolution: Annotated[int | None, typer.Option("--resolution", min=8, max=16384, help="Plan for images of this "
                                                   "many pixels a side (latent size: over the model's VAE "
                                                   "factor; default: the model's own).")] = None,
    text_length: Annotated[int | None, typer.Option("--text-length", min=1, max=4096, help="Prompt tokens of a "
                                                    "text-conditioned model (default: its own, 77).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Capture again (and refresh the cache) instead "
                                           "of reusing the cached layer graph of a zoo model.")] = False,
    pipeline: Annotated[bool, typer.Option("--pipeline/--no-pipeline", help="Also search pipeline stages "
                                           "(cut points, device groups, microbatches, PP x DP); on by default, "
                                           "--no-pipeline skips them (1-2 s less).")] = True,
    schedule: Annotated[str, typer.Option(help="Pipeline schedule: 1f1b or gpipe.")] = "1f1b",
    max_stages: Annotated[int, typer.Option(min=1, help="Most pipeline stages to consider.")] = 8,
    space: Annotated[str, typer.Option(help="runnable: only splits the runtime runs as planned; all: every split "
                                       "the cost model prices (what-if; the plan says which layers cannot run).")]
    = "runnable",
    force: Annotated[list[str] | None, typer.Option("--force", help="LAYER_GLOB=DIM:FACTOR[,DIM:FACTOR]: make the "
                                                    "matching layers take these splits (e.g. "
                                                    "'*attn1.to_q=n:4,c_out:2'; 'n:8' for batch only).")] = None,
    min_chunk: Annotated[str | None, typer.Option("--min-chunk", help="ROLE:SIZE[,ROLE:SIZE]: the smallest part of a "
                                                  "dimension a device may hold, per role (out_channel, reduction, "
                                                  "channel: 32; spatial: 16; sequence: 64; head, batch: 1).")] = None,
    html_path: Annotated[Path | None, typer.Option("--html", help="Write a picture of the plan (blocks on the U with "
                                                   "skip connections, coloured by split, marked where recomputed or "
                                                   "sharded; time and memory bars; a pipeline's schedule) and the "
                                                   "predictions as one self-contained HTML file.")] = None,
    png_path: Annotated[Path | None, typer.Option("--png", help="Write the same picture as a PNG.")] = None,
    micro_steps: Annotated[str, typer.Option("--micro-steps", help="Gradient accumulation: run each step as this "
                                             "many micro-steps of batch / N, or auto (searched with the splits: the "
                                             "fewest that fit, more where that is faster).")] = "auto",
) -> None:
    """Plan how to split every layer of a model over a cluster, and compare with DDP and FSDP."""
    import torch

    from cost_models.local import target_cluster
    from cost_models.rates import profile_mismatch
    from pase.graph import extract_model
    from pase.planning import PipelineOptions, PlanDoesNotFit, PlanOptions, make_plan

    if devices is not None and cluster != "local":
        raise PaseError("--devices goes with --cluster local; a cluster spec already says how many devices")
    with err_console.status("probing this machine ..." if cluster == "local" else "reading the cluster ...") as status:
        target, measured, default_precision = target_cluster(cluster, devices, profile, gpu_file,
                                                             progress=lambda what: status.update(f"{what} ..."))
    precision = precision or default_precision
    check_precision(precision)
    if measured is not None and (reason := profile_mismatch(target, measured)):
        raise PaseError(reason)
    accumulation = parse_micro_steps(micro_steps)
    named, positional = parse_input_shapes(input_shape or [])
    if resolution is not None or text_length is not None:  # (a user's factory needs --input-shape to resolve)
        named = {**resolution_inputs(resolve_model(model), batch, resolution, text_length), **named}
    check_writable(json_path, "--json")
    check_writable(html_path, "--html")
    check_writable(png_path, "--png")
    with err_console.status(f"capturing {model} at batch {batch} ...") as status:
        graph = extract_model(model, batch, dtype=getattr(torch, DTYPES[precision]), input_shapes=named or None,
                              user_input_shapes=positional or None, use_cache=True, refresh_cache=no_cache)
        options = PlanOptions(precision=precision, memory_fraction=memory_fraction, only=only, fsdp=fsdp,
                              checkpointing=checkpoint, search_gap=gap, space=space, ema=ema, grad_clip=grad_clip,
                              force=parse_force(force or []), min_chunk=parse_min_chunk(min_chunk))
        searched = only == "pipeline" or (pipeline and only is None)  # --only dp/fsdp/tensor: no stages
        stages = PipelineOptions(schedule=schedule, max_stages=max_stages) if searched else None
        try:
            result, priced = make_plan(graph, target, profile=measured, options=options, pipeline=stages,
                                       progress=lambda what: status.update(f"{what} ..."), micro_steps=accumulation)
        except PlanDoesNotFit as exc:  # stages hold only their own layers' weights: a pipeline may fit
            if stages is not None or target.world_size < 2:
                raise
            raise PlanDoesNotFit(f"{exc} Or drop --no-pipeline: pipeline stages each hold only their own layers.",
                                 exc.least_bytes, exc.limit_bytes) from None
    if resolution is not None or text_length is not None:  # the inputs the plan was made for: the runtime's too
        result.options.update({"resolution": resolution, "text_length": text_length})
    print_plan(result)
    if explain:
        if result.stages or priced is None:
            raise PaseError("--explain shows alternatives within a per-layer plan, and this plan is a pipeline; run "
                            "it with --no-pipeline")
        blocks = {block.name for block in result.blocks}
        if explain in blocks:
            from cost_models.rates import HardwareRates

            rates = HardwareRates(target, measured, precision)
            _print_explain_block(graph, result, priced, target, rates, options, explain)
        if explain in priced.ids or explain not in blocks:
            _print_explain(graph, result, priced, explain)
    if json_path is not None:
        write_output(json_path, "--json", result.save)
    if html_path is not None or png_path is not None:
        from pase.planning.plan_report import write_plan_html, write_plan_png

        pictured = priced if not result.stages else None  # a pipeline's stages were priced apart: layer times
        if html_path is not None:
            write_output(html_path, "--html", lambda target: write_plan_html(result, graph, pictured, target))
        if png_path is not None:
            write_output(png_path, "--png", lambda target: write_plan_png(result, graph, pictured, target))


def parse_micro_steps(text: str) -> int | None:
    """``--micro-steps``: a count, or None for auto."""
    if text.strip().lower() == "auto":
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise PaseError(f"--micro-steps {text!r}: give a whole number of micro-steps per step (1: none), or auto")
    return int(text)


def parse_min_chunk(text: str | None) -> dict[str, int] | None:
    """``--min-chunk`` as {role: smallest part}; None keeps the defaults (``strategies.splits.MIN_CHUNK``)."""
    from strategies.splits import MIN_CHUNK

    if text is None:
        return None
    roles = [role for role, size in MIN_CHUNK.items() if size < 1 << 30]  # kernels and "other" are never split
    chunks: dict[str, int] = {}
    for part in filter(None, text.split(",")):
        role, colon, size = (piece.strip() for piece in part.partition(":"))
        if not colon or role not in roles or not size.isdigit() or int(size) < 1:
            raise PaseError(f"--min-chunk {text!r}: {part!r} is not ROLE:SIZE with ROLE one of {', '.join(roles)} and "
                            "a positive whole SIZE")
        chunks[role] = int(size)
    return chunks


def parse_force(entries: list[str]) -> dict[str, dict[str, int]]:
    """``--force`` values as {layer glob: {dimension: factor}}."""
    forced: dict[str, dict[str, int]] = {}
    for entry in entries:
        glob, sep, spec = entry.rpartition("=")
        if not sep or not glob:
            raise PaseError(f"--force {entry!r}: write LAYER_GLOB=DIM:FACTOR[,DIM:FACTOR], e.g. '*.to_q=n:4,c_out:2'")
        splits: dict[str, int] = {}
        for part in filter(None, spec.split(",")):
            dim, colon, factor = part.partition(":")
            if not colon or not factor.strip().isdigit() or int(factor) < 1:
                raise PaseError(f"--force {entry!r}: {part!r} is not DIM:FACTOR with a positive whole factor")
            splits[dim.strip()] = int(factor)
        forced[glob] = splits
    return forced


def runnable_summary(result: Plan) -> str:
    """One line: do all layers run as planned (the plan JSON's per-layer "runnable")."""
    refused = [layer for layer in result.layers if not layer.runnable]
    if result.search.pipeline and result.search.pipeline.unrunnable:
        return (f"[bold red]not runnable:[/] {result.search.pipeline.unrunnable}; `pase.parallelize` refuses this "
                "plan. Plan without `--space all` for one that runs.")
    if not refused:
        return f"all {len(result.layers)} layers run as planned (every configuration is one the runtime runs)."
    return (f"[bold red]not runnable:[/] {len(refused)} of {len(result.layers)} layers use splits the runtime does not "
            f"run (e.g. {refused[0].id}: {', '.join(f'{d}={f}' for d, f in refused[0].splits.items()) or 'unsplit'}); "
            "`pase.parallelize` refuses this plan. Plan without `--space all` for one that runs.")


DATA_PARALLEL_BASELINES = ("ddp", "fsdp", "ddp_accum", "fsdp_accum_ckpt")


def print_plan(result: Plan) -> None:
    from pase.planning.plan import blocks_summary, summarize_blocks

    accumulation = f" as {result.micro_steps} micro-steps of {result.micro_batch}" if result.micro_steps > 1 else ""
    table = Table(title=f"plan for {result.model} on {result.cluster} ({result.devices} devices), global batch "
                        f"{result.batch}{accumulation}, {result.precision}"
                        + (f", {result.options['resolution']} px" if result.options.get("resolution") else "")
                        + (f", {result.options['text_length']} tokens" if result.options.get("text_length") else "")
                        + (" (layer times per micro-step)" if accumulation else ""))
    choices = {block.name: block for block in result.blocks}
    for column in ("block", "layers", "split (most layers)", "recompute", "sharding", "time ms", "memory GiB"):
        table.add_column(column, justify="left" if column in ("block", "split (most layers)") else "right")
    for block in summarize_blocks(result):
        split, count = block.splits.most_common(1)[0]
        others = f" (+{block.layers - count} other)" if count < block.layers else ""
        choice = choices.get(block.block)
        table.add_row(block.block, str(block.layers), split + others,
                      "yes" if choice and choice.checkpoint else "", choice.sharding if choice else "",
                      f"{block.seconds * 1e3:.2f}", f"{block.memory / 2**30:.2f}")
    console.print(table)
    console.print(blocks_summary(result), highlight=False)
    if result.stages:
        print_stages(result, console)
    compare = Table(title="predicted step (same cost model for every row)")
    bubbles = any(p and p.bubble_seconds for p in (result.predicted, *result.baselines.values()))
    for column in ("strategy", "step ms", "samples/s", "micro-steps", "compute ms", "communication ms",
                   "memory GiB/device", *(("bubble ms",) if bubbles else ())):
        compare.add_column(column, justify="left" if column == "strategy" else "right")
    rows = [("pase plan", result.predicted), *((name, p) for name, p in result.baselines.items())]
    for name, prediction in rows:
        if prediction is None:
            compare.add_row(name, "n/a", "", "", "", "", "", *(("",) if bubbles else ()))
            continue
        compare.add_row(name, f"{prediction.step_seconds * 1e3:.2f}", f"{prediction.samples_per_second:,.0f}",
                        str(prediction.micro_steps), f"{prediction.compute_seconds * 1e3:.2f}",
                        f"{prediction.communication_seconds * 1e3:.2f}",
                        f"{prediction.memory_bytes_per_device / 2**30:.2f}",
                        *((f"{prediction.bubble_seconds * 1e3:.2f}",) if bubbles else ()))
    console.print(compare)
    for name, note in result.baseline_notes.items():
        console.print(f"{name}: n/a because {note}")
    if result.search.space_note:
        console.print(f"note: {result.search.space_note}")
    console.print(runnable_summary(result))
    if result.search.pipeline:
        console.print(pipeline_summary(result))
    # the data-parallel baselines people run (the pipeline search's own rows are the plan's alternatives, not these)
    best = [p for name, p in result.baselines.items() if p and name in DATA_PARALLEL_BASELINES]
    search = result.search
    if best:
        speedup = min(p.step_seconds for p in best) / result.predicted.step_seconds
        restricted = " (the plan is restricted by --only, --fsdp or --checkpoint; the baselines are not)" \
            if speedup < 1 else ""
        console.print(f"pase plan runs at {speedup:.2f}x the speed of the best data-parallel baseline{restricted}. "
                      + (f"Pricing {search.pricing_seconds:.2f} s, search " if search.pricing_seconds is not None
                         else "Search ")
                      + f"{search.seconds:.2f} s over {search.configs:,} configurations "
                      f"(elimination width {search.width}, largest table {search.largest_table:,}"
                      + (f", conditioned on hubs {', '.join(search.conditioned_on)}" if search.conditioned_on else "")
                      + (f", proved within {search.proved_gap:.2%} of the optimum" if search.proved_gap else ", exact")
                      + f"); rates: {result.options['rates']}.")


def _print_explain_block(graph: LayerGraph, result: Plan, priced: PricedGraph, cluster: Cluster,
                         rates: HardwareRates, options: PlanOptions, block: str) -> None:
    from pase.planning.explain import explain_block

    rows = explain_block(graph, result, priced, cluster, rates, options, block)
    table = Table(title=f"choices for block {block} (every layer keeps its split, every other block its choices; "
                        f"whole step{f' of {result.micro_steps} micro-steps' if result.micro_steps > 1 else ''})")
    unit, scale = ("GiB", 2**30) if result.predicted.memory_bytes_per_device >= 2**30 else ("MiB", 2**20)
    per = " per micro-step" if result.micro_steps > 1 else ""
    for column in ("recompute", "sharding", f"block ms{per}", f"block memory {unit}", "step ms", "vs plan",
                   f"memory {unit}/device", ""):
        table.add_column(column, justify="left" if column in ("recompute", "sharding", "") else "right")
    planned = next(row for row in rows if row["chosen"])
    for row in rows:
        notes = ["chosen" if row["chosen"] else "", "" if row["fits"] else "over the memory limit",
                 "" if row["runnable"] else "what-if: pipeline stages shard every block alike"]
        table.add_row("yes" if row["recompute"] else "no", row["sharding"], f"{row['block_seconds'] * 1e3:.3f}",
                      f"{row['block_memory_bytes'] / scale:.3f}", f"{row['step_seconds'] * 1e3:.3f}",
                      f"{(row['step_seconds'] - planned['step_seconds']) * 1e3:+.3f}",
                      f"{row['memory_bytes'] / scale:.3f}", "; ".join(filter(None, notes)))
    console.print(table)


def _print_explain(graph: LayerGraph, result: Plan, priced: PricedGraph, layer_id: str) -> None:
    from pase.planning.explain import explain as explain_layer

    rows = explain_layer(graph, result, priced, layer_id)
    table = Table(title=f"alternatives for {layer_id} (every other layer as planned; layer + its re-layouts"
                        + (", memory priced as in the search" if result.search.memory_price else "") + ")")
    for column in ("split", "seconds", "vs plan", "memory GiB", ""):
        table.add_column(column)
    for row in rows:
        table.add_row(" ".join(f"{d}={f}" for d, f in row["splits"].items()), f"{row['seconds'] * 1e3:.3f} ms",
                      f"{row['delta_seconds'] * 1e3:+.3f} ms", f"{row['memory_bytes'] / 2**30:.3f}",
                      "chosen" if row["chosen"] else "")
    console.print(table)


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
    """One row per pipeline stage: its blocks, ranks, time per microbatch and memory."""
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
    """How the pipeline-stage search went, in one sentence (None without one)."""
    info = plan.search.pipeline
    if info is None:
        return None
    return (f"pipeline search {info.seconds:.2f} s: {info.settings} (replicas, microbatches) settings over "
            f"{info.segments} segments, {info.segment_searches} segment searches, "
            f"{info.exact_stage_searches} exact stage searches"
            + (f", stopped {info.gap:.1%} from the bound" if info.gap else
               ", exact over the runnable space" if info.runnable_only else ", exact over the space")
            + "".join(f"; note: {note}" for note in info.notes))


def register(app: typer.Typer) -> None:
    app.command()(plan)
    app.command()(search)
