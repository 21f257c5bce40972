"""Benchmark: capture time and peak RSS of every zoo model and capture method (each in a fresh process).

    .venv/bin/python tools/bench_capture.py [--models sd15-unet,sdxl-unet] [--methods meta_trace,export]
                                            [--batch 8] [--json out.json]

Each (model, method) is captured in its own Python process so that its peak RSS is its own
(imports of torch and diffusers included: that is what a user's `pase graph` costs); "import s"
is the time to import pase, torch and the model's library and build it on meta, "capture s" the
capture and layer grouping alone, "cpu s" the process's user+system CPU time (the machine may be
shared: CPU time is the steadier number). Targets from the foundation issue: SD-1.5 and SDXL
within 60 s and 3 GB RSS on the 2-core CI machine; the planner issue wants `pase plan` on SD-1.5
under 10 s end to end, capture included.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGET_SECONDS = 60.0
TARGET_RSS_MB = 3 * 1024


def measure_one(name: str, batch: int | None, method: str) -> dict:
    started = time.perf_counter()
    import torch

    from pase.graph import extract  # imports count towards the process, not the capture
    from pase.models.zoo import ZOO

    spec = ZOO[name]
    with torch.device("meta"):
        model = spec.build()  # imports the model's library (diffusers): also paid before any capture
    args, kwargs = spec.example_inputs(batch, device="meta")
    imported = time.perf_counter()
    graph = extract(model, args, kwargs, method=method, name=name)
    done = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "model": name, "method": method, "batch": graph.batch, "layers": len(graph),
        "edges": graph.graph.number_of_edges(), "params": graph.param_count,
        "gflops_fwd_per_sample": graph.meta["flops_fwd"] / graph.batch / 1e9,
        "skip_edges": len(graph.skip_edges()), "capture": graph.meta["capture"],
        "import_seconds": round(imported - started, 2), "capture_seconds": round(done - imported, 2),
        "process_seconds": round(done - started, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="unet-tiny,pase-unet,ddpm-cifar10,sd15-unet,sdxl-unet")
    parser.add_argument("--methods", default="auto,export", help="capture methods to time, comma separated")
    parser.add_argument("--batch", type=int, default=None, help="batch to capture with (default: each model's)")
    parser.add_argument("--json", type=Path, default=Path("bench_results/capture.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.batch, args.methods)))
        return

    from rich.console import Console
    from rich.table import Table

    rows = []
    console = Console(width=max(shutil.get_terminal_size((150, 24)).columns, 120))
    for name in args.models.split(","):
        for method in args.methods.split(","):
            with console.status(f"capturing {name} with {method} ..."):
                command = [sys.executable, __file__, "--one", name, "--methods", method] + \
                    (["--batch", str(args.batch)] if args.batch else [])
                result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                console.print(f"[red]{name} ({method}) failed[/]\n{result.stderr[-2000:]}")
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    table = Table(title="pase graph capture (meta device, fresh process per model)")
    for column in ("model", "method", "batch", "layers", "edges", "params", "GFLOP/sample fwd", "skips", "import s",
                   "capture s", "process s", "cpu s", "peak RSS MB", "within 60 s / 3 GB"):
        table.add_column(column, justify="left" if column in ("model", "method") else "right")
    for row in rows:
        ok = row["process_seconds"] <= TARGET_SECONDS and row["peak_rss_mb"] <= TARGET_RSS_MB
        method = row["method"] if row["method"] == row["capture"] else f"{row['method']} -> {row['capture']}"
        table.add_row(row["model"], method, str(row["batch"]), str(row["layers"]), str(row["edges"]),
                      f"{row['params']:,}", f"{row['gflops_fwd_per_sample']:.2f}", str(row["skip_edges"]),
                      f"{row['import_seconds']:.1f}", f"{row['capture_seconds']:.2f}", f"{row['process_seconds']:.1f}",
                      f"{row['cpu_seconds']:.1f}", f"{row['peak_rss_mb']:.0f}", "yes" if ok else "[red]NO[/]")
    console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": _machine(), "results": rows}, indent=2))
    console.print(f"wrote {args.json}")


def _machine() -> dict:
    import os
    import platform

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}


if __name__ == "__main__":
    main()
