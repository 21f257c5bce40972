"""Benchmark: `pase plan` end to end (fresh process each), for models at several device counts and batches.

    .venv/bin/python tools/bench_plan.py [--models sd15-unet,sdxl-unet] [--batches 512,2048]
                                         [--json bench_results/plan.json]

For each model, batch and cluster (8 to 64 H100s) it runs `pase plan` with no flags twice: with
`--no-cache` (capture included) and with the layer-graph cache warm. It reports wall time, the
search's elimination width and largest table, the micro-steps, sharding (none, ZeRO-2 "gradients", FSDP
"full") and recomputed blocks the plan chose, and its gain over each baseline (DDP, FSDP, DDP with
accumulation, FSDP with accumulation and checkpointing, the best pipeline; "-" where one does not fit). Targets
(issue 18): every case fits without flags, under 10 s cold for SD-1.5 and 30 s for SDXL at 64 GPUs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pase.planning.plan import sharding_of

CLUSTERS = ("8xH100-SXM", "2x8xH100-SXM+IB-NDR400x8", "4x8xH100-SXM+IB-NDR400x8", "8x8xH100-SXM+IB-NDR400x8")
BASELINES = ("ddp", "fsdp", "ddp_accum", "fsdp_accum_ckpt", "pipeline")


def run(model: str, cluster: str, batch: int, cache: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        command = [sys.executable, "-m", "pase", "plan", "--model", model, "--cluster", cluster, "--batch", str(batch),
                   "--json", str(out)] + ([] if cache else ["--no-cache"])
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            return {"cluster": cluster, "error": result.stderr.strip().splitlines()[-1]}
        plan = json.loads(out.read_text())
    best = min((b["step_seconds"] for b in plan["baselines"].values() if b), default=None)
    gains = {name: round(b["step_seconds"] / plan["predicted"]["step_seconds"], 3) if b else None
             for name, b in plan["baselines"].items() if name in BASELINES}
    return {"cluster": cluster, "devices": plan["devices"], "batch": batch, "cached": cache,
            "wall_seconds": round(wall, 2), "micro_steps": plan.get("micro_steps", 1),
            "fsdp": plan["options"]["fsdp"], "checkpointing": plan["options"]["checkpointing"], "gains": gains,
            "sharding": sharding_of(plan["options"]),
            "recomputed_blocks": sum(b.get("checkpoint", False) for b in plan.get("blocks", [])),
            "memory_gib": round(plan["predicted"]["memory_bytes_per_device"] / 2**30, 1),
            "pricing_seconds": plan["search"].get("pricing_seconds"), "search_seconds": plan["search"]["seconds"],
            "width": plan["search"]["width"],
            "largest_table": plan["search"]["largest_table"], "configs": plan["search"]["configs"],
            "proved_gap": plan["search"].get("proved_gap", 0.0), "space_note": plan["search"].get("space_note"),
            "step_seconds": plan["predicted"]["step_seconds"],
            "speedup_over_data_parallel": round(best / plan["predicted"]["step_seconds"], 3) if best else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15-unet,sdxl-unet")
    parser.add_argument("--batches", default="512,2048")
    parser.add_argument("--clusters", default=",".join(CLUSTERS))
    parser.add_argument("--warm-only", action="store_true", help="skip the cold (--no-cache) runs")
    parser.add_argument("--json", type=Path, default=Path("bench_results/plan.json"))
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(shutil.get_terminal_size((150, 24)).columns, 150))
    results = {}
    for model in args.models.split(","):
        rows = []
        for batch in map(int, args.batches.split(",")):
            for cluster in args.clusters.split(","):
                for cache in ((True,) if args.warm_only else (False, True)):
                    with console.status(f"pase plan {model} --batch {batch} on {cluster} "
                                        f"({'warm' if cache else 'cold'} cache) ..."):
                        rows.append(run(model, cluster, batch, cache))
        results[model] = rows
        table = Table(title=f"`pase plan --model {model}` end to end, one process each")
        for column in ("cluster", "p", "batch", "graph cache", "wall s", "search s", "width", "micro-steps",
                       "sharding", "recomputed", "GiB", *(f"vs {name}" for name in BASELINES)):
            table.add_column(column, justify="left" if column == "cluster" else "right")
        for row in rows:
            if "error" in row:
                table.add_row(row["cluster"], "", "", "", "", "", "", "", "", "", "", row["error"])
                continue
            table.add_row(row["cluster"], str(row["devices"]), str(row["batch"]), "warm" if row["cached"] else "cold",
                          f"{row['wall_seconds']:.1f}", f"{row['search_seconds']:.1f}", str(row["width"]),
                          str(row["micro_steps"]), row["sharding"], str(row["recomputed_blocks"]),
                          f"{row['memory_gib']:.1f}",
                          *(f"{row['gains'][name]:.2f}x" if row["gains"].get(name) else "-" for name in BASELINES))
        console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": results}, indent=1))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
