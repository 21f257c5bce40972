"""``pase verify``: run a plan for a few steps and hold its prediction against what happened.

Synthetic data (DDPM epsilon loss: random latents and noise, random timesteps, ``add_noise`` of
diffusers' DDPMScheduler) and AdamW, so nothing but the model and the plan matters. A plan with
pipeline stages runs its schedule (``pase_step``) on random latents: each pipeline replica draws
its share of the global batch (the same on all of its ranks). Step time is the median over the
steps after warm-up of the slowest rank; peak memory is per rank (CUDA: the allocator's peak; CPU:
the growth of peak resident memory over the resident memory before the model was built).
``apply_to_profile`` folds the measured gap into a calibration profile's compute rates so the next
plan is priced with it.
"""
from __future__ import annotations

import copy
import datetime as dt
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import Progress

from pase.errors import PaseError
from pase.models.zoo import ModelSpec
from pase.planning.plan import Plan
from pase.runtime.checks import model_graph, planned_inputs
from pase.runtime.comm_count import CommCounter
from pase.runtime.context import distributed
from pase.runtime.layer_timing import LayerTimer, per_kind
from pase.runtime.pipeline import conditioning_inputs
from pase.runtime.state import ShardMap, full_tensors
from pase.train.loop import EMA, epsilon_objective, step_generator
from pase.train.planned import job_model, job_settings

GAP = 0.25  # a measured/predicted gap above this is flagged
CHECK_TOLERANCE = 1e-4  # `verify --check` fails above this relative error (loss, gradients, weights after a step)
ZERO_NORM = 1e-6  # relative to the largest norm compared: below it a reference tensor is zero up to rounding
# AdamW's first step moves an element by lr * g / (|g| + eps): where the reference gradient is under this, the step
# multiplies the gradient's rounding by up to 1 / eps (1e8), so such elements' weights are not compared
ADAM_UNSTABLE_GRAD = 1e-6


@dataclass
class VerifyResult:
    predicted_step_seconds: float
    measured_step_seconds: float
    ratio: float
    predicted_memory_bytes: int
    measured_memory_bytes: int
    per_rank_step_seconds: list[float]
    per_rank_memory_bytes: list[int]
    losses: list[float]
    layout: str
    memory_source: str
    layers_as_planned: int = 0  # from the parallelized model's pase_layout
    layers_total: int = 0
    check: CheckResult | None = None  # with --check
    # with --per-layer: per layer kind, the layers timed and their measured and predicted seconds per step
    per_kind: dict[str, dict[str, float]] | None = None

    @property
    def memory_ratio(self) -> float:
        return self.measured_memory_bytes / self.predicted_memory_bytes if self.predicted_memory_bytes else float("inf")

    def flags(self) -> list[str]:
        notes = []
        if abs(self.ratio - 1) > GAP:
            notes.append(f"step time is {self.ratio:.2f}x the prediction (gap over {GAP:.0%})")
        if abs(self.memory_ratio - 1) > GAP:
            notes.append(f"peak memory is {self.memory_ratio:.2f}x the prediction (gap over {GAP:.0%})")
        return notes

    def summary(self) -> dict[str, Any]:
        """The numbers ``pase verify --json`` ends with (and the check's, with ``--check``)."""
        keys = ("predicted_step_seconds", "measured_step_seconds", "ratio", "predicted_memory_bytes",
                "measured_memory_bytes", "layers_as_planned", "layers_total")
        data = asdict(self)
        return {**{key: data[key] for key in keys}, **(self.check.summary() if self.check else {}),
                **({"per_kind": self.per_kind} if self.per_kind is not None else {})}


@dataclass
class CheckResult:
    """One step of the plan against the same step on one process (``pase verify --check``)."""
    max_rel_error: float
    worst: str  # the tensor (or "loss") with the largest relative error
    loss: float
    reference_loss: float
    layers_as_planned: int
    layers_total: int
    comm_bytes_measured: float  # per rank per step, the busiest rank (pase.runtime.comm_count)
    comm_bytes_predicted: float  # the plan's Prediction.comm_bytes_per_device
    compared: int  # tensors compared (gradients and weights after the step)

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= CHECK_TOLERANCE and self.layers_as_planned == self.layers_total

    def summary(self) -> dict[str, Any]:
        keys = ("max_rel_error", "layers_as_planned", "layers_total", "comm_bytes_measured", "comm_bytes_predicted")
        return {key: asdict(self)[key] for key in keys}


def plan_spec(plan: Plan, model: str | None = None) -> ModelSpec:
    """The plan's model: a zoo entry or a diffusers folder rebuilt from data (``recorded_model``), or a user's
    factory when ``model`` (the command line's ``--model``) names the same one, built at the plan's input shapes."""
    return job_model(job_settings(plan, model, None)[0], plan)


def _is_timestep(spec: ModelSpec, position: int, name: str, template: torch.Tensor) -> bool:
    """A UNet's timestep input: named so in the zoo and in folders; a user model's second input when it is 1-D
    (the ``(sample, timestep)`` convention that ``pase train`` follows too)."""
    return name == "timestep" or (spec.family == "user" and position == 1 and template.dim() == 1)


def synthetic_inputs(plan: Plan, batch: int, device: torch.device, generator: torch.Generator,
                     spec: ModelSpec | None = None) -> tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]:
    """(noise target, model args, model kwargs) for one step of the plan's model (``spec``, default: rebuilt from
    the plan): noised latents, timesteps."""
    from diffusers import DDPMScheduler  # noqa: PLC0415 - diffusers takes 1-2 s to import; only the DDPM schedule needs it

    spec = spec or plan_spec(plan)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    args, kwargs = planned_inputs(plan, spec, batch, device="cpu")
    values = []
    noise = None
    for position, (name, template) in enumerate((s.name, t) for s, t in zip(spec.inputs, (*args, *_leaves(kwargs)))):
        if _is_timestep(spec, position, name, template):
            values.append(torch.randint(0, 1000, template.shape, generator=generator))
        else:
            values.append(torch.randn(template.shape, generator=generator))
    latents = values[0]
    noise = torch.randn(latents.shape, generator=generator)
    values[0] = scheduler.add_noise(latents, noise, values[1])
    values = [v.to(device) for v in values]
    positional = values[:len(args)]
    named = _refill(kwargs, iter(values[len(args):]))
    return noise.to(device), tuple(positional), named


def _leaves(kwargs: dict[str, Any]) -> list[Any]:
    out = []
    for value in kwargs.values():
        out.extend(_leaves(value) if isinstance(value, dict) else [value])
    return out


def _refill(kwargs: dict[str, Any], values: Any) -> dict[str, Any]:
    return {k: _refill(v, values) if isinstance(v, dict) else next(values) for k, v in kwargs.items()}


class _HostMemory:
    """Peak resident memory growth of this process (Linux: VmHWM, reset through clear_refs)."""
    def __init__(self) -> None:
        self.reset_ok = self._reset()
        self.base = self._status("VmRSS")

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak(self) -> int:
        return max(0, self._status("VmHWM") - self.base)


def run_verify(plan: Plan, steps: int, warmup: int = 2, seed: int = 0, lr: float = 1e-4,
               progress: bool = True, check: bool = False, model: str | None = None,
               per_layer: bool = False) -> VerifyResult:
    """Run ``steps`` training steps of ``plan`` in the current process group (open one with
    ``pase.distributed``); every rank returns the same result. With ``check``, one step is first held
    against the same step on a single process (``run_check``); with ``per_layer``, each timed step's layers are
    timed too (``pase.runtime.layer_timing``), per layer kind against the plan's layer times."""
    if steps <= warmup:
        raise PaseError(f"--steps {steps} leaves nothing to measure after {warmup} warm-up steps; use more steps")
    spec = plan_spec(plan, model)  # a model pase can rebuild, or a clear error before any process group work
    with distributed(plan) as run:
        with torch.device("meta"):
            graph = model_graph(spec.build(), plan)  # capture (and imports) before the memory baseline
        checked = run_check(run, plan, graph, seed, lr, spec) if check else None
        cuda = run.device.type == "cuda"
        host = None if cuda else _HostMemory()
        if cuda:
            torch.cuda.reset_peak_memory_stats(run.device)
        torch.manual_seed(seed)
        built = spec.build()
        parallel = run.parallelize(built, graph=graph)
        optimizer = torch.optim.AdamW(parallel.parameters(), lr=lr)
        # the step as the plan priced it: clipped by the global norm (pase train's default) and with an EMA update
        # where the plan says so (plans older than these options priced neither)
        shards = ShardMap(parallel)
        clip = bool(plan.options.get("grad_clip"))
        ema = EMA(shards.named, 0.999) if plan.options.get("ema") else None
        generator = torch.Generator().manual_seed(seed + 1 + run.rank)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16 if plan.precision == "bf16" else torch.float16,
                                  enabled=cuda and plan.precision != "fp32")
        bar = _bar(steps, progress and run.rank == 0)
        pipelined = hasattr(parallel, "pase_step")  # a pipeline stage runs whole steps in its schedule
        if pipelined:
            shape, generator = _pipeline_latents(plan, spec, parallel, seed)
            objective = epsilon_objective()
            share = shape[0]
            templates = conditioning_inputs(*_conditioning(plan, spec, seed))  # the global batch's conditioning
        if per_layer and pipelined:
            raise PaseError("--per-layer times the layers of a per-layer plan; this plan runs pipeline stages")
        timer = LayerTimer(parallel, graph, run.device) if per_layer else None
        layer_seconds: list[dict[str, float]] = []
        times, losses = [], []
        for step in range(steps):
            if pipelined:  # the objective draws noise and timesteps inside the step (the last stage needs them)
                x0 = torch.randn(shape, generator=generator).to(run.device)
                conditioning = tuple(torch.randn((share, *t.shape[1:]), generator=generator).to(run.device)
                                     for t in templates)
            else:  # the plan's micro-steps, each on this rank's chunk of a micro-batch
                micro = [synthetic_inputs(plan, run.local_batch, run.device, generator, spec)
                         for _ in range(run.micro_steps)]
            if cuda:
                torch.cuda.synchronize(run.device)
            started = time.perf_counter()
            with autocast, (timer.step() if timer is not None else nullcontext()):
                if pipelined:
                    loss = parallel.pase_step(objective, x0, generator, conditioning)
                else:
                    loss = torch.zeros((), device=run.device)
                    for k, (target, args, kwargs) in enumerate(micro):
                        with run.accumulating(parallel, k):  # gradients synchronise in the last micro-step
                            out = parallel(*args, **kwargs)
                            part = F.mse_loss(getattr(out, "sample", out).float(), target) / run.micro_steps
                            part.backward()
                        loss = loss + part.detach()
            if clip:
                shards.clip_grad_norm_(1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            if cuda:
                torch.cuda.synchronize(run.device)
            times.append(time.perf_counter() - started)
            if timer is not None and step >= warmup:
                layer_seconds.append(timer.take())
            losses.append(run.mean(loss.detach()))
            if bar:
                bar.update(bar.task_ids[0], advance=1, description=f"step {len(times)}/{steps} loss {losses[-1]:.4f}")
        if bar:
            bar.stop()
        peak = torch.cuda.max_memory_allocated(run.device) if cuda else host.peak()
        # on the run's device: NCCL reduces device tensors only
        mine = torch.tensor([statistics.median(times[warmup:]), float(peak)], dtype=torch.float64, device=run.device)
        gathered = [torch.zeros_like(mine) for _ in range(run.world_size)]
        dist.all_gather(gathered, mine)
        kinds = None
        if timer is not None:
            timer.remove()
            kinds = _slowest_rank(per_kind(layer_seconds, timer, {
                layer.id: layer.seconds * plan.micro_steps for layer in plan.layers}), run.device)
        layout = parallel.pase_layout.summary()
        as_planned, total = parallel.pase_layout.layers_as_planned, parallel.pase_layout.layers_total
        del parallel, optimizer
    per_rank_steps = [float(g[0]) for g in gathered]
    per_rank_memory = [int(g[1]) for g in gathered]
    measured = max(per_rank_steps)
    predicted = plan.predicted.step_seconds
    return VerifyResult(predicted, measured, measured / predicted if predicted else float("inf"),
                        int(plan.predicted.memory_bytes_per_device), max(per_rank_memory), per_rank_steps,
                        per_rank_memory, losses, layout,
                        "CUDA allocator peak" if cuda else "growth of peak resident memory (VmHWM)", as_planned,
                        total, checked, kinds)


def _slowest_rank(kinds: dict[str, dict[str, float]], device: torch.device) -> dict[str, dict[str, float]]:
    """Each kind's measured seconds as its slowest rank measured them (every rank has the same kinds)."""
    names = sorted(kinds)
    measured = torch.tensor([kinds[name]["measured_seconds"] for name in names], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    return {name: {**kinds[name], "measured_seconds": float(value)} for name, value in zip(names, measured)}


def run_check(run: Any, plan: Plan, graph: Any, seed: int, lr: float, spec: ModelSpec | None = None) -> CheckResult:
    """One training step (forward, backward, AdamW) of ``plan`` on a seeded global batch, and the same step of
    the same model on this process alone; every rank builds the reference itself. A text-conditioned model
    gets seeded random conditioning (text embeddings, SDXL's added inputs) for the same global batch. Compared:
    the loss, every gradient and every weight after the step, as ``||a - b|| / ||b||`` per tensor (tensors whose
    reference is zero up to rounding, such as attention key biases, relative to the largest norm instead; weight
    elements whose reference gradient is under ``ADAM_UNSTABLE_GRAD`` left out, their AdamW step being rounding).
    The plan's step runs under ``CommCounter``, whose bytes (the busiest rank's) are held against the plan's."""
    spec = spec or plan_spec(plan)
    torch.manual_seed(seed)
    model = spec.build()
    reference = copy.deepcopy(model)
    objective = epsilon_objective()
    args, _ = planned_inputs(plan, spec, 1)
    x0 = torch.randn((plan.batch, *args[0].shape[1:]), generator=torch.Generator().manual_seed(seed + 7))
    parallel = run.parallelize(model, graph=graph)
    pipelined = hasattr(parallel, "pase_step")  # a pipeline stage runs whole steps
    # data-parallel ranks: every rank, or a pipeline's replicas (stage groups run as replicas too)
    replicas = parallel.pase_data_parallel[1] if pipelined else run.world_size
    share = plan.micro_batch // replicas
    # micro-step j's rows for replica r: the global batch's (j * replicas + r)-th share, in the reference's order
    drawn = [objective.prepare(x0[(j * replicas + r) * share:(j * replicas + r + 1) * share],
                               step_generator(seed, j, r)) for j in range(plan.micro_steps) for r in range(replicas)]
    inputs = [torch.cat([d[0][k] for d in drawn]) for k in range(2)]
    extra_args, extra_kwargs = _conditioning(plan, spec, seed)
    loss_tensor = objective.criterion(reference(*inputs, *extra_args, **extra_kwargs), torch.cat([d[1] for d in drawn]))
    loss_tensor.backward()
    ref_loss = float(loss_tensor.detach())
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=lr)
    want_grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.grad is not None}
    ref_optimizer.step()
    want_weights = {n: p.detach().clone() for n, p in reference.named_parameters()}
    optimizer = torch.optim.AdamW(parallel.parameters(), lr=lr)
    with CommCounter() as counter:
        if pipelined:
            replica = parallel.replica
            rows = slice(replica * share, (replica + 1) * share)
            conditioning = conditioning_inputs(_rows(extra_args, rows, run.device),
                                               _rows(extra_kwargs, rows, run.device))
            loss = parallel.pase_step(objective, x0[rows].to(run.device), step_generator(seed, 0, replica),
                                      conditioning)
        else:  # the plan's micro-steps, gradients synchronised in the last (each loss a share of the step's mean)
            loss = torch.zeros((), device=run.device)
            for j in range(run.micro_steps):
                chunk = j * replicas + run.rank
                (sample, timestep), noise = drawn[chunk]
                rows = slice(chunk * share, (chunk + 1) * share)
                args = [t.to(run.device) for t in (sample, timestep)]
                with run.accumulating(parallel, j):
                    out = parallel(*args, *_rows(extra_args, rows, run.device), **_rows(extra_kwargs, rows, run.device))
                    part = objective.criterion(out, noise.to(run.device)) / run.micro_steps
                    part.backward()
                loss = loss + part.detach()
    got_grads = _local_or_full(parallel, "grad")  # gathered outside the count: not part of a step
    with counter:
        optimizer.step()
    got_weights = _local_or_full(parallel, "param")
    mean_loss = float(loss.detach()) if pipelined else run.mean(loss.detach())
    errors = {"loss": abs(mean_loss - ref_loss) / max(abs(ref_loss), 1e-12)}
    errors.update(relative_errors({f"grad:{n}": g for n, g in got_grads.items()},
                                  {f"grad:{n}": want_grads[n] for n in got_grads if n in want_grads}))
    stable = {n: want_grads[n].abs() >= ADAM_UNSTABLE_GRAD for n in got_weights if n in want_grads}
    errors.update(relative_errors({f"weight:{n}": w[stable[n]] if n in stable else w for n, w in got_weights.items()},
                                  {f"weight:{n}": want_weights[n][stable[n]] if n in stable else want_weights[n]
                                   for n in got_weights if n in want_weights}))
    worst = max(errors, key=errors.get)
    mine = torch.tensor([errors[worst], counter.total_bytes], dtype=torch.float64, device=run.device)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    layout = parallel.pase_layout
    del parallel, optimizer
    return CheckResult(float(mine[0]), worst, mean_loss, ref_loss, layout.layers_as_planned, layout.layers_total,
                       float(mine[1]),
                       float(plan.predicted.comm_bytes_per_device), len(errors) - 1)


def _conditioning(plan: Plan, spec: ModelSpec, seed: int) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """The model's inputs after the sample and timestep (text embeddings, SDXL's pooled embeddings and time
    ids) for the plan's global batch, seeded: random, as ``synthetic_inputs`` draws them."""
    args, kwargs = planned_inputs(plan, spec, plan.batch, device="cpu")
    generator = torch.Generator().manual_seed(seed + 11)
    extra_args = tuple(torch.randn(a.shape, generator=generator) for a in args[2:])
    values = iter([torch.randn(t.shape, generator=generator) for t in _leaves(kwargs)])
    return extra_args, _refill(kwargs, values)


def _rows(value: Any, rows: slice, device: torch.device) -> Any:
    """``value`` (tensors, or tuples and dicts of them) cut to the batch rows ``rows``, on ``device``."""
    if isinstance(value, dict):
        return {k: _rows(v, rows, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, device) for v in value)
    return value[rows].to(device)


def _local_or_full(parallel: Any, what: str) -> dict[str, torch.Tensor]:
    """A pipeline stage's own tensors under the model's names, or every tensor at full size."""
    if hasattr(parallel, "pase_step"):
        names = parallel.original_names
        tensors = {n: p if what == "param" else p.grad for n, p in parallel.stage_module.named_parameters()}
        return {names.get(n, n): t.detach().clone() for n, t in tensors.items() if t is not None}
    return {n: t.clone() for n, t in full_tensors(parallel, what).items()}


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor ``||got - want|| / ||want||``; a reference that is zero up to rounding (under ``ZERO_NORM`` x
    the largest norm: attention key biases get no gradient, softmax ignores a shift) is measured against the
    largest instead."""
    if not want:
        return {}
    largest = max(float(t.norm()) for t in want.values())
    errors = {}
    for name, ref in want.items():
        norm = float(ref.norm())
        scale = norm if norm >= ZERO_NORM * largest else largest
        errors[name] = float((got[name].to(ref.dtype) - ref).norm()) / max(scale, 1e-30)
    return errors


def _pipeline_latents(plan: Plan, spec: ModelSpec, stage: Any, seed: int) -> tuple[tuple[int, ...], torch.Generator]:
    """Shape of this replica's share of the global batch of latents, and the replica's generator (every rank
    of a replica draws the same numbers: stage 0 feeds the noised latents, the last stage scores the noise)."""
    replica, replicas = stage.pase_data_parallel
    args, _ = planned_inputs(plan, spec, 1)
    return (plan.batch // replicas, *args[0].shape[1:]), torch.Generator().manual_seed(seed + 1 + replica)


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None

    bar = Progress(transient=True)
    bar.add_task("verify", total=total)
    bar.start()
    return bar


def apply_to_profile(profile: dict[str, Any], plan: Plan, result: VerifyResult) -> dict[str, Any]:
    """Refused when any layer ran differently from the plan (the gap would be learned as slow compute).

    ``profile`` with its compute rates scaled so the plan's compute would take what was measured
    (the gap is put on compute: communication keeps its measured collective rates), and the
    measurement appended to ``profile["verify"]``. A pipeline's bubble is its stages waiting for each
    other's compute, so it scales with the compute rates too."""
    if result.layers_as_planned < result.layers_total:
        raise PaseError(f"not learning from this run: {result.layers_total - result.layers_as_planned} of "
                        f"{result.layers_total} layers ran differently from the plan, and their gap would be "
                        "learned as slow compute; re-plan (without --space all) and verify again")
    predicted = plan.predicted
    compute = predicted.compute_seconds + predicted.bubble_seconds
    measured_compute = result.measured_step_seconds - predicted.communication_seconds
    factor = compute / measured_compute if measured_compute > 0 and compute else 1 / result.ratio
    updated = dict(profile)
    updated["compute"] = {kind: {**entry, **{key: entry[key] * factor for key in ("flops_per_second",
                                                                                   "bytes_per_second") if key in entry}}
                          for kind, entry in profile.get("compute", {}).items()}
    updated["verify"] = [*profile.get("verify", []), {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": plan.model,
        "devices": plan.devices, "batch": plan.batch, "layout": result.layout, **result.summary(),
        "compute_rate_factor": factor}]
    return updated


__all__ = ["CHECK_TOLERANCE", "GAP", "CheckResult", "VerifyResult", "apply_to_profile", "relative_errors",
           "run_verify", "synthetic_inputs"]
