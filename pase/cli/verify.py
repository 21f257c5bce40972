"""``pase verify``: run a plan under torchrun and compare its prediction with the measurement."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pase.cli.console import console, err_console
from pase.errors import PaseError


def verify(
    plan_path: Annotated[Path, typer.Option("--plan", help="A plan file from `pase plan --json`.")],
    steps: Annotated[int, typer.Option(min=1, help="Training steps to run (the first --warmup are not timed).")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="Steps left out of the timing.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="End with the prediction and measurement as one JSON "
                                          "line.")] = False,
    update_profile: Annotated[Path | None, typer.Option(
        "--update-profile", help="Fold the measured gap into this calibration profile's compute rates (the next "
        "`pase plan --profile` prices with them).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the weights and the synthetic data.")] = 0,
    model: Annotated[str | None, typer.Option(help="For a plan of your own package.module:factory: name the same "
                                              "factory (a plan file never makes pase import code).")] = None,
    check: Annotated[bool, typer.Option("--check", help="First run one step of the plan against the same step on "
                                        "a single process: the largest relative error of the loss, gradients and "
                                        "weights after an AdamW step, the layers run as planned, and the "
                                        "communication bytes counted against those the plan priced; exit 1 when "
                                        "the error is over 1e-4 or a layer ran differently.")] = False,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Also time every conv, linear, norm and attention "
                                            "layer (CUDA events on a GPU, the clock on a CPU) and print each layer "
                                            "kind's measured against predicted seconds per step.")] = False,
) -> None:
    """Run S steps of a plan on synthetic data (under torchrun) and print measured against predicted."""
    import torch.distributed as dist

    from pase.planning.plan import Plan
    from pase.train.verify import apply_to_profile, run_verify

    if not plan_path.exists():
        raise PaseError(f"no plan file {plan_path}; write one with `pase plan ... --json {plan_path}`")
    if update_profile is not None and not update_profile.exists():
        raise PaseError(f"--update-profile {update_profile} does not exist; calibrate first with `pase hw calibrate "
                        f"--out {update_profile}`")
    plan = Plan.load(plan_path)
    result = run_verify(plan, steps, warmup, seed, progress=not as_json, check=check, model=model,
                        per_layer=per_layer)
    rank = int(__import__("os").environ.get("RANK", "0"))
    failed = result.check is not None and not result.check.passed
    if dist.is_initialized() or rank != 0:
        if failed:
            raise typer.Exit(1)
        return
    if update_profile is not None:
        from cost_models.calibrate import load_profile, save_profile

        save_profile(apply_to_profile(load_profile(update_profile), plan, result), update_profile)
    if as_json:
        print(json.dumps(result.summary()))
    else:
        _print(plan, result, update_profile)
    if failed:
        assert result.check is not None
        err_console.print(f"[bold red]check failed:[/] {_check_failure(result.check)}", highlight=False)
        raise typer.Exit(1)


def _check_failure(check) -> str:  # noqa: ANN001 - CheckResult
    if check.layers_as_planned < check.layers_total:
        return f"{check.layers_total - check.layers_as_planned} of {check.layers_total} layers ran differently"
    return f"{check.worst} is {check.max_rel_error:.2e} off the single-process step (over 1e-4)"


def _print(plan, result, update_profile: Path | None) -> None:  # noqa: ANN001 - Plan, VerifyResult
    table = Table(title=f"{plan.model} on {result.layout}, global batch {plan.batch}, {len(result.losses)} steps "
                        f"(loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f})")
    for column in ("", "predicted", "measured", "measured / predicted", "per rank"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("step seconds", f"{result.predicted_step_seconds:.4f}", f"{result.measured_step_seconds:.4f}",
                  f"{result.ratio:.2f}", ", ".join(f"{s:.4f}" for s in result.per_rank_step_seconds))
    table.add_row("peak memory MiB", f"{result.predicted_memory_bytes / 2**20:.1f}",
                  f"{result.measured_memory_bytes / 2**20:.1f}", f"{result.memory_ratio:.2f}",
                  ", ".join(f"{m / 2**20:.1f}" for m in result.per_rank_memory_bytes))
    console.print(table)
    console.print(f"step time: median after warm-up, slowest rank; memory: {result.memory_source}")
    if result.check is not None:
        _print_check(result.check)
    if result.per_kind is not None:
        _print_per_kind(result.per_kind)
    for flag in result.flags():
        console.print(f"[bold yellow]gap:[/] {flag}", highlight=False)
    if update_profile is not None:
        console.print(f"updated {update_profile}: compute rates scaled to this measurement")


def _print_check(check) -> None:  # noqa: ANN001 - CheckResult
    table = Table(title="one step against a single process (--check)")
    for column in ("", "value", ""):
        table.add_column(column, justify="left" if column != "value" else "right")
    table.add_row("max relative error", f"{check.max_rel_error:.2e}",
                  f"worst: {check.worst}; {check.compared} tensors and the loss compared")
    table.add_row("layers as planned", f"{check.layers_as_planned}/{check.layers_total}", "")
    predicted = check.comm_bytes_predicted
    ratio = f"measured / predicted {check.comm_bytes_measured / predicted:.3f}" if predicted else "no prediction"
    table.add_row("comm MiB per rank per step", f"{check.comm_bytes_measured / 2**20:.2f}",
                  f"predicted {predicted / 2**20:.2f}; {ratio}")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)


__all__ = ["register", "verify"]


def _print_per_kind(kinds: dict[str, dict[str, float]]) -> None:
    table = Table(title="per layer kind, seconds per step (median timed step, slowest rank; the layers' own modules, "
                        "forward and backward)")
    for column in ("kind", "layers", "predicted ms", "measured ms", "measured / predicted"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, row in kinds.items():
        ratio = row["measured_seconds"] / row["predicted_seconds"] if row["predicted_seconds"] else float("inf")
        table.add_row(kind, f"{row['layers']:.0f}", f"{row['predicted_seconds'] * 1e3:.3f}",
                      f"{row['measured_seconds'] * 1e3:.3f}", f"{ratio:.2f}")
    console.print(table)
