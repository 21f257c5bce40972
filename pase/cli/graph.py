"""``pase models`` and ``pase graph``: the zoo, and a model's layer graph as a table of blocks."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pase.cli.console import (
    DTYPES,
    MAX_BATCH,
    check_precision,
    check_writable,
    console,
    err_console,
    human,
    parse_input_shapes,
    size,
    write_output,
)
from pase.errors import PaseError


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


def graph(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model name (see `pase models`) or "
                                        "package.module:factory for your own nn.Module.")] = "sd15-unet",
    batch: Annotated[int | None, typer.Option("--batch", "-b", min=1, max=MAX_BATCH,
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

    check_precision(dtype, "--dtype")
    if capture not in ("auto", *CAPTURE_METHODS):
        raise PaseError(f"unknown --capture {capture!r}; choose auto, {', '.join(CAPTURE_METHODS)}")
    named, positional = parse_input_shapes(input_shape or [])
    check_writable(json_path, "--json")
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
            table.add_row(layer_id, data["op"], dims, human(data["param_count"]),
                          human(data["flops_fwd"] / per_sample, "FLOP"),
                          human((data["flops_fwd"] + data["flops_bwd"]) / per_sample, "FLOP"),
                          size(data["out_bytes"]))
    else:
        for block in layer_graph.blocks():
            table.add_row(block.block, str(block.layers), human(block.params),
                          human(block.flops_fwd / per_sample, "FLOP"),
                          human((block.flops_fwd + block.flops_bwd) / per_sample, "FLOP"), size(block.out_bytes))
    table.add_section()
    table.add_row("total", *([""] if layers else []), str(len(layer_graph)), human(layer_graph.param_count),
                  human(meta["flops_fwd"] / per_sample, "FLOP"),
                  human((meta["flops_fwd"] + meta["flops_bwd"]) / per_sample, "FLOP"),
                  size(layer_graph.total("out_bytes")), style="bold")
    console.print(table)
    console.print(f"{len(layer_graph.skip_edges())} skip-connection edges from encoder to decoder; "
                  f"{human(layer_graph.param_count)} parameters "
                  f"({size(layer_graph.total('param_bytes'))} in {meta['dtype']}).")
    if json_path is not None:
        write_output(json_path, "--json", layer_graph.to_json)


def register(app: typer.Typer) -> None:
    app.command()(models)
    app.command()(graph)
