"""Benchmark: the runtime on 2 and 4 gloo processes with unet-tiny, predicted against measured.

    PYTHONPATH=. .venv/bin/python tools/bench_runtime.py [--worlds 2,4]
        [--kinds dp,fsdp,tensor,tensor+fsdp,grid,seq,spatial,outspatial,replicated,replicasplit,pipeline]
        [--steps 8] [--batch 8] [--profile FILE]
        [--json bench_results/runtime.json]

Plans come from `pase plan --cluster local --devices N --only KIND` (`tensor+fsdp`: with `--fsdp`; `grid`:
`--only tensor` with every conv and linear of 64+ channels forced onto a 2 x 2 output x input grid, 4+ ranks;
`seq`: every attention forced to split its queries 2 ways; `spatial`: every convolution and group norm of 32+
rows that runs split by rows forced to split 2 ways by height (an attention's norm by its positions);
`outspatial`: every convolution that runs so split 2 ways by output channels and 2 by rows (4+ ranks, with
`--min-chunk out_channel:16,spatial:8`: unet-tiny is narrow); `replicated`: every conv, linear, group norm and
attention forced onto replica groups of 2 ranks (unsplit on 2); `replicasplit`: every conv and linear with even
output channels split 2 ways by them on replica groups of 2 (`out/2+replicas/2`, the batch unsplit, 4 ranks);
priced by the CPU calibration profile of this machine, or --profile), as users make them. Each row
runs `pase verify --check` under a fresh `torchrun`: one checked step against a single process (max
relative error, layers as planned), the communication bytes per rank per step counted at the torch.distributed calls
against those the plan priced, and the step time (median after warm-up, slowest rank). The pure
data-parallel plan is also timed against a hand-written DDP loop on the same model, batch and
synthetic data (target: within 5%); the pair runs twice, alternating, keeping each one's best
median (the machine is shared).
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


def torchrun(world: int, *args: str) -> str:
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(world), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=_env(), cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError((done.stderr or done.stdout)[-2000:])
    return done.stdout.strip().splitlines()[-1]


def forces(kind: str, world: int, batch: int) -> list[str]:
    """``--force`` options for the kinds the search never picks on this CPU: "grid" puts every conv and linear of
    unet-tiny wide enough on a 2 x 2 grid of output x input channels, "seq" splits every attention's queries 2
    ways, "spatial" every convolution and group norm of 32+ rows that the runtime splits by rows 2 ways by its
    first spatial axis (the batch over the other ranks)."""
    from pase.graph import extract_model
    from strategies.runnable import runnable_reason

    options = []
    for layer_id, data in extract_model("unet-tiny", batch, use_cache=True).layers():
        dims = {role: d for d, role in data["roles"].items()}
        spatial = [d for d, role in data["roles"].items() if role == "spatial"]
        if kind == "grid" and data["op"] in ("conv", "linear") and \
                all(data["dims"][dims[r]] >= 64 for r in ("out_channel", "reduction")):
            options += ["--force", f"{layer_id}={dims['batch']}:{world // 4},{dims['out_channel']}:2,"
                                   f"{dims['reduction']}:2"]
        if kind == "seq" and data["op"] == "attention":
            options += ["--force", f"{layer_id}={dims['batch']}:{world // 2},q:2"]
        if kind == "outspatial" and data["op"] == "conv" and spatial and data["dims"][dims["out_channel"]] % 2 == 0:
            splits = {dims["batch"]: world // 4, dims["out_channel"]: 2, spatial[data["index"] % len(spatial)]: 2}
            if runnable_reason(data, splits, world) is None:
                options += ["--force", f"{layer_id}=" + ",".join(f"{d}:{f}" for d, f in splits.items())]
        if kind == "replicasplit" and data["op"] in ("conv", "linear") and \
                data["dims"][dims["out_channel"]] % 2 == 0:  # out/2 + replicas/2: b x f = world / 2
            splits = {dims["batch"]: world // 4, dims["out_channel"]: 2}
            if runnable_reason(data, splits, world) is None:
                options += ["--force", f"{layer_id}=" + ",".join(f"{d}:{f}" for d, f in splits.items())]
        if kind == "replicated" and "batch" in dims and \
                runnable_reason(data, {dims["batch"]: world // 2}, world) is None:  # groups of 2 replicas
            options += ["--force", f"{layer_id}={dims['batch']}:{world // 2}"]
        if kind == "spatial" and spatial and data["dims"][spatial[0]] >= 32 and \
                runnable_reason(data, {spatial[0]: 2, dims["batch"]: world // 2}, world) is None:
            options += ["--force", f"{layer_id}={dims['batch']}:{world // 2},{spatial[0]}:2"]
    return options


def plan(kind: str, world: int, out: Path, batch: int, profile: str | None) -> dict:
    """``kind`` is an ``--only`` value, with "+fsdp" for ``--fsdp`` too (tensor+fsdp: FSDP over the splits), or
    "grid" (``--only tensor`` with ``forces``) or "seq" (the default space with ``forces``)."""
    only, *extras = kind.split("+")
    forced = forces(only, world, batch)
    restrict = {"grid": ["--only", "tensor"], "seq": [], "spatial": [], "replicated": [],
                "replicasplit": ["--min-chunk", "out_channel:16"],
                "outspatial": ["--min-chunk", "out_channel:16,spatial:8"]}.get(only, ["--only", only])
    command = [sys.executable, "-m", "pase", "plan", "--model", "unet-tiny", "--cluster", "local", "--devices",
               str(world), "--batch", str(batch), *restrict, "--json", str(out),
               *(["--fsdp"] if "fsdp" in extras else []), *(["--profile", profile] if profile else []), *forced]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=_env(), cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError((done.stderr or done.stdout)[-2000:])
    return json.loads(out.read_text())


def verify(world: int, plan_path: Path, steps: int) -> dict:
    return json.loads(torchrun(world, "-m", "pase", "verify", "--plan", str(plan_path), "--steps", str(steps),
                               "--check", "--json"))


def describe(kind: str, data: dict) -> str:
    if data.get("stages"):
        return f"{kind} ({len(data['stages'])} stages, {data['schedule']}, {data['microbatches']} mb)"
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--kinds", default="dp,fsdp,tensor,tensor+fsdp,grid,seq,spatial,outspatial,replicated,"
                        "replicasplit,pipeline")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--json", type=Path, default=REPO / "bench_results" / "runtime.json")
    options = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "plain_ddp.py"
        script.write_text(PLAIN_DDP)
        for world in map(int, options.worlds.split(",")):
            for kind in options.kinds.split(","):
                if kind.startswith(("grid", "outspatial", "replicasplit")) and world % 4:
                    continue  # a 2 x 2 grid (or 2 parts x 2 replicas) needs 4 ranks
                path = Path(tmp) / f"{kind}-{world}.json"
                data = plan(kind, world, path, options.batch, options.profile)
                row = {"kind": describe(kind, data), "processes": world, **verify(world, path, options.steps)}
                if kind == "dp":  # the same plan against a hand-written DDP loop, alternating, best of two each
                    again = verify(world, path, options.steps)
                    plain = min(float(torchrun(world, str(script), str(path), str(options.steps))) for _ in range(2))
                    row["measured_step_seconds"] = min(row["measured_step_seconds"], again["measured_step_seconds"])
                    row.update(plain_ddp_step_seconds=plain, vs_plain_ddp=row["measured_step_seconds"] / plain)
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = Table(title=f"unet-tiny, global batch {options.batch}, gloo on CPU ({options.steps} steps)")
    for column in ("plan", "procs", "max rel error", "layers as planned", "comm MiB measured", "comm MiB predicted",
                   "measured / predicted", "step s", "vs hand DDP"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for row in rows:
        measured, predicted = row.get("comm_bytes_measured"), row.get("comm_bytes_predicted")
        table.add_row(row["kind"], str(row["processes"]), f"{row.get('max_rel_error', float('nan')):.1e}",
                      f"{row.get('layers_as_planned')}/{row.get('layers_total')}",
                      f"{measured / 2**20:.2f}" if measured is not None else "n/a",
                      f"{predicted / 2**20:.2f}" if predicted else "n/a",
                      f"{measured / predicted:.3f}" if measured is not None and predicted else "n/a",
                      f"{row['measured_step_seconds']:.3f}",
                      f"{row['vs_plain_ddp']:.3f}" if "vs_plain_ddp" in row else "")
    Console(width=160).print(table)
    options.json.parent.mkdir(parents=True, exist_ok=True)
    from pase import atomic

    atomic.write_text(options.json, json.dumps({"model": "unet-tiny", "batch": options.batch, "steps": options.steps,
                                                "rows": rows}, indent=1))
    print(f"wrote {options.json}")


if __name__ == "__main__":
    main()
