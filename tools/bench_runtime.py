"""Benchmark: the runtime on 2 gloo processes with unet-tiny, predicted against measured.

    PYTHONPATH=. .venv/bin/python tools/bench_runtime.py [--steps 8] [--profile FILE]
        [--json bench_results/runtime.json]

Plans come from `pase plan --cluster local --devices 2` priced by a CPU calibration profile (the
saved one for this machine, or --profile). Rows: a pure data-parallel plan (`--only dp`, run as
DDP by `pase.parallelize`) against a hand-written DDP loop on the same model, batch and synthetic
data (target ratio <= 1.05); a channel/head-split plan (`--only tensor`); a 2-stage pipeline plan
(`--only pipeline`, its schedule run by `pase verify`). Every row times `pase verify`'s synthetic
steps (median after warm-up, slowest rank). Each run is a fresh `torchrun`; the DDP pair runs twice
alternating and keeps each one's best median (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLAIN_DDP = """
import statistics, sys, time, torch, torch.distributed as dist, torch.nn.functional as F
from pase.models.zoo import ZOO
from pase.planning.plan import Plan
from pase.train.verify import synthetic_inputs
plan = Plan.load(sys.argv[1]); steps, warmup = int(sys.argv[2]), 2
dist.init_process_group("gloo"); rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0); model = torch.nn.parallel.DistributedDataParallel(ZOO[plan.model].build())
opt = torch.optim.AdamW(model.parameters(), lr=1e-4); gen = torch.Generator().manual_seed(1 + rank); times = []
for _ in range(steps):
    target, args, kwargs = synthetic_inputs(plan, plan.batch // world, torch.device("cpu"), gen)
    start = time.perf_counter(); out = model(*args, **kwargs); loss = F.mse_loss(out.sample, target)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); times.append(time.perf_counter() - start)
mine = torch.tensor([statistics.median(times[warmup:])], dtype=torch.float64)
dist.all_reduce(mine, op=dist.ReduceOp.MAX)
if rank == 0: print(float(mine))
del model, opt; import gc; gc.collect(); dist.barrier(); dist.destroy_process_group()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> str:
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout.strip().splitlines()[-1]


def plan(only: str, out: Path, batch: int, profile: str | None) -> dict:
    command = [sys.executable, "-m", "pase", "plan", "--model", "unet-tiny", "--cluster", "local", "--devices", "2",
               "--batch", str(batch), "--only", only, "--json", str(out), *(["--profile", profile] if profile else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(out.read_text())


def verify(plan_path: Path, steps: int) -> dict:
    return json.loads(torchrun("-m", "pase", "verify", "--plan", str(plan_path), "--steps", str(steps), "--json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--json", type=Path, default=REPO / "bench_results" / "runtime.json")
    options = parser.parse_args()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {only: Path(tmp) / f"{only}.json" for only in ("dp", "tensor", "pipeline")}
        plans = {only: plan(only, path, options.batch, options.profile) for only, path in paths.items()}
        script = Path(tmp) / "plain_ddp.py"
        script.write_text(PLAIN_DDP)
        dp_runs, ddp_runs = [], []
        for _ in range(2):
            dp_runs.append(verify(paths["dp"], options.steps))
            ddp_runs.append(float(torchrun(str(script), str(paths["dp"]), str(options.steps))))
        best = min(dp_runs, key=lambda r: r["measured_step_seconds"])
        plain = min(ddp_runs)
        rows["dp plan (pase.parallelize -> DDP)"] = {**best, "plain_ddp_step_seconds": plain,
                                                    "vs_plain_ddp": best["measured_step_seconds"] / plain}
        rows["tensor plan (channel/head splits)"] = verify(paths["tensor"], options.steps)
        pipe = plans["pipeline"]
        rows[f"pipeline plan ({len(pipe['stages'])} stages, {pipe['schedule']}, {pipe['microbatches']} mb)"] = {
            **verify(paths["pipeline"], options.steps), "stages": len(pipe["stages"]),
            "microbatches": pipe["microbatches"], "schedule": pipe["schedule"]}
    for name, row in rows.items():
        measured = row["measured_step_seconds"]
        extra = f"  vs plain DDP {row['vs_plain_ddp']:.3f} (plain {row['plain_ddp_step_seconds']:.3f} s)" \
            if "vs_plain_ddp" in row else ""
        memory = f"  memory {row['measured_memory_bytes'] / 2**20:.0f} MiB (predicted " \
            f"{row['predicted_memory_bytes'] / 2**20:.0f})"
        print(f"{name:42s} predicted {row['predicted_step_seconds']:.3f} s  measured "
              + (f"{measured:.3f} s  ratio {row['ratio']:.2f}" if measured else "n/a") + memory + extra)
    options.json.parent.mkdir(parents=True, exist_ok=True)
    from pase import atomic

    atomic.write_text(options.json, json.dumps({"model": "unet-tiny", "processes": 2, "batch": options.batch,
                                                "steps": options.steps, "rows": rows}, indent=1))
    print(f"wrote {options.json}")


if __name__ == "__main__":
    main()
