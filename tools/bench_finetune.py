"""Benchmark: peak memory and step time of fine-tuning strategies on ddpm-cifar10 at one batch.

    .venv/bin/python tools/bench_finetune.py [--model ddpm-cifar10] [--batch 8] [--steps 4]
                                             [--json bench_results/finetune.json]

Writes seeded pretrained weights once, then runs each strategy as its own process
(``pase finetune --init W --json``), so each peak is that process's memory during training above
its level just before the model was built (VmHWM on Linux CPU, max_memory_allocated on a GPU):
full fine-tuning, TuneQDM 8-bit and 4-bit (2 experts), and one DeMe group (one range with its
frozen teacher and the consistency loss; a DeMe job runs one such group per range). Step time is
the median after the first step. Targets: TuneQDM's gradient+optimizer bytes at least
100x below full fine-tuning, and its peak at most 0.5x, at the same batch.

The runs measure memory as ``pase finetune`` does for every user (``pase.train.memory``: on glibc the process
pins malloc's mmap threshold at 64 KiB itself, so its resident set follows live tensors), so these peaks are the
ones the CLI reports.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "full": ["--strategy", "full"],
    "tuneqdm-8bit": ["--strategy", "tuneqdm", "--bits", "8", "--experts", "2"],
    "tuneqdm-4bit": ["--strategy", "tuneqdm", "--bits", "4", "--experts", "2"],
    "deme-1-group": ["--strategy", "deme", "--ranges", "1", "--merge-weights", "1", "--consistency", "1.0"],
}


def write_pretrained(model: str, path: Path) -> None:
    import torch

    from pase.models.zoo import ZOO
    from pase.weights import save_weights

    torch.manual_seed(0)
    save_weights(path, ZOO[model].build().state_dict(), {"pase_model": model})


def run(name: str, args: argparse.Namespace, weights: Path) -> dict:
    command = [sys.executable, "-m", "pase", "finetune", *CONFIGS[name], "--model", args.model, "--init", str(weights),
               "--steps", str(args.steps), "--batch", str(args.batch), "--data", "shapes", "--data-count", "256",
               "--no-progress", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ddpm-cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs (0: torch's default)")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run only these configurations")
    parser.add_argument("--json", type=Path, default=Path("bench_results/finetune.json"))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from pase.atomic import write_text

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "pretrained.safetensors"
        write_pretrained(args.model, weights)
        for name in args.only or CONFIGS:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            rows[name] = run(name, args, weights)
    full = rows.get("full")
    table = Table(title=f"fine-tuning {args.model} at batch {args.batch}, {args.steps} steps "
                        f"({next(iter(rows.values()))['device']}, {next(iter(rows.values()))['memory_method']})")
    for column in ("strategy", "trainable params", "grad+optimizer", "x below full", "peak memory",
                   "peak / full", "predicted peak", "step s", "samples/s"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    summary = {}
    for name, row in rows.items():
        ratio_go = full["grad_and_optimizer_bytes"] / row["grad_and_optimizer_bytes"] if full else None
        ratio_peak = row["peak_memory_bytes"] / full["peak_memory_bytes"] if full else None
        predicted = row.get("predicted_memory", {}).get("total")
        summary[name] = {**{k: row[k] for k in ("trainable_params", "total_params", "grad_and_optimizer_bytes",
                                                "peak_memory_bytes", "final_loss", "step_seconds",
                                                "samples_per_second")},
                         "grad_and_optimizer_reduction": ratio_go, "peak_vs_full": ratio_peak,
                         "predicted_peak_bytes": predicted}
        table.add_row(name, f"{row['trainable_params']:,}", f"{row['grad_and_optimizer_bytes'] / 2**20:.2f} MiB",
                      f"{ratio_go:.0f}x" if ratio_go else "-", f"{row['peak_memory_bytes'] / 2**20:.0f} MiB",
                      f"{ratio_peak:.2f}" if ratio_peak else "-",
                      f"{predicted / 2**20:.0f} MiB" if predicted else "-", f"{row['step_seconds']:.2f}",
                      f"{row['samples_per_second']:.1f}")
    Console().print(table)
    for bits in ("8bit", "4bit"):
        row = summary.get(f"tuneqdm-{bits}")
        if row and full:
            verdict = row["grad_and_optimizer_reduction"] >= 100 and row["peak_vs_full"] <= 0.5
            print(f"TuneQDM {bits}: grad+optimizer {row['grad_and_optimizer_reduction']:.0f}x smaller (target >= "
                  f"100x), peak {row['peak_vs_full']:.2f}x of full (target <= 0.5x): {'OK' if verdict else 'MISSED'}")
    first = next(iter(rows.values()))
    result = {"model": args.model, "batch": args.batch, "steps": args.steps, "device": first["device"],
              "memory_method": first["memory_method"],
              "runs": summary}
    write_text(args.json, json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
