"""What the pase runtime adds to a training step: the same model, batch and AdamW step, plain eager against
``pase.parallelize`` with a one-device plan (which runs every layer replicated), phase by phase.

    PYTHONPATH=. python tools/bench_step_overhead.py --model sd15-unet --batch 4 16 [--json F]

Per batch it prints forward, backward and optimizer seconds (synchronised between phases), the whole step
without those synchronisations, the parameter tensors the optimizer sees (DTensor or plain) and, for the pase
step, the operators with the most CPU time (torch.profiler). On a GPU a step whose time does not grow with the
batch is bound by the CPU, which is what this looks for.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    """The plan's precision as the runtime runs it: autocast on GPUs, fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                          enabled=device.type == "cuda" and precision != "fp32")


def time_steps(model: torch.nn.Module, inputs: tuple[Any, ...], target: torch.Tensor, device: torch.device,
               precision: str, steps: int, warmup: int) -> dict[str, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = _autocast(device, precision)
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}

    def one(split: bool) -> dict[str, float]:
        marks = [time.perf_counter()]
        with autocast:
            out = model(*inputs)
            loss = F.mse_loss(getattr(out, "sample", out).float(), target)
        if split:
            _sync(device)
            marks.append(time.perf_counter())
        loss.backward()
        if split:
            _sync(device)
            marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        marks.append(time.perf_counter())
        if split:
            return dict(zip(("forward", "backward", "optimizer"), (b - a for a, b in zip(marks, marks[1:]))))
        return {"step": marks[-1] - marks[0]}

    for _ in range(warmup):
        one(False)
    for i in range(steps):
        for key, value in one(split=i % 2 == 0).items():
            phases[key].append(value)
    params = list(model.parameters())
    dtensors = sum(type(p).__name__ == "DTensor" for p in params)
    return {**{key: statistics.median(values) for key, values in phases.items() if values},
            "parameter_tensors": len(params), "dtensor_parameters": dtensors}


def profile_step(model: torch.nn.Module, inputs: tuple[Any, ...], target: torch.Tensor, device: torch.device,
                 precision: str, top: int = 15) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = _autocast(device, precision)
    def step() -> None:
        with autocast:
            out = model(*inputs)
            F.mse_loss(getattr(out, "sample", out).float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)

    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet-tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import subprocess
    import sys
    import tempfile

    import pase
    from pase.planning.plan import Plan
    from pase.train.verify import plan_spec, synthetic_inputs

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cluster = "1xH200-SXM"  # one device: every layer replicated, whatever the device (the prediction is an H200's)
    results = []
    for batch in args.batch:
        with tempfile.TemporaryDirectory() as tmp:  # the plan as users make it
            subprocess.run([sys.executable, "-m", "pase.cli", "plan", "--model", args.model, "--cluster", cluster,
                            "--batch", str(batch), "--precision", args.precision, "--json", f"{tmp}/plan.json"],
                           check=True, capture_output=True)
            plan = Plan.load(f"{tmp}/plan.json")
        spec = plan_spec(plan)
        generator = torch.Generator().manual_seed(0)
        target, inputs, kwargs = synthetic_inputs(plan, batch, device, generator, spec)
        assert not kwargs, "conditioning travels as positional inputs here"
        torch.manual_seed(0)
        plain = spec.build().to(device)
        eager = time_steps(plain, inputs, target, device, args.precision, args.steps, args.warmup)
        del plain
        with pase.distributed(plan) as run:
            torch.manual_seed(0)
            parallel = run.parallelize(spec.build())
            ran = time_steps(parallel, inputs, target, device, args.precision, args.steps, args.warmup)
            hot = profile_step(parallel, inputs, target, device, args.precision)
            del parallel
        row = {"model": args.model, "batch": batch, "device": str(device), "eager": eager, "pase": ran,
               "pase_over_eager": ran["step"] / eager["step"], "predicted_step": plan.predicted.step_seconds,
               "pase_cpu_hot_ops": hot}
        results.append(row)
        print(f"{args.model} batch {batch} on {device}: eager step {eager['step'] * 1e3:.1f} ms "
              f"(fwd {eager['forward'] * 1e3:.1f}, bwd {eager['backward'] * 1e3:.1f}, "
              f"opt {eager['optimizer'] * 1e3:.1f}; {eager['parameter_tensors']} tensors) | pase step "
              f"{ran['step'] * 1e3:.1f} ms (fwd {ran['forward'] * 1e3:.1f}, bwd {ran['backward'] * 1e3:.1f}, "
              f"opt {ran['optimizer'] * 1e3:.1f}; {ran['dtensor_parameters']}/{ran['parameter_tensors']} DTensor) "
              f"= {row['pase_over_eager']:.2f}x eager; predicted {plan.predicted.step_seconds * 1e3:.1f} ms",
              flush=True)
        for entry in hot[:10]:
            print(f"    {entry['self_cpu_ms']:9.2f} ms  {entry['calls']:6d}x  {entry['op'][:90]}")
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
