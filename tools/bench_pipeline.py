"""Benchmark: `pase plan --pipeline` end to end (fresh process each, warm layer-graph cache).

    .venv/bin/python tools/bench_pipeline.py [--models sd15-unet,sdxl-unet] [--json bench_results/pipeline.json]

For each model and cluster (p = 8, 16, 32, 64 H100s) it reports wall time, the pipeline
search's own time and work, the chosen plan (stages x replicas, microbatches) and its predicted
step against the best no-pipeline plan and the best pure pipeline. The first run of a model
captures its graph (cached afterwards); that run is repeated so every row has a warm cache.
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

CLUSTERS = ("8xH100-SXM", "2x8xH100-SXM+IB-NDR400x8", "4x8xH100-SXM+IB-NDR400x8", "8x8xH100-SXM+IB-NDR400x8")


def run(model: str, cluster: str, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        command = [sys.executable, "-m", "pase", "plan", "--model", model, "--cluster", cluster, "--batch", str(batch),
                   "--pipeline", "--json", str(out)]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            return {"model": model, "cluster": cluster, "error": (result.stderr or result.stdout).strip()[-300:]}
        plan = json.loads(out.read_text())
    info = plan["search"]["pipeline"]
    plain, pure = plan["baselines"].get("no pipeline"), plan["baselines"].get("pure pipeline")
    step = plan["predicted"]["step_seconds"]
    return {"model": model, "cluster": cluster, "devices": plan["devices"], "wall_seconds": round(wall, 2),
            "pipeline_search_seconds": info["seconds"], "settings": info["settings"],
            "segment_searches": info["segment_searches"], "exact_stage_searches": info["exact_stage_searches"],
            "gap": info["gap"], "stages": len(plan["stages"]), "replicas": plan["pipeline_replicas"],
            "microbatches": plan["microbatches"], "step_ms": round(step * 1e3, 3),
            "no_pipeline_ms": round(plain["step_seconds"] * 1e3, 3) if plain else None,
            "pure_pipeline_ms": round(pure["step_seconds"] * 1e3, 3) if pure else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15-unet,sdxl-unet")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--clusters", default=",".join(CLUSTERS))
    parser.add_argument("--json", type=Path, default=Path("bench_results/pipeline.json"))
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(shutil.get_terminal_size((150, 24)).columns, 140))
    rows = []
    for model in args.models.split(","):
        for k, cluster in enumerate(args.clusters.split(",")):
            with console.status(f"pase plan --pipeline {model} on {cluster} ..."):
                row = run(model, cluster, args.batch)
                if k == 0 and "error" not in row:
                    row = run(model, cluster, args.batch)  # the first run may have captured the graph
            rows.append(row)
    table = Table(title=f"`pase plan --pipeline --batch {args.batch}` end to end, one process each (warm graph cache)")
    for column in ("model", "cluster", "p", "wall s", "pipeline s", "settings", "segment / exact searches",
                   "plan", "step ms", "no pipeline ms", "pure pipeline ms"):
        table.add_column(column, justify="left" if column in ("model", "cluster", "plan") else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["model"], row["cluster"], "", "", "", "", "", row["error"][-80:], "", "", "")
            continue
        shape = (f"{row['stages']} stages x {row['replicas']}, m={row['microbatches']}" if row["stages"]
                 else "no pipeline")
        table.add_row(row["model"], row["cluster"], str(row["devices"]), f"{row['wall_seconds']:.1f}",
                      f"{row['pipeline_search_seconds']:.1f}", str(row["settings"]),
                      f"{row['segment_searches']} / {row['exact_stage_searches']}", shape, f"{row['step_ms']:.2f}",
                      f"{row['no_pipeline_ms']:.2f}" if row["no_pipeline_ms"] else "n/a",
                      f"{row['pure_pipeline_ms']:.2f}" if row["pure_pipeline_ms"] else "n/a")
    console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"batch": args.batch, "results": rows}, indent=1))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
