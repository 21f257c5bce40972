"""Benchmark: `pase plan` end to end (fresh process each), for a model at several device counts.

    .venv/bin/python tools/bench_plan.py [--model sd15-unet] [--json bench_results/plan.json]

For each cluster it runs `pase plan` twice: with `--no-cache` (capture included) and with the
layer-graph cache warm. It reports wall time, the search's elimination width and largest
table, and the predicted speed-up over the best pure data-parallel baseline.
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
    return {"cluster": cluster, "devices": plan["devices"], "cached": cache, "wall_seconds": round(wall, 2),
            "pricing_seconds": plan["search"].get("pricing_seconds"), "search_seconds": plan["search"]["seconds"],
            "width": plan["search"]["width"],
            "largest_table": plan["search"]["largest_table"], "configs": plan["search"]["configs"],
            "proved_gap": plan["search"].get("proved_gap", 0.0), "space_note": plan["search"].get("space_note"),
            "step_seconds": plan["predicted"]["step_seconds"],
            "speedup_over_data_parallel": round(best / plan["predicted"]["step_seconds"], 3) if best else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-unet")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--json", type=Path, default=Path("bench_results/plan.json"))
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(shutil.get_terminal_size((150, 24)).columns, 120))
    rows = []
    for cluster in CLUSTERS:
        for cache in (False, True):
            with console.status(f"pase plan {args.model} on {cluster} ({'warm' if cache else 'cold'} cache) ..."):
                rows.append(run(args.model, cluster, args.batch, cache))
    table = Table(title=f"`pase plan --model {args.model} --batch {args.batch}` end to end, one process each")
    for column in ("cluster", "p", "graph cache", "wall s", "pricing s", "search s", "configs", "width",
                   "largest table", "proved gap", "vs data parallel"):
        table.add_column(column, justify="left" if column == "cluster" else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["cluster"], "", "", "", "", "", "", "", "", "", row["error"])
            continue
        table.add_row(row["cluster"], str(row["devices"]), "warm" if row["cached"] else "cold",
                      f"{row['wall_seconds']:.1f}",
                      "" if row["pricing_seconds"] is None else f"{row['pricing_seconds']:.1f}",
                      f"{row['search_seconds']:.1f}",
                      f"{row['configs']:,}",
                      str(row["width"]), f"{row['largest_table']:,}",
                      f"{row['proved_gap']:.2%}" + (" (idle configs left out)" if row["space_note"] else ""),
                      f"{row['speedup_over_data_parallel']:.2f}x")
    console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": args.model, "batch": args.batch, "results": rows}, indent=1))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
