"""``pase sample`` (run a sampler, on one process or under torchrun) and ``pase sample-plan``
(predict every sampler's latency and throughput and pick one)."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pase.cli.console import MAX_SEED, check_precision, check_writable, console, err_console, finite, write_output
from pase.errors import PaseError

Model = Annotated[str, typer.Option("--model", "-m", help="Zoo model (see `pase models`); for `pase sample` also a "
                                    "diffusers text-to-image pipeline folder, with --prompt.")]
Scheduler = Annotated[str, typer.Option(help="ddpm (noise drawn up front) or ddim (eta = 0).")]
Steps = Annotated[int, typer.Option(help="Sampling steps N.")]
Size = Annotated[int | None, typer.Option(help="Spatial size of the samples (default: the model's).")]
MAX_LOCAL_PROCESSES = 256  # sampling processes on one machine: more is a typo, not a plan
Threads = Annotated[int, typer.Option(help="torch threads per process. 1 by default: more threads than free cores "
                                          "makes CPU runs many times slower on a shared box.")]
Guidance = Annotated[float, typer.Option(help="Classifier-free guidance scale (text-conditioned models; "
                                               "pairs stay on one device).", callback=finite)]


def sample_command(
    model: Model = "unet-tiny",
    sampler: Annotated[str, typer.Option(help="sequential, paradigms, srds or batch (each rank samples its "
                                         "share of --samples).")] = "paradigms",
    scheduler: Scheduler = "ddpm",
    steps: Steps = 100,
    window: Annotated[int, typer.Option(help="ParaDiGMS window: steps evaluated per pass.")] = 16,
    tol: Annotated[float | None, typer.Option(help="Tolerance: ParaDiGMS relative to the noise scale (default "
                                              "0.1); SRDS relative change of the output (default 0.01).",
                                              callback=finite)] = None,
    blocks: Annotated[int | None, typer.Option(help="SRDS blocks, must divide --steps (default ~sqrt(N)).")] = None,
    pipelined: Annotated[bool, typer.Option(help="SRDS: start a block's fine solve as soon as its input is "
                                            "ready.")] = False,
    samples: Annotated[int, typer.Option(help="Samples to draw.")] = 1,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED,
                                      help="Seed of the weights, x_T and the noise (same on every rank).")] = 0,
    size: Size = None,
    guidance_scale: Guidance = 1.0,
    clip_sample: Annotated[bool, typer.Option(help="Clamp predicted x0 to [-1, 1] (chaotic on random "
                                              "weights with DDIM).")] = False,
    threads: Threads = 1,
    check: Annotated[bool, typer.Option(help="Also run sequential sampling and report the relative error.")]
    = False,
    prompt: Annotated[str | None, typer.Option(help="A pipeline folder: what to draw (its text encoder encodes "
                                               "it, its VAE decodes the result).")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="A pipeline folder under --guidance-scale: what to "
                                                        "steer away from (default: the empty prompt).")] = None,
    out: Annotated[Path | None, typer.Option(help="Save the samples: FILE.png (a pipeline folder: decoded images "
                                             "side by side) or FILE.safetensors (key 'sample').")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line: sampler, passes, evals, seconds, "
                                          "rel_error_vs_sequential.")] = False,
) -> None:
    """Sample with sequential, ParaDiGMS, SRDS or batch-parallel sampling; under torchrun the network
    calls of each pass are split across the ranks."""
    import torch

    from pase.sampling import distributed
    from pase.sampling.runner import SampleConfig, sample, summary

    config = SampleConfig(model, sampler, scheduler, steps, window, tol, blocks, pipelined, samples, seed, size,
                          guidance_scale, clip_sample, check, prompt, negative_prompt)
    config.validate()
    _check_threads(threads)
    if out is not None and out.is_dir():
        raise PaseError(f"--out {out} is a folder; give a file name, e.g. {out / 'samples.safetensors'}")
    check_writable(out, "--out")
    if out is not None and out.suffix.lower() == ".png" and prompt is None:
        raise PaseError("--out FILE.png decodes latents with a pipeline folder's VAE: give the folder as --model and "
                        "a --prompt, or save FILE.safetensors")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(threads)
    with distributed.session():
        rank0 = distributed.is_rank0()
        result, error = _run_with_progress(config, sample, show=rank0 and not as_json)
        if rank0:
            if out is not None and out.suffix.lower() == ".png":
                from pase.sampling.pipeline_folder import save_images

                write_output(out, "--out", lambda path: save_images(model, result.sample, path), announce=False)
            elif out is not None:
                write_output(out, "--out", lambda path: _save(path, result.sample), announce=False)
            _print_result(summary(result, error), result, world, as_json)


def _check_threads(threads: int) -> None:
    if threads < 1:
        raise PaseError(f"--threads must be >= 1, not {threads}")


def _run_with_progress(config, run, show: bool):  # noqa: ANN001, ANN202 - SampleConfig, callable
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    unit = "iterations" if config.sampler == "srds" else "steps"
    with Progress(TextColumn(f"{config.sampler} {{task.completed}}/{{task.total}} {unit}"), BarColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True, disable=not show) as bar:
        task = bar.add_task("sample", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return run(config, progress)


def _save(path: Path, sample) -> None:  # noqa: ANN001 - torch.Tensor
    from safetensors.torch import save

    from pase import atomic

    atomic.write_bytes(path, save({"sample": sample.detach().cpu().contiguous()}))


def _print_result(data: dict, result, world: int, as_json: bool) -> None:  # noqa: ANN001 - SampleResult
    if as_json:
        print(json.dumps(data))
        return
    table = Table(title=f"pase sample: {data['sampler']} on {world} process(es)", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [("passes (sequential network calls)", str(data["passes"])),
            ("evaluations per sample", f"{data['evals']:g}"), ("seconds", f"{data['seconds']:.3f}")]
    if result.iterations is not None:
        rows.append(("SRDS iterations", str(result.iterations)))
    for key in ("window", "blocks", "tol"):
        if key in result.extra:
            rows.append((key, str(result.extra[key])))
    if data["rel_error_vs_sequential"] is not None:
        rows.append(("relative error vs sequential", f"{data['rel_error_vs_sequential']:.3g}"))
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)


def sample_plan_command(
    model: Model = "unet-tiny",
    devices: Annotated[int | None, typer.Option(help="Devices (processes on this machine without --cluster; "
                                                "default: all of the cluster's GPUs, else 2).")] = None,
    cluster: Annotated[str | None, typer.Option(help="Price a GPU cluster spec (e.g. 8xA100-80GB-SXM) with the "
                                                "layer graph's roofline instead of timing this CPU.")] = None,
    steps: Steps = 100,
    scheduler: Scheduler = "ddpm",
    objective: Annotated[str, typer.Option(help="latency (time for --samples) or throughput (samples/s).")]
    = "latency",
    samples: Annotated[int, typer.Option(help="Samples per request.")] = 1,
    size: Size = None,
    guidance_scale: Guidance = 1.0,
    probe: Annotated[bool, typer.Option(help="Measure ParaDiGMS passes and SRDS iterations by running them "
                                        "on the seeded model here (else stated defaults).")] = False,
    tol: Annotated[float | None, typer.Option(help="Tolerance of the probe (ParaDiGMS; SRDS uses a tenth).",
                                              callback=finite)]
    = None,
    passes: Annotated[list[str] | None, typer.Option(
        help="ParaDiGMS passes measured on your checkpoint, as WINDOW=PASSES (repeatable; e.g. 80=44): the "
             "planner prices windows from them instead of the default law.")] = None,
    evaluations: Annotated[list[str] | None, typer.Option(
        help="The network evaluations (sum of the windows' rows) of a run given with --passes, as "
             "WINDOW=EVALUATIONS (e.g. 80=2040): its passes are laid out from both counts, and other windows "
             "from its layout.")] = None,
    srds_iterations: Annotated[list[str] | None, typer.Option(
        help="SRDS iterations measured on your checkpoint, as BLOCKS=ITERATIONS (repeatable; e.g. 5=1).")] = None,
    profile: Annotated[Path | None, typer.Option(help="A calibration profile (`pase hw calibrate`).")] = None,
    precision: Annotated[str, typer.Option(help="GPU precision: bf16, fp16 or fp32.")] = "bf16",
    threads: Threads = 1,
    margin: Annotated[float, typer.Option(help="A time-parallel sampler must beat the best baseline by this "
                                          "fraction.", callback=finite)] = 0.05,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Predict latency and throughput of sequential, ParaDiGMS (best window), SRDS (best blocks) and batch
    parallel sampling, and pick one; never a parallel sampler predicted to lose."""
    import torch

    from pase.sampling.planner import plan_sampling
    from pase.sampling.runner import check_size

    _check_threads(threads)
    check_size(model, size)
    if samples < 1:
        raise PaseError(f"--samples must be >= 1, not {samples}")
    if margin < 0:
        raise PaseError(f"--margin must be >= 0 (a parallel sampler must not be predicted slower), not {margin}")
    check_precision(precision)
    torch.set_num_threads(threads)
    given = given_convergence(passes or [], srds_iterations or [], steps, evaluations or [])
    if given is not None and probe:
        raise PaseError("--probe measures convergence on the seeded model; leave it out when giving --passes, "
                        "--evaluations or --srds-iterations")
    pricing, devices, where = build_pricing(model, devices, cluster, steps, scheduler, size, guidance_scale, probe,
                                            tol, profile, precision, threads)
    if given is not None:
        pricing = replace(pricing, convergence=given)
    plan = plan_sampling(model, scheduler, steps, devices, samples, pricing, objective, margin, {"devices": where})
    if as_json:
        print(json.dumps(plan.to_dict(), indent=1))
        return
    print_sample_plan(plan)


def given_convergence(passes: list[str], iterations: list[str], steps: int,
                      evaluations: list[str] | None = None):  # noqa: ANN201 - Convergence | None
    """The convergence a user measured (``--passes WINDOW=PASSES``, ``--evaluations WINDOW=EVALUATIONS``,
    ``--srds-iterations BLOCKS=ITERATIONS``), or None when none is given; a malformed or impossible pair is
    refused in one line."""
    from pase.sampling.paradigms_schedule import begins_from_counts
    from pase.sampling.planner import Convergence

    def pairs(values: list[str], flag: str, what: str) -> dict[int, int]:
        parsed: dict[int, int] = {}
        for value in values:
            key, sep, count = value.partition("=")
            key, count = key.strip(), count.strip()
            if not sep or not (key.isascii() and key.isdecimal()) or not (count.isascii() and count.isdecimal()):
                raise PaseError(f"{flag} {value!r}: write {what} as two whole numbers, e.g. {flag} 80=44")
            k, n = int(key), int(count)
            if k < 1 or n < 1:
                raise PaseError(f"{flag} {value!r}: both numbers must be at least 1")
            if k in parsed and parsed[k] != n:
                raise PaseError(f"{flag} gives {k} twice ({k}={parsed[k]} and {k}={n}); give each once")
            parsed[k] = n
        return parsed

    windows = pairs(passes, "--passes", "WINDOW=PASSES")
    blocks = pairs(iterations, "--srds-iterations", "BLOCKS=ITERATIONS")
    evaluated = pairs(evaluations or [], "--evaluations", "WINDOW=EVALUATIONS")
    for window, count in windows.items():
        if count > steps or count * window < steps:
            raise PaseError(f"--passes {window}={count}: with {steps} steps a window of {window} takes between "
                            f"{-(-steps // window)} and {steps} passes")
    for block, count in blocks.items():
        if block < 2 or steps % block or block == steps:
            raise PaseError(f"--srds-iterations {block}={count}: SRDS splits the {steps} steps into equal blocks; "
                            f"give a divisor of {steps} between 2 and {steps // 2}")
        if count > block:
            raise PaseError(f"--srds-iterations {block}={count}: SRDS is exact after at most {block} iterations "
                            f"with {block} blocks")
    for window, count in evaluated.items():
        if window not in windows:
            raise PaseError(f"--evaluations {window}={count}: give the run's passes too (--passes {window}=...)")
        try:
            begins_from_counts(steps, window, windows[window], count)
        except PaseError as error:
            raise PaseError(f"--passes {window}={windows[window]} --evaluations {window}={count}: {error}") from None
    if not windows and not blocks:
        return None
    given = ", ".join([*(f"window {w}: {n} passes" + (f", {evaluated[w]} evaluations" if w in evaluated else "")
                         for w, n in sorted(windows.items())),
                       *(f"{b} blocks: {n} iterations" for b, n in sorted(blocks.items()))])
    return Convergence(windows, blocks, f"given (--passes / --evaluations / --srds-iterations): {given}", evaluated)


def build_pricing(model: str, devices: int | None, cluster: str | None, steps: int, scheduler: str,
                  size: int | None, guidance_scale: float, probe: bool, tol: float | None, profile: Path | None,
                  precision: str, threads: int = 1, data_parallel: bool = False
                  ):  # noqa: ANN201 - (Pricing, devices, description)
    """The cost-model inputs for this machine (measured) or a cluster spec (roofline); ``data_parallel`` prices
    the passes as ``torch.nn.DataParallel`` runs them (the ParaDiGMS reference code's runtime, not pase's)."""
    from pase.models.zoo import resolve_model
    from pase.sampling import planner
    from pase.sampling.runner import build_denoiser
    from pase.sampling.srds import default_blocks, divisors

    if devices is not None and devices < 1:
        raise PaseError(f"--devices must be >= 1, not {devices}")
    measured = None
    if profile is not None:
        from cost_models.calibrate import load_profile

        measured = load_profile(profile)
    spec = resolve_model(model)
    _, channels, height, width = spec.inputs[0].concrete(1)
    if size is not None:
        height = width = size
    evals_per_row = 2 if guidance_scale != 1.0 else 1
    if cluster is not None:
        from cost_models.cluster import load_cluster
        from cost_models.rates import HardwareRates, profile_mismatch
        from pase.graph import extract_model

        hw = load_cluster(cluster)
        devices = devices or hw.world_size
        if devices > hw.world_size:
            raise PaseError(f"--devices {devices} exceeds the {hw.world_size} GPUs of {cluster}")
        if measured is not None and (reason := profile_mismatch(hw, measured)):
            raise PaseError(reason)
        rates = HardwareRates(hw, measured, precision)
        shapes = {"sample": (1, channels, height, width)} if size is not None else None
        graph = extract_model(model, 1, input_shapes=shapes, use_cache=True)
        eval_time = planner.roofline_eval_time(graph, rates, precision)
        gather = planner.gather_time(hw, measured, devices)
        dp_call = planner.data_parallel_call(model, graph, rates, precision, devices) if data_parallel else None
        memory_gbps = rates.memory().value / 1e9
        where = f"{devices} x {hw.gpu.id} of {hw.spec}"
    else:
        if data_parallel:
            raise PaseError("torch.nn.DataParallel runs on GPUs: price it with --cluster")
        dp_call = None
        devices = devices or 2
        cores = os.cpu_count() or 1
        if devices > MAX_LOCAL_PROCESSES:
            raise PaseError(f"--devices {devices}: without --cluster the devices are processes on this machine "
                            f"({cores} cores), at most {MAX_LOCAL_PROCESSES}; price GPUs with --cluster "
                            "(e.g. --cluster 8xA100-80GB-SXM)")
        build_denoiser(model, 0, guidance_scale)  # fail early on a model `pase sample` cannot run
        eval_time = planner.measure_eval_time(model, size, threads=threads)
        gather = planner.gather_time(None, measured, devices)
        memory_gbps = planner.CPU_MEMORY_GBPS
        where = f"{devices} process(es) on this CPU ({cores} cores)"
    convergence = planner.Convergence()
    if probe:
        windows = sorted({w for w in (2, 4, 16, 64) if w <= steps})
        blocks = sorted({default_blocks(steps), *[d for d in divisors(steps) if 2 <= d <= 8]})
        paradigms_tol = 0.1 if tol is None else tol
        convergence = planner.probe_convergence(model, scheduler, steps, windows, blocks, paradigms_tol,
                                                paradigms_tol / 10, size, guidance_scale=guidance_scale)
    pricing = planner.Pricing(eval_time, gather, convergence, channels * height * width, memory_gbps, evals_per_row,
                              dp_call)
    return pricing, devices, where


def print_sample_plan(plan) -> None:  # noqa: ANN001 - SamplePlan
    from pase.sampling.planner import best_of_each

    sequential = next(c for c in plan.candidates if c.sampler == "sequential")
    table = Table(title=f"sample-plan: {plan.model}, {plan.scheduler.upper()}-{plan.steps}, {plan.samples} sample(s), "
                        f"{plan.sources['devices']}; objective {plan.objective}")
    for column in ("sampler", "setting", "passes", "evals/sample", "latency s", "samples/s", "speedup"):
        table.add_column(column, justify="left" if column in ("sampler", "setting") else "right")
    for c in best_of_each(plan):
        mark = " <- chosen" if c is plan.chosen else ""
        table.add_row(c.sampler + mark, c.setting, str(c.passes), f"{c.evals:g}", f"{c.seconds:.4g}",
                      f"{c.throughput:.4g}", f"{sequential.seconds / c.seconds:.2f}x")
    console.print(table)
    for what, source in plan.sources.items():
        if what != "devices":
            console.print(f"[dim]{what}: {source}[/]", highlight=False)
    chosen = plan.chosen
    console.print(f"chosen: [bold]{chosen.sampler}[/] ({chosen.setting}), predicted {chosen.seconds:.4g} s; "
                  f"time-parallel samplers need a {plan.margin:.0%} predicted gain over the best baseline",
                  highlight=False)


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)
    app.command("sample-plan")(sample_plan_command)
