"""Benchmark: sequential vs ParaDiGMS vs SRDS (plain and pipelined) on 1 and 2 processes, with the
sample-plan cost model's prediction beside each measurement.

    PYTHONPATH=. python tools/bench_sampling.py                       # unet-tiny + ddpm-cifar10 (~15 min on 2 cores)
    PYTHONPATH=. python tools/bench_sampling.py --models unet-tiny    # ~1-2 min

For each process count the measurements run in one ``torchrun`` launch (this script with
``--worker``), one thread per process, every configuration once after a warm-up call. Predictions
use the CPU eval-time probe (``measure_eval_time``), the stated gloo all-gather default and the
stated convergence defaults (no probe), i.e. what ``pase sample-plan --devices P`` would predict.
Prints a table and writes bench_results/sampling.json. No assertions: numbers only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = (("ddpm", 100), ("ddim", 50))
SAMPLERS = ("sequential", "paradigms", "srds", "srds-pipelined")
WINDOW = 8
TOL = {"paradigms": 0.1, "srds": 0.01}


def _config(model: str, scheduler: str, steps: int, sampler: str):  # noqa: ANN202 - SampleConfig
    from pase.sampling.runner import SampleConfig

    name = "srds" if sampler.startswith("srds") else sampler
    return SampleConfig(model, name, scheduler, steps, WINDOW, TOL.get(name), pipelined=sampler == "srds-pipelined")


def worker(models: list[str], samplers: list[str], out: str) -> None:
    """Run every configuration on this process group; rank 0 writes the measurements."""
    import torch

    from pase.sampling import distributed
    from pase.sampling.runner import sample

    torch.set_num_threads(1)
    rows = []
    with distributed.session():
        for model in models:
            for scheduler, steps in CASES:
                reference = None
                for sampler in samplers:  # sequential first: the others' error is measured against it
                    result, _ = sample(_config(model, scheduler, steps, sampler))
                    reference = result.sample if sampler == "sequential" else reference
                    error = None if reference is None or sampler == "sequential" else \
                        float((result.sample - reference).norm() / reference.norm())
                    rows.append({"model": model, "scheduler": scheduler, "steps": steps, "sampler": sampler,
                                 "passes": result.passes, "evals": result.evals, "seconds": result.seconds,
                                 "iterations": result.iterations, "rel_error": error,
                                 "compute_seconds": result.extra.get("compute_seconds"),
                                 "gather_seconds": result.extra.get("gather_seconds")})
                    if distributed.is_rank0():
                        print(json.dumps(rows[-1]), flush=True)
        if distributed.is_rank0():
            Path(out).write_text(json.dumps(rows))


def predict(model: str, processes: int, samplers: list[str], eval_time) -> dict[tuple[str, int, str], dict[str, float]]:  # noqa: ANN001,E501
    """What sample-plan predicts for exactly the benchmarked settings, from one eval-time probe."""
    import torch

    from pase.sampling import default_blocks
    from pase.sampling.planner import (
        CPU_MEMORY_GBPS,
        Convergence,
        Pricing,
        gather_time,
        predict_paradigms,
        predict_sequential,
        predict_srds,
    )
    from pase.sampling.runner import build_denoiser

    torch.set_num_threads(1)
    _, (channels, height, width) = build_denoiser(model, 0)
    convergence = Convergence()
    pricing = Pricing(eval_time, gather_time(None, None, processes), convergence, channels * height * width,
                      CPU_MEMORY_GBPS)
    out = {}
    for scheduler, steps in CASES:
        blocks = default_blocks(steps)
        for sampler in samplers:
            if sampler == "sequential":
                c = predict_sequential(pricing, steps, 1)
            elif sampler == "paradigms":
                c = predict_paradigms(pricing, steps, 1, processes, WINDOW)
            else:
                c = predict_srds(pricing, steps, 1, processes, blocks, sampler == "srds-pipelined",
                                 convergence.iterations(blocks, scheduler))
            out[(scheduler, steps, sampler)] = {"passes": c.passes, "evals": c.evals, "seconds": c.seconds}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet-tiny,ddpm-cifar10")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "sampling.json"))
    args = parser.parse_args()
    models, samplers = args.models.split(","), args.samplers.split(",")
    if args.worker:
        worker(models, samplers, args.out)
        return
    from rich.console import Console
    from rich.table import Table

    from pase import atomic
    from pase.process_group import free_port

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    from pase.sampling.planner import measure_eval_time

    eval_times = {model: measure_eval_time(model, None, batches=(1, 2, 4, 8, 16), threads=1, repeats=5)
                  for model in models}  # once per model, before the runs, so both process counts share it
    results = []
    for processes in map(int, args.processes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                            "--master-port", str(free_port()), __file__, "--worker", "--models", args.models,
                            "--samplers", args.samplers, "--out", str(out)], check=True, env=env, cwd=ROOT,
                           timeout=3600)
            measured = json.loads(out.read_text())
        for model in models:
            predicted = predict(model, processes, samplers, eval_times[model])
            for row in measured:
                if row["model"] == model:
                    pred = predicted[(row["scheduler"], row["steps"], row["sampler"])]
                    results.append({**row, "processes": processes,
                                    "predicted": pred})
    table = Table(title=f"Parallel sampling on this CPU (1 thread/process; window {WINDOW}, tol {TOL['paradigms']} "
                        f"ParaDiGMS / {TOL['srds']} SRDS); predicted = sample-plan's cost model")
    for column in ("model", "sampler", "proc", "passes (pred)", "evals/sample (pred)", "seconds (pred)",
                   "speedup", "rel err"):
        table.add_column(column, justify="left" if column in ("model", "sampler") else "right")
    sequential = {(r["model"], r["scheduler"], r["processes"]): r["seconds"] for r in results
                  if r["sampler"] == "sequential"}
    for r in results:
        p = r["predicted"]
        base = sequential.get((r["model"], r["scheduler"], r["processes"]))
        table.add_row(r["model"], f"{r['scheduler'].upper()}-{r['steps']} {r['sampler']}", str(r["processes"]),
                      f"{r['passes']} ({p['passes']})", f"{r['evals']:g} ({p['evals']:g})",
                      f"{r['seconds']:.2f} ({p['seconds']:.2f})", f"{base / r['seconds']:.2f}x" if base else "-",
                      "-" if r["rel_error"] is None else f"{r['rel_error']:.1e}")
    Console(width=160).print(table)
    probes = {m: {"batches": e.batches, "seconds": e.seconds, "source": e.source} for m, e in eval_times.items()}
    atomic.write_text(args.out, json.dumps({"results": results, "eval_time": probes}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
