"""Benchmark: pase's predictions against published measurements (issue 19's validation set).

    .venv/bin/python tools/bench_fidelity.py [--points tools/data/fidelity_points.json]
                                             [--json bench_results/fidelity.json] [--only ID,ID]

Every training point of the set (published end-to-end throughputs of diffusion UNets, each with its source,
configuration and measured value: ``tools/data/fidelity_points.json``) is planned as `pase plan` would plan it:
the zoo UNet at the point's resolution and global batch, on the point's GPUs (the catalog's entry; nodes of 8
with NVLink, and the point's network between nodes), with the default search (micro-steps, sharding per block,
pipelines). The plan's predicted images/s is printed beside the measured one with the error. Sampling points
(ParaDiGMS, SRDS) are priced by `sample-plan`'s model. The same cost model and catalog price every row: there
is no per-row factor. The run ends with the mean absolute error and the worst row.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

POINTS = Path(__file__).parent / "data" / "fidelity_points.json"
ZOO_MODEL = {"sd15": "sd15-unet", "sd1": "sd15-unet", "sd2": "sd15-unet", "sdxl": "sdxl-unet"}
# the catalog's GPU for a published name (the catalog holds each GPU's figures and their sources)
GPU_IDS = {"h100": "H100-SXM", "h100-sxm": "H100-SXM", "h100-pcie": "H100-PCIe", "h200": "H200-SXM",
           "b200": "B200", "gb200": "GB200", "a100-80": "A100-80GB-SXM", "a100-40": "A100-40GB-SXM",
           "a100": "A100-80GB-SXM", "v100": "V100-SXM2", "mi300x": "MI300X", "rtx4090": "RTX4090", "l40s": "L40S"}
NETWORKS = {"ndr": "IB-NDR400", "xdr": "IB-XDR", "hdr": "IB-HDR", "edr": "IB-EDR", "roce": "RoCE-400"}


def catalog_gpu(name: str) -> str:
    """The catalog id for a published GPU name ("A100-SXM4-80GB" -> "A100-80GB-SXM")."""
    key = name.lower().replace(" ", "").replace("_", "-")
    if key.startswith("a100"):
        return GPU_IDS["a100-40"] if "40" in key else GPU_IDS["a100-80"]
    for prefix in sorted(GPU_IDS, key=len, reverse=True):
        if key.startswith(prefix.replace("-", "")) or key.startswith(prefix):
            return GPU_IDS[prefix]
    raise SystemExit(f"no catalog GPU for {name!r}: add it to GPU_IDS (or the catalog)")


def cluster_spec(point: dict[str, Any]) -> str:
    """A pase cluster spec for the point: one node up to 8 GPUs, else nodes of 8 over the point's network."""
    gpu, gpus = catalog_gpu(point["gpu"]), int(point["gpus"])
    if gpus <= 8:
        return f"{gpus}x{gpu}"
    interconnect = str(point.get("interconnect") or "").lower()
    network = next((net for key, net in NETWORKS.items() if key in interconnect), "IB-NDR400")
    nodes = -(-gpus // 8)
    return f"{nodes}x8x{gpu}+{network}x8"


def predict_training(point: dict[str, Any]) -> dict[str, Any]:
    import torch

    from cost_models.cluster import parse_spec
    from pase.graph import extract_model
    from pase.models.zoo import ZOO, resolution_inputs
    from pase.planning import PlanOptions, make_plan
    from pase.planning.pipeline import PipelineOptions

    model = ZOO_MODEL[point["model"]]
    batch = int(point["global_batch"])
    shapes = resolution_inputs(ZOO[model], batch, point.get("resolution_px")) or None
    precision = "bf16" if point.get("precision") in ("bf16", "fp16", "unknown", None) else "fp32"
    graph = extract_model(model, batch, dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                          input_shapes=shapes, use_cache=True)
    spec = cluster_spec(point)
    started = time.perf_counter()
    plan, _ = make_plan(graph, parse_spec(spec), options=PlanOptions(precision=precision), pipeline=PipelineOptions())
    return {"cluster": spec, "model": model, "predicted_images_per_s": batch / plan.predicted.step_seconds,
            "micro_steps": plan.micro_steps, "stages": len(plan.stages), "plan_seconds": time.perf_counter() - started}


def measured_images_per_s(point: dict[str, Any]) -> float | None:
    if point.get("images_per_s"):
        return float(point["images_per_s"])
    if str(point.get("unit", "")).lower() in ("images/s", "img/s", "samples/s"):
        return float(point["value"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=Path, default=POINTS)
    parser.add_argument("--json", type=Path, default=Path("bench_results/fidelity.json"))
    parser.add_argument("--only", default=None, help="Comma-separated point ids.")
    args = parser.parse_args()
    data = json.loads(args.points.read_text())
    wanted = set(args.only.split(",")) if args.only else None
    console = Console(width=160)
    rows: list[dict[str, Any]] = []
    for point in data["points"]:
        if wanted and point["id"] not in wanted or point.get("kind") != "training":
            continue
        measured = measured_images_per_s(point)
        if measured is None or point["model"] not in ZOO_MODEL:
            rows.append({"id": point["id"], "skipped": "no images/s to compare, or a model the zoo lacks"})
            continue
        with console.status(f"planning {point['id']} ..."):
            predicted = predict_training(point)
        error = predicted["predicted_images_per_s"] / measured - 1
        rows.append({"id": point["id"], "gpu": point["gpu"], "gpus": point["gpus"], "measured_images_per_s": measured,
                     "error": error, "source_url": point.get("source_url"), **predicted})
    table = Table(title="pase's predicted training throughput against published measurements")
    for column in ("point", "cluster", "model", "measured img/s", "predicted img/s", "error", "micro-steps"):
        table.add_column(column, justify="left" if column in ("point", "cluster", "model") else "right")
    for row in rows:
        if "skipped" in row:
            table.add_row(row["id"], "", "", "", "", row["skipped"], "")
            continue
        table.add_row(row["id"], row["cluster"], row["model"], f"{row['measured_images_per_s']:,.1f}",
                      f"{row['predicted_images_per_s']:,.1f}", f"{row['error']:+.0%}", str(row["micro_steps"]))
    console.print(table)
    errors = [abs(row["error"]) for row in rows if "error" in row]
    summary = {"points": len(errors), "mean_abs_error": statistics.fmean(errors) if errors else None,
               "worst_abs_error": max(errors, default=None)}
    if errors:
        console.print(f"{len(errors)} points: mean absolute error {summary['mean_abs_error']:.0%}, worst "
                      f"{summary['worst_abs_error']:.0%} (target: 15% and 25%)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
