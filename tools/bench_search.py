"""Benchmark: load + exact solve of cost graphs, against the PaSE reference's search times.

    .venv/bin/python tools/make_cost_graphs.py          # once: the synthetic graphs
    .venv/bin/python tools/bench_search.py [FILES...] [--json bench_results/search.json]

Each file is loaded and solved in a fresh process (as `pase search --cost-graph F --json` would
be) so peak RSS is per graph. The PaSE reference implementation's times on this 2-core machine:
Inception-v3 p=64 128 s, Transformer p=16 200 s.
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

REFERENCE_SECONDS = {"inception-like-p64": 128.0, "transformer-like-p16": 200.0}


def measure_one(path: Path) -> dict:
    started = time.perf_counter()
    from pase.search import CostGraph, solve

    graph = CostGraph.load(path)
    loaded = time.perf_counter()
    solution = solve(graph)
    done = time.perf_counter()
    return {"graph": graph.name, "file": str(path), "vertices": len(graph.sizes), "edges": len(graph.edges),
            "max_configs": max(graph.sizes), "file_mb": round(path.stat().st_size / 1e6, 2),
            "optimum": solution.optimum, "load_seconds": round(loaded - started, 3),
            "solve_seconds": round(done - loaded, 3), "total_seconds": round(done - started, 3),
            "width": solution.stats.width, "largest_table": solution.stats.largest_table,
            "pruned_configs": solution.stats.pruned_configs,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--json", type=Path, default=Path("bench_results/search.json"))
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one)))
        return
    files = args.files or sorted(Path("bench_results/cost_graphs").glob("*.json.gz"))
    if not files:
        sys.exit("no cost graphs: run tools/make_cost_graphs.py first, or pass files")
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(shutil.get_terminal_size((150, 24)).columns, 120))
    rows = []
    for path in files:
        with console.status(f"solving {path.name} ..."):
            result = subprocess.run([sys.executable, __file__, "--one", str(path)], capture_output=True, text=True,
                                    timeout=600)
        if result.returncode != 0:
            console.print(f"[red]{path} failed[/]\n{result.stderr[-1500:]}")
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    table = Table(title="exact search (load + solve, one process per graph)")
    for column in ("graph", "V", "E", "max K", "MB", "load s", "solve s", "total s", "width", "largest table",
                   "pruned", "RSS MB", "reference s"):
        table.add_column(column, justify="left" if column == "graph" else "right")
    for row in rows:
        reference = REFERENCE_SECONDS.get(row["graph"])
        table.add_row(row["graph"], str(row["vertices"]), str(row["edges"]), str(row["max_configs"]),
                      f"{row['file_mb']:.1f}", f"{row['load_seconds']:.2f}", f"{row['solve_seconds']:.2f}",
                      f"{row['total_seconds']:.2f}", str(row["width"]), f"{row['largest_table']:,}",
                      f"{row['pruned_configs']:,}", f"{row['peak_rss_mb']:.0f}",
                      f"{reference:g} ({reference / row['total_seconds']:.0f}x)" if reference else "")
    console.print(table)
    compared = [r for r in rows if r["graph"] in REFERENCE_SECONDS]
    if len(compared) == len(REFERENCE_SECONDS):
        ours = sum(r["total_seconds"] for r in compared)
        theirs = sum(REFERENCE_SECONDS.values())
        console.print(f"reference pair: {theirs:g} s for the PaSE reference vs {ours:.2f} s here "
                      f"({theirs / ours:.0f}x), same sizes, synthetic costs")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": rows}, indent=1))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
