"""The diffusion training loop: DDPM epsilon-prediction loss, AdamW, optional EMA, checkpoints, resume.

``fit`` trains the parameters of ``model`` that require grad, in one data-parallel group (the whole
world, one DeMe range group, or a single process). What is pluggable, so that strategies and the plan
runtime reuse the loop unchanged:
- the objective: ``(model, x0, generator) -> loss`` (plain epsilon loss, DeMe's range loss, ...);
- ``parallelize(model, group) -> model``: how the model is wrapped for its group (DDP by default);
- the loader factory: which batch each rank gets at each step (``data.step_batches`` by default);
- the optimizer's parameter groups (TuneQDM keeps one per timestep expert).
All randomness of a step (noise, timesteps) comes from a generator seeded by (seed, micro-step, rank)
or, for streamed data, one per sample seeded by (seed, epoch, item), and batches are a function of the
micro-step, so a run resumed from a checkpoint continues exactly. ``grad_accum`` micro-steps make a step.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pase.errors import PaseError
from pase.runtime.accumulation import gradient_sync_paused
from pase.runtime.state import ShardMap, local_part
from pase.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_path,
)
from pase.train.data import LoaderFactory, step_batches
from pase.train.loss_scale import LossScaler

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
Objective = Callable[[nn.Module, Any, torch.Generator], torch.Tensor]  # (model, batch, generator) -> loss
# called on every rank after each optimizer step (and its checkpoint): (step, that step's record, the model)
AfterStep = Callable[[int, dict[str, float], nn.Module], None]


@dataclass(frozen=True)
class DataGroup:
    """The data-parallel group one training job runs in (``group`` None: a single process)."""
    group: Any  # torch.distributed ProcessGroup or None
    rank: int
    size: int
    device: torch.device
    reporter: bool = True  # this process shows the progress bar

    @classmethod
    def single(cls, device: torch.device | str = "cpu", reporter: bool = True) -> DataGroup:
        return cls(None, 0, 1, torch.device(device), reporter)


Parallelize = Callable[[nn.Module, DataGroup], nn.Module]


@dataclass
class LoopConfig:
    steps: int
    batch: int  # global batch of the data-parallel group per step
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float | None = None
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0  # 0: only after the last step
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    description: str = "train"
    autocast: str | None = None  # "bf16": bf16 autocast of the forward (CUDA only); "fp16": with a loss scale
    loss_scale: float = 2.0 ** 16  # fp16: the initial dynamic loss scale (pase.train.loss_scale)
    lr_scheduler: str = "constant"  # diffusers.optimization.get_scheduler's names
    lr_warmup_steps: int = 0
    grad_accum: int = 1  # micro-steps of ``batch`` per optimizer step

    def validate(self, group_size: int) -> None:
        if self.steps < 1:
            raise PaseError(f"--steps is {self.steps}; train for at least 1 step")
        if self.batch < 1 or self.batch % group_size:
            raise PaseError(f"--batch {self.batch} does not split over the {group_size} data-parallel process(es) "
                            f"of this job; use a multiple of {group_size}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise PaseError(f"--ema {self.ema_decay} is not a decay in (0, 1); use e.g. 0.999")
        if self.resume and self.checkpoint_dir is None:
            raise PaseError("--resume needs --out, the folder whose checkpoints it continues from")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise PaseError(f"--lr-scheduler {self.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
        if not 1 <= self.grad_accum <= 2**16:
            raise PaseError(f"--grad-accum {self.grad_accum}: use 1 (no accumulation) to 65536 micro-steps per step")
        if not 0 <= self.lr_warmup_steps <= self.steps:
            raise PaseError(f"--lr-warmup-steps {self.lr_warmup_steps}: use 0 to --steps ({self.steps})")


@dataclass
class TrainResult:
    steps: int  # the step reached (the total, counting steps done before a resume)
    steps_run: int  # steps run by this call
    final_loss: float  # mean loss of the last (up to) 10 steps, averaged over the group's ranks
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)  # the rate each step of this call ran at
    step_seconds: float = 0.0  # median wall time of one step (the first step, warm-up, left out)
    samples_per_second: float = 0.0
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    resumed_from: Path | None = None
    trainable_params: int = 0
    grad_bytes: int = 0  # one gradient per trainable parameter
    optimizer_bytes: int = 0  # the optimizer's state tensors as they are after training

    @property
    def grad_and_optimizer_bytes(self) -> int:
        return self.grad_bytes + self.optimizer_bytes


def model_output(output: Any) -> torch.Tensor:
    """The prediction tensor of a diffusers output object, a tuple, or a plain tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """DDPM's linear beta schedule (diffusers' ``DDPMScheduler`` defaults), as cumulative alphas."""
    from diffusers import DDPMScheduler  # noqa: PLC0415 - diffusers takes 1-2 s to import; only the DDPM schedule needs it

    return DDPMScheduler(num_train_timesteps=num_train_timesteps).alphas_cumprod.clone()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    abar = alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def draw_noise(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from ``generator`` (the same numbers on every device)."""
    return torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)


def epsilon_objective(num_train_timesteps: int = 1000, sort_timesteps: bool = False) -> Objective:
    """DDPM's epsilon-prediction loss with t uniform over [0, T). ``sort_timesteps`` hands the batch's
    timesteps out in increasing order (the samples are in random order, so the loss is the same in
    distribution); models that group samples by timestep (TuneQDM's experts) then get contiguous groups."""
    alphas_cumprod = ddpm_alphas_cumprod(num_train_timesteps)

    def prepare(x0: torch.Tensor, generator: torch.Generator) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        noise = draw_noise(x0, generator)
        t = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator)
        t = (t.sort().values if sort_timesteps else t).to(x0.device)
        return (add_noise(x0, noise, t, alphas_cumprod), t), noise

    def criterion(prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model_output(prediction), noise)

    def loss(model: nn.Module, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        inputs, noise = prepare(x0, generator)
        return criterion(model(*inputs), noise)

    loss.prepare, loss.criterion = prepare, criterion  # split for pipeline stages (forward and loss on other ranks)
    return loss


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank)


def default_parallelize(model: nn.Module, group: DataGroup, find_unused_parameters: bool = False) -> nn.Module:
    """DDP over the group when it has more than one process; the model itself otherwise."""
    if group.size == 1:
        return model

    device_ids = [group.device.index] if group.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=group.group,
                                   find_unused_parameters=find_unused_parameters)


class EMA:
    """An exponential moving average of the trainable parameters (kept beside the model, not in it)."""
    def __init__(self, named: Sequence[tuple[str, nn.Parameter]], decay: float) -> None:
        self.decay = decay
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        self.shadow = [param.detach().clone() for param in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in zip(self.names, self.shadow):
            tensor.copy_(state[name])


def _group_mean(value: torch.Tensor, group: DataGroup) -> float:
    if group.size == 1:
        return float(value.detach())
    reduced = value.detach().clone()
    dist.all_reduce(reduced, group=group.group)
    return float(reduced) / group.size


def fit(
    model: nn.Module,
    objective: Objective,
    dataset: Any,
    config: LoopConfig,
    *,
    group: DataGroup | None = None,
    parallelize: Parallelize = default_parallelize,
    loader: LoaderFactory = step_batches,
    param_groups: list[dict[str, Any]] | None = None,
    job: dict[str, Any] | None = None,
    after_step: Sequence[AfterStep] = (),
) -> TrainResult:
    """Train ``model``'s trainable parameters for ``config.steps`` steps (fewer after ``--resume``).

    ``job`` identifies the job (model, strategy, ...); it is stored in every checkpoint and a
    resumed run must match it. Checkpoints hold only the trainable parameters (see checkpoint.py).
    ``after_step`` hooks (a run log, validation images) see each step's loss, learning rate and speed.
    """
    group = group or DataGroup.single()
    config.validate(group.size)
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not named:
        raise PaseError("the model has no trainable parameters (nothing requires grad); check the strategy")
    trainable = sum(p.numel() for _, p in named)
    model.to(group.device)
    job = dict(job or {})
    start, previous, resumed_from, checkpoint = 0, [], None, None
    if config.resume and config.checkpoint_dir is not None and (path := latest_checkpoint(config.checkpoint_dir)):
        checkpoint = _restore_params(path, named, job)  # full tensors, before parallelize shards them
        start, previous, resumed_from = checkpoint.step, list(checkpoint.settings.get("recent_losses", [])), path
    wrapped = parallelize(model, group)
    shards = ShardMap(wrapped)  # the trainable parameters as parallelize left them (shards under a plan)
    if param_groups is not None and shards.sharded:
        raise PaseError("this strategy keeps its own optimizer groups, which cannot follow parameters that the plan "
                        "shards; run it under a data-parallel plan (pase plan --only dp)")
    groups = param_groups or [{"params": [param for _, param in shards.named]}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(shards.named, config.ema_decay) if config.ema_decay else None
    if checkpoint is not None:
        _restore_state(checkpoint, shards, optimizer, ema)
    schedule = _lr_schedule(optimizer, config, start)
    optimizer.zero_grad(set_to_none=True)
    runner = getattr(wrapped, "pase_step", None)  # a pipeline runs forward and backward in its schedule
    amp: Any = torch.autocast("cuda", dtype=torch.bfloat16) if config.autocast == "bf16" and \
        group.device.type == "cuda" else nullcontext()
    scaler = None
    if config.autocast == "fp16":
        amp, scaler = torch.autocast(group.device.type, dtype=torch.float16), LossScaler(config.loss_scale)
        if checkpoint is not None and "loss_scale" in checkpoint.settings:
            scaler.load(checkpoint.settings["loss_scale"])
    # a pipeline replica's ranks all see its whole batch: they are one data-parallel rank
    data_rank, data_size = getattr(wrapped, "pase_data_parallel", (group.rank, group.size))
    accum = config.grad_accum
    if runner is not None and accum > 1:
        raise PaseError("--grad-accum does not combine with a pipeline plan, whose schedule already accumulates over "
                        "its microbatches; plan the larger batch instead (pase plan --batch)")
    # the loader counts micro-steps: micro-step k of step s reads what step s*K+k of batch B reads, so K micro-steps
    # of B see the rows one step of K*B sees
    batches = loader(dataset, config.batch // data_size, data_rank, data_size, config.seed, start * accum)
    losses: list[float] = []
    rates: list[float] = []
    seconds: list[float] = []
    progress = _Progress(config, start, group.reporter)
    try:
        for step in range(start, config.steps):
            began = time.perf_counter()
            if runner is not None:  # a pipeline schedule: forward and backward of all its microbatches
                x0 = on_device(next(batches), group.device)
                with amp:  # the schedule scales each microbatch's loss before its backward
                    loss = runner(objective, x0, step_generator(config.seed, step, data_rank),
                                  **({"loss_scale": scaler.scale} if scaler else {}))
            else:
                loss = _accumulate(wrapped, objective, batches, config, step, data_rank, amp, group.device, scaler)
            finite = scaler.unscale(p for _, p in shards.named) if scaler else True  # an overflow skips the step
            if config.grad_clip and finite:
                shards.clip_grad_norm_(config.grad_clip)
            rates.append(float(optimizer.param_groups[0]["lr"]))
            if finite:
                optimizer.step()
            with warnings.catch_warnings():  # a step skipped for overflow still advances the learning-rate schedule
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                schedule.step()
            optimizer.zero_grad(set_to_none=True)  # free the gradients before the next forward
            if ema is not None and finite:
                ema.update()
            if scaler:
                scaler.update(finite)
            losses.append(_group_mean(loss, group))
            if not math.isfinite(losses[-1]):  # the group's mean: every rank stops at the same step
                raise PaseError(f"step {step + 1}: the loss is {losses[-1]}, so training stopped there and saved "
                                "nothing from that step (earlier checkpoints are kept); try a lower --lr or gradient "
                                "clipping")
            if group.device.type == "cuda":
                torch.cuda.synchronize(group.device)
            seconds.append(time.perf_counter() - began)
            progress.advance(step + 1, losses[-1], config.batch * accum / seconds[-1])
            due = step + 1 == config.steps or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)
            if config.checkpoint_dir is not None and due and (group.rank == 0 or shards.sharded):
                _save(config, step + 1, shards, optimizer, ema, job, (previous + losses)[-10:], group.rank == 0,
                      scaler)
            record = {"loss": losses[-1], "learning_rate": rates[-1],
                      "samples_per_second": config.batch * accum / seconds[-1], "seconds": seconds[-1]}
            if scaler:
                record.update(loss_scale=scaler.scale, step_skipped=not finite)
            for hook in after_step:
                hook(step + 1, record, model)
    finally:
        progress.close()
    ema_state = {k: v.clone() for k, v in shards.full_named(ema.shadow).items()} if ema else {}
    del wrapped
    timed = seconds[1:] or seconds
    median = statistics.median(timed) if timed else 0.0
    tail = (previous + losses)[-10:]  # the last 10 steps, across a resume
    optimizer_bytes = sum(local_part(v).numel() * v.element_size() for state in optimizer.state.values()
                          for v in state.values() if isinstance(v, torch.Tensor))
    samples = config.batch * accum  # per optimizer step
    return TrainResult(max(start, config.steps), len(losses), sum(tail) / len(tail) if tail else float("nan"), losses,
                       rates, median, samples / median if median else 0.0, ema_state, resumed_from, trainable,
                       sum(local_part(p).numel() * p.element_size() for _, p in shards.named), optimizer_bytes)


def on_device(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, or a dict of tensors for conditioned models) on ``device``."""
    if isinstance(batch, dict):
        return {key: on_device(value, device) for key, value in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def _accumulate(wrapped: nn.Module, objective: Objective, batches: Iterator[Any], config: LoopConfig, step: int,
                data_rank: int, amp: Any, device: torch.device, scaler: LossScaler | None = None) -> torch.Tensor:
    """One optimizer step's forward and backward passes: ``config.grad_accum`` micro-steps whose gradients add up
    (each loss divided by their count, so the sum is the gradient of the mean over all their samples); the
    data-parallel reduction runs in the last micro-step's backward only (``gradient_sync_paused``). Returns the
    mean loss."""
    accum = config.grad_accum
    total = torch.zeros((), device=device)
    for micro in range(accum):
        x0 = on_device(next(batches), device)
        generator = step_generator(config.seed, step * accum + micro, data_rank)
        with gradient_sync_paused(wrapped) if micro < accum - 1 else nullcontext():
            with amp:
                loss = objective(wrapped, x0, generator)
            share = loss / accum if accum > 1 else loss
            (scaler.scaled(share) if scaler else share).backward()
        total += loss.detach()
    return total / accum


def _lr_schedule(optimizer: torch.optim.Optimizer, config: LoopConfig, start: int) -> Any:
    """diffusers' learning-rate schedule over ``config.steps`` steps (warm-up first), advanced to ``start``: a
    resumed run continues the curve (the schedule is a function of the step, so it needs no saved state)."""
    from diffusers.optimization import get_scheduler  # noqa: PLC0415

    for group in optimizer.param_groups:  # the curve starts from --lr, not from a checkpoint's last rate
        group.pop("initial_lr", None)
        group["lr"] = config.lr
    schedule = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                             num_training_steps=config.steps)
    with warnings.catch_warnings():  # stepping before any optimizer step is what a resume means here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start):
            schedule.step()
    return schedule


def _save(config: LoopConfig, step: int, shards: ShardMap, optimizer: torch.optim.Optimizer, ema: EMA | None,
          job: dict[str, Any], recent: list[float], write: bool, scaler: LossScaler | None = None) -> None:
    """Gather the full parameters, optimizer state and EMA (collective when the plan shards them); rank 0 writes."""
    assert config.checkpoint_dir is not None
    params = shards.full_named(p for _, p in shards.named)
    ema_state = shards.full_named(ema.shadow) if ema else {}
    optimizer_state = shards.full_optimizer_state(optimizer)
    if not write:
        return
    settings = {"job": job, "loop": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
                "recent_losses": recent, **({"loss_scale": scaler.state()} if scaler else {})}
    save_checkpoint(step_path(config.checkpoint_dir, step), Checkpoint(step, params, ema_state, optimizer_state,
                                                                       settings))
    old = sorted(Path(config.checkpoint_dir).glob("step-*.safetensors"))[:-config.keep_checkpoints]
    for path in old:
        path.unlink(missing_ok=True)


def _restore_params(path: Path, named: list[tuple[str, nn.Parameter]], job: dict[str, Any]) -> Checkpoint:
    checkpoint = load_checkpoint(path)
    saved_job = checkpoint.settings.get("job", {})
    if saved_job != job:
        differ = ", ".join(f"{k}: {saved_job.get(k)!r} there, {job.get(k)!r} here"
                           for k in sorted(set(saved_job) | set(job)) if saved_job.get(k) != job.get(k))
        raise CheckpointError(f"{path} was written by another job ({differ}); resume with the same settings or use "
                              "another --out folder")
    names = {name for name, _ in named}
    if set(checkpoint.model) != names:
        raise CheckpointError(f"{path} holds other parameters than this model trains (e.g. "
                              f"{sorted(set(checkpoint.model) ^ names)[:3]}); use another --out folder")
    with torch.no_grad():
        for name, param in named:
            param.copy_(checkpoint.model[name])
    return checkpoint


def _restore_state(checkpoint: Checkpoint, shards: ShardMap, optimizer: torch.optim.Optimizer,
                   ema: EMA | None) -> None:
    """The optimizer state and EMA of a checkpoint (full tensors), as this rank's parts."""
    params = dict(shards.named)
    if checkpoint.optimizer is not None:
        optimizer.load_state_dict(shards.local_optimizer_state(checkpoint.optimizer, optimizer))
    if ema is not None:
        if not checkpoint.ema:
            raise CheckpointError("the checkpoint has no EMA weights but --ema is on; resume without --ema or start "
                                  "anew")
        ema.load({name: shards.local(name, checkpoint.ema[name], params[name]) for name in ema.names})


class _Progress:
    """A rich progress bar with loss and samples/s, on the reporting process only (to stderr)."""
    def __init__(self, config: LoopConfig, start: int, reporter: bool) -> None:
        self.bar = None
        if not (reporter and config.progress):
            return

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self.task = self.bar.add_task(config.description, total=config.steps, completed=start, loss="-", rate="-")
        self.bar.start()

    def advance(self, step: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
