"""Hold pase's cost model against the GPUs of this machine, in one command and under 8 minutes.

It runs what a user runs, as a user runs it (the ``pase`` CLI in subprocesses):
1. ``pase hw probe`` (the cluster NVML sees; the NVML answers are recorded too, a fixture for the probe tests);
2. ``pase hw calibrate`` on SD-1.5's layer shapes at two batches (compute per layer kind, memory bandwidth,
   NCCL collectives when there are 2+ GPUs), so per-kind efficiency is seen at two amounts of work;
3. for unet-tiny, ddpm-cifar10 and sd15-unet at a few per-GPU batches: ``pase plan`` on the probed cluster
   (catalog rates) and with the calibration profile, then ``pase verify`` of that plan (``torchrun`` over
   every GPU), so each case has a measured step beside two predictions;
4. ``tools/bench_kernels.py``: single kernels across sizes (launch floor, GEMM, conv, attention, norms, AdamW,
   the UNet's inference forward eager and from a CUDA graph);
5. ``tools/bench_step_overhead.py`` on sd15-unet: the step phase by phase, plain eager against the runtime;
6. one JSON and one PNG report.

``--dry`` runs the same pipeline on CPU (gloo, fp32, small models and batches, unet-tiny's layers for the
calibration): it proves the script end to end where there is no GPU; its numbers say nothing about GPUs.
Every step has a timeout and a failed step is recorded and skipped, so one report always comes out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# In the order they run: the budget cuts the last ones, so the real-size UNet comes first.
GPU_CASES: list[tuple[str, list[int]]] = [("sd15-unet", [4, 16]), ("ddpm-cifar10", [32, 128]), ("unet-tiny", [8, 64]),
                                         ("sd15-unet", [1])]
DRY_CASES: list[tuple[str, list[int]]] = [("unet-tiny", [2, 8]), ("ddpm-cifar10", [2])]
GPU_CALIBRATION = ("sd15-unet", [1, 8])
DRY_CALIBRATION = ("unet-tiny", [2])


@dataclass
class Case:
    model: str
    batch_per_gpu: int
    gpus: int
    precision: str
    predicted_catalog_s: float | None = None
    predicted_calibrated_s: float | None = None
    measured_s: float | None = None
    predicted_memory_bytes: float | None = None
    measured_memory_bytes: float | None = None
    layers_as_planned: str | None = None
    # `pase verify --per-layer`, a separate short run (its hooks slow the step): per layer kind, the layers timed
    # and measured against predicted seconds per step
    per_layer_kind: dict[str, dict[str, float]] | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.model} b{self.batch_per_gpu}x{self.gpus}"


class Runner:
    """Runs ``pase`` commands with a deadline; every command and its outcome goes to the log."""

    def __init__(self, out: Path, deadline: float) -> None:
        self.out, self.deadline = out, deadline
        self.log = (out / "commands.log").open("w")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def pase(self, *args: str, nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess[str] | str:
        """The CLI as users run it (under torchrun for several processes); a string says why it did not run."""
        prefix = [sys.executable, "-m", "pase.cli"]
        if nproc > 1:
            prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                      "-m", "pase.cli"]
        return self.command([*prefix, *args], " ".join(args), timeout, least=10)

    def command(self, command: list[str], label: str, timeout: float, least: float
                ) -> subprocess.CompletedProcess[str] | str:
        """Run ``command`` within the budget (not at all when under ``least`` seconds are left), logged."""
        timeout = min(timeout, self.left())
        if timeout < least:
            return "skipped: the report's time budget is spent"
        started = time.monotonic()
        self.log.write(f"$ {' '.join(command)}\n")
        self.log.flush()
        print(f"[gpu_validate] {label[:110]}", flush=True)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160"})
        except subprocess.TimeoutExpired:
            self.log.write(f"timed out after {timeout:.0f} s\n\n")
            return f"timed out after {timeout:.0f} s: {label}"
        self.log.write(f"{done.stdout[-6000:]}{done.stderr[-6000:]}\nrc {done.returncode} in "
                       f"{time.monotonic() - started:.1f} s\n\n")
        self.log.flush()
        return done


def _failure(done: subprocess.CompletedProcess[str] | str, what: str) -> str | None:
    if isinstance(done, str):
        return f"{what}: {done}"
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        return f"{what}: exit {done.returncode}: {lines[-1][:300] if lines else 'no output'}"
    return None


def machine_facts(dry: bool) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                             "torch": torch.__version__, "cuda": torch.version.cuda, "dry": dry}
    if torch.cuda.is_available():
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        props = torch.cuda.get_device_properties(0)
        facts["sm_count"], facts["memory_bytes"] = props.multi_processor_count, props.total_memory
    try:
        import pynvml

        pynvml.nvmlInit()
        facts["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - no NVML is a fact to record, not a failure
        facts["driver"] = f"no NVML ({type(exc).__name__})"
    return facts


def calibrate(run: Runner, gpus: int, dry: bool) -> tuple[dict[str, Any], list[str]]:
    """One calibration profile per batch of the calibration model; the first is the one plans price with."""
    model, batches = DRY_CALIBRATION if dry else GPU_CALIBRATION
    profiles, errors = {}, []
    for batch in batches:
        path = run.out / f"calibration_b{batch}.json"
        args = ["hw", "calibrate", "--nproc", str(max(gpus, 2) if dry else gpus), "--model", model,
                "--batch", str(batch), "--iterations", "5", "--out", str(path)]
        if dry:
            args += ["--backend", "gloo", "--sizes", "4K,1M"]
        failed = _failure(run.pase(*args, timeout=200), f"calibrate {model} b{batch}")
        if failed:
            errors.append(failed)
        else:
            profiles[str(batch)] = json.loads(path.read_text())
    return profiles, errors


def run_case(run: Runner, case: Case, cluster: str, profile: Path | None, dry: bool) -> None:
    plan = run.out / f"plan_{case.model}_b{case.batch_per_gpu}.json"
    common = ["--model", case.model, "--cluster", cluster, "--batch", str(case.batch_per_gpu * case.gpus),
              "--precision", case.precision]
    if dry:
        common += ["--devices", str(case.gpus)]
    failed = _failure(run.pase("plan", *common, "--json", str(plan), timeout=180), "plan")
    if failed:
        case.errors.append(failed)
        return
    planned = json.loads(plan.read_text())
    case.predicted_catalog_s = planned["predicted"]["step_seconds"]
    case.predicted_memory_bytes = planned["predicted"]["memory_bytes_per_device"]
    if profile is not None:
        calibrated = run.out / f"plan_{case.model}_b{case.batch_per_gpu}_calibrated.json"
        failed = _failure(run.pase("plan", *common, "--profile", str(profile), "--json", str(calibrated),
                                   timeout=180), "plan --profile")
        if failed:
            case.errors.append(failed)
        else:
            case.predicted_calibrated_s = json.loads(calibrated.read_text())["predicted"]["step_seconds"]
    steps = "4" if dry else "12"
    done = run.pase("verify", "--plan", str(plan), "--steps", steps, "--warmup", "2" if dry else "4", "--json",
                    nproc=case.gpus, timeout=240)
    failed = _failure(done, "verify")
    if failed:
        case.errors.append(failed)
        return
    assert not isinstance(done, str)
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    case.measured_s = summary["measured_step_seconds"]
    case.measured_memory_bytes = summary["measured_memory_bytes"]
    case.layers_as_planned = f"{summary.get('layers_as_planned')}/{summary.get('layers_total')}"
    timed = run.pase("verify", "--plan", str(plan), "--steps", "3" if dry else "6", "--warmup", "1" if dry else "2",
                     "--per-layer", "--json", nproc=case.gpus, timeout=240)
    failed = _failure(timed, "verify --per-layer")
    if failed:
        case.errors.append(failed)
        return
    assert not isinstance(timed, str)
    last = [line for line in timed.stdout.splitlines() if line.startswith("{")][-1]
    case.per_layer_kind = json.loads(last)["per_kind"]


def step_overhead(run: Runner, dry: bool, precision: str) -> tuple[list[dict[str, Any]], str | None]:
    """``tools/bench_step_overhead.py`` on one model: the step phase by phase, eager against ``pase.parallelize``
    (what the runtime adds, and whether the host CPU bounds the step)."""
    model, batches = ("unet-tiny", ["2"]) if dry else ("sd15-unet", ["4"])
    out = run.out / "step_overhead.json"
    command = [sys.executable, str(Path(__file__).with_name("bench_step_overhead.py")), "--model", model,
               "--batch", *batches, "--precision", precision, "--steps", "4" if dry else "8", "--json", str(out)]
    failed = _failure(run.command(command, f"step overhead: {model} batch {batches[0]}", 150, least=30),
                      "step overhead")
    return ([], failed) if failed else (json.loads(out.read_text()), None)


def kernel_sweep(run: Runner, dry: bool) -> tuple[dict[str, Any], str | None]:
    """``tools/bench_kernels.py``: single kernels across sizes (launch floor, GEMM, conv, attention, GroupNorm,
    AdamW, the whole UNet's inference forward), the data a work-dependent compute model is fitted against."""
    out = run.out / "kernels.json"
    command = [sys.executable, str(Path(__file__).with_name("bench_kernels.py")), "--json", str(out),
               "--budget", "30" if dry else "100", *(["--dry"] if dry else [])]
    failed = _failure(run.command(command, "kernel sweep", 60 if dry else 150, least=20), "kernel sweep")
    return ({}, failed) if failed else (json.loads(out.read_text()), None)


def per_kind_rates(profiles: dict[str, Any], cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured rate per layer kind and calibration batch, as a share of the catalog's peak, beside the
    catalog's constant efficiency for that kind (what the uncalibrated plan prices with)."""
    from cost_models.catalog import Catalog

    gpu = Catalog.load().gpu(cluster["gpu"])
    efficiency = cluster.get("efficiency", {})
    rows = []
    for batch, profile in profiles.items():
        precision = profile.get("precision", "bf16")
        peak = {"bf16": gpu.bf16_tflops, "fp16": gpu.fp16_tflops}.get(precision, gpu.fp32_tflops) * 1e12
        for kind, entry in profile["compute"].items():
            if "flops_per_second" in entry:
                rate, share = entry["flops_per_second"], entry["flops_per_second"] / peak
                catalog = efficiency.get(kind)
                if catalog is not None:
                    catalog *= gpu.efficiency_scale(precision)  # as cost_models.rates prices the kind
            else:
                rate, share = entry["bytes_per_second"], entry["bytes_per_second"] / (gpu.memory_bw_gbps * 1e9)
                catalog = efficiency.get("memory_bound")
            rows.append({"batch": int(batch), "kind": kind, "rate": rate, "share_of_peak": share,
                         "catalog_efficiency": catalog, "unit": "FLOP/s" if "flops_per_second" in entry else "B/s"})
    return rows


def write_png(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cases = [c for c in report["cases"] if c["measured_s"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5))
    names = [f"{c['model']}\nb{c['batch_per_gpu']}x{c['gpus']}" for c in cases]
    x = np.arange(len(cases))
    for offset, key, label in ((-0.27, "measured_s", "measured"), (0.0, "predicted_catalog_s", "predicted (catalog)"),
                               (0.27, "predicted_calibrated_s", "predicted (calibrated)")):
        left.bar(x + offset, [1e3 * (c[key] or 0) for c in cases], width=0.27, label=label)
    left.set_yscale("log")
    left.set_xticks(x, names, fontsize=8)
    left.set_ylabel("step ms (log)")
    left.set_title(f"step time on {report['machine'].get('gpus', ['CPU'])[0]} x{report['gpus']}")
    left.legend()
    rows = report["per_kind"]
    kinds = sorted({r["kind"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    x = np.arange(len(kinds))
    width = 0.8 / (len(batches) + 1)
    for i, batch in enumerate(batches):
        by_kind = {r["kind"]: r["share_of_peak"] for r in rows if r["batch"] == batch}
        right.bar(x + i * width, [by_kind.get(k, 0) for k in kinds], width=width, label=f"measured, batch {batch}")
    catalog = {r["kind"]: r["catalog_efficiency"] or 0 for r in rows}
    right.bar(x + len(batches) * width, [catalog[k] for k in kinds], width=width, label="catalog constant",
              color="grey")
    right.set_xticks(x + width * len(batches) / 2, kinds, fontsize=8)
    right.set_ylabel("share of peak (FLOP/s or memory bandwidth)")
    right.set_title(f"per layer kind, {report['calibration_model']} layer shapes")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, gloo, small models: the pipeline, not the numbers")
    parser.add_argument("--out", type=Path, default=Path("gpu_validate_out"))
    parser.add_argument("--budget", type=float, default=450, help="Seconds for the whole run (default 450)")
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args(argv)
    import torch

    started = time.monotonic()
    if not args.dry and not torch.cuda.is_available():
        print("[gpu_validate] no CUDA GPU here; run with --dry to check the pipeline on CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    run = Runner(args.out, started + args.budget)
    gpus = 2 if args.dry else torch.cuda.device_count()
    precision = "fp32" if args.dry else args.precision
    errors: list[str] = []
    if args.dry:  # this CPU's processes as the cluster (shares of peak then read against an H100: wiring only)
        cluster_path, cluster = "local", {"gpu": "H100-SXM", "efficiency": {}}
    else:
        path = args.out / "cluster.json"
        failed = _failure(run.pase("hw", "probe", "--save", str(path), "--record", str(args.out / "nvml.json"),
                                   timeout=60), "probe")
        if failed:  # the catalog's cluster of this many GPUs of the kind torch names
            errors.append(failed)
            cluster_path, cluster = f"{gpus}xH100-SXM", {"gpu": "H100-SXM", "efficiency": {}}
        else:
            cluster_path, cluster = str(path), json.loads(path.read_text())
    if not cluster.get("efficiency"):
        from cost_models.catalog import Catalog

        cluster["efficiency"] = Catalog.load().efficiency
    profiles, failed_calibrations = calibrate(run, gpus, args.dry)
    errors += failed_calibrations
    profile = args.out / f"calibration_b{next(iter(profiles))}.json" if profiles else None
    kernels, failed = kernel_sweep(run, args.dry)
    errors += [failed] if failed else []
    cases = []
    for model, batches in DRY_CASES if args.dry else GPU_CASES:
        for batch in batches:
            case = Case(model, batch, gpus, precision)
            run_case(run, case, cluster_path, profile, args.dry)
            cases.append(case)
            print(f"[gpu_validate] {case.name}: measured {case.measured_s}, predicted {case.predicted_catalog_s} "
                  f"(calibrated {case.predicted_calibrated_s}) {'; '.join(case.errors)}", flush=True)
    overhead, failed = step_overhead(run, args.dry, precision)
    errors += [failed] if failed else []
    report = {"machine": machine_facts(args.dry), "gpus": gpus, "precision": precision, "cluster": cluster_path,
              "step_overhead": overhead, "kernels": kernels.get("rows", []),
              "calibration_model": (DRY_CALIBRATION if args.dry else GPU_CALIBRATION)[0],
              "per_kind": per_kind_rates(profiles, cluster) if profiles else [],
              "cases": [{**asdict(c), "ratio_catalog": _ratio(c.measured_s, c.predicted_catalog_s),
                         "ratio_calibrated": _ratio(c.measured_s, c.predicted_calibrated_s)} for c in cases],
              "errors": errors + [f"{c.name}: {e}" for c in cases for e in c.errors],
              "seconds": round(time.monotonic() - started, 1)}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    write_png(report, args.out / "report.png")
    print_table(report)
    print(f"[gpu_validate] wrote {args.out / 'report.json'} and report.png in {report['seconds']} s; "
          f"{len(report['errors'])} step(s) failed")
    return 1 if report["errors"] else 0


def _ratio(measured: float | None, predicted: float | None) -> float | None:
    return measured / predicted if measured and predicted else None


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"measured / predicted on {report['gpus']} x {report['machine'].get('gpus', ['CPU'])[0]}")
    for column in ("case", "measured ms", "catalog ms", "x", "calibrated ms", "x", "memory GiB meas/pred",
                   "layers as planned"):
        table.add_column(column, justify="right")
    for c in report["cases"]:
        def ms(value: float | None) -> str:
            return f"{value * 1e3:.2f}" if value else "-"

        def ratio(value: float | None) -> str:
            return f"{value:.2f}" if value else "-"

        memory = (f"{c['measured_memory_bytes'] / 2**30:.2f}/{c['predicted_memory_bytes'] / 2**30:.2f}"
                  if c["measured_memory_bytes"] and c["predicted_memory_bytes"] else "-")
        table.add_row(f"{c['model']} b{c['batch_per_gpu']}x{c['gpus']}", ms(c["measured_s"]),
                      ms(c["predicted_catalog_s"]), ratio(c["ratio_catalog"]), ms(c["predicted_calibrated_s"]),
                      ratio(c["ratio_calibrated"]), memory, c["layers_as_planned"] or "-")
    Console(width=160).print(table)
    for error in report["errors"]:
        print(f"[gpu_validate] failed: {error}")


if __name__ == "__main__":
    sys.exit(main())
