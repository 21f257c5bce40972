"""The jobs behind ``pase train`` and ``pase finetune``: data, model, strategy, the loop, outputs, report.

Each job runs in the current torch.distributed world (``distributed_session``) and takes the two
pluggable pieces of the loop (``parallelize``, ``loader``) so that a plan runtime can run the same
jobs under a plan. Outputs (rank 0 only, atomically): ``OUT/model.safetensors`` (full weights, or
the merged weights for DeMe), ``OUT/model-ema.safetensors`` with ``--ema``, ``OUT/scales.safetensors``
for TuneQDM (scales only), ``OUT/range-R/weights.safetensors`` for DeMe, ``OUT/checkpoints/`` for
``--resume``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from pase import paths
from pase.errors import PaseError
from pase.graph import extract_model
from pase.models import folders
from pase.models.folders import looks_like_folder
from pase.models.zoo import ModelSpec
from pase.planning.plan import Plan
from pase.runtime.state import full_state_dict
from pase.train.captions import Augment
from pase.train.data import LoaderFactory, load_images, split_held_out, step_batches
from pase.train.deme import deme_objective, denoising_score, save_range_weights
from pase.train.deme import train_ranges as train_deme_ranges
from pase.train.distributed import DistEnv
from pase.train.loop import (
    AfterStep,
    DataGroup,
    LoopConfig,
    Objective,
    Parallelize,
    TrainResult,
    default_parallelize,
    epsilon_objective,
    fit,
)
from pase.train.memory import PeakMemory
from pase.train.node_views import check_same_view, describe_view
from pase.train.out_folder import owned_out
from pase.train.planned import PlannedRun, autocast_for, check_plan, job_model, load_plan
from pase.train.run_log import RunLog
from pase.train.text_finetune import encode_held_out, latent_score
from pase.train.text_finetune import split_held_out as split_held_out_items
from pase.train.text_jobs import TextTraining, export_model, is_text_conditioned, text_training
from pase.train.text_to_image import LatentLoss, check_pipeline
from pase.train.validation import Validation
from pase.weights import load_weights_into, save_weights
from strategies import deme, tuneqdm
from strategies.checkpointing import apply_checkpointing, checkpointed_blocks

STRATEGIES = ("full", "deme", "tuneqdm")
REPORT_TAIL = ("strategy", "trainable_params", "total_params", "grad_and_optimizer_bytes", "peak_memory_bytes",
               "final_loss")


@dataclass
class JobOptions:
    model: str = "unet-tiny"
    data: str = "shapes"
    image_size: int | None = None  # default: the model's sample size
    data_count: int = 2048  # generated shapes only
    steps: int = 100
    batch: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema: float | None = None
    grad_clip: float | None = 1.0
    seed: int = 0
    out: Path | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2  # 0: keep every checkpoint
    resume: bool = False
    progress: bool = True
    init: Path | None = None  # pretrained weights (a safetensors state dict); default: seeded random weights
    init_seed: int = 0
    plan: Path | None = None  # run under this plan (pase plan --json); model and batch must match it
    precision: str = "auto"  # auto: bf16 autocast on GPUs, fp32 on CPU; fp16: autocast with a loss scale
    loss_scale: float = 2.0 ** 16  # fp16: the initial dynamic loss scale
    prediction_type: str | None = None  # text-to-image: epsilon or v_prediction (default: the pipeline scheduler's)
    snr_gamma: float | None = None  # text-to-image: min-SNR loss weighting
    noise_offset: float = 0.0  # text-to-image: per-channel noise offset
    random_crop: bool = False  # text-to-image: a random square of each image (else its centre)
    random_flip: bool = False  # text-to-image: mirror half the images
    gradient_checkpointing: bool = False  # re-run blocks in backward instead of keeping their activations
    workers: int = 2  # DataLoader workers reading captioned images or a cache
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    grad_accum: int = 1  # micro-steps of --batch per optimizer step
    validation_prompts: list[str] = field(default_factory=list)  # text-to-image: images of these, under OUT/validation
    validation_every: int = 0  # steps between validations (0: after the last step only)
    report_to: str = "none"  # "tensorboard": scalars and validation images under OUT/tensorboard
    overwrite: bool = False  # replace an earlier run in --out (else it needs --resume)


@dataclass
class FinetuneOptions(JobOptions):
    strategy: str = "full"
    lr: float = 5e-5
    ranges: int = 4
    range_bounds: str | None = None
    p_global: float = 0.3
    antithetic: bool = False
    consistency: float = 1.0
    adapters: bool = False
    merge_weights: list[float] | None = None
    merge_grid: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    bits: int = 8
    experts: int = 2
    input_scales: bool = True


JobOptionsT = TypeVar("JobOptionsT", bound=JobOptions)


def _loop_config(options: JobOptions, description: str, autocast: str | None = None) -> LoopConfig:
    return LoopConfig(steps=options.steps, batch=options.batch, lr=options.lr, weight_decay=options.weight_decay,
                      ema_decay=options.ema, grad_clip=options.grad_clip, seed=options.seed,
                      checkpoint_dir=options.out / "checkpoints" if options.out else None,
                      checkpoint_every=options.checkpoint_every, keep_checkpoints=options.keep_checkpoints,
                      resume=options.resume, progress=options.progress,
                      description=description, autocast=autocast, lr_scheduler=options.lr_scheduler,
                      lr_warmup_steps=options.lr_warmup_steps, grad_accum=options.grad_accum,
                      loss_scale=options.loss_scale)


def _data(options: JobOptions, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, int]:
    sample = spec.inputs[0]
    if len(sample.shape) != 4:
        raise PaseError(f"model {spec.name!r} does not take images (its first input is {sample.shape}); pase train "
                        "needs an image diffusion UNet")
    conditioning = [i.name for i in spec.inputs[2:]]
    if conditioning:
        raise PaseError(f"model {spec.name!r} is conditioned on {', '.join(conditioning)}: pase train and finetune "
                        "train unconditional UNets on images, and the UNets of text-to-image pipeline folders on "
                        "captioned images; `pase plan` and `pase verify` (synthetic conditioning) take it")
    size = options.image_size or int(sample.shape[-1])
    levels = len(spec.config.get("block_out_channels") or ()) or 1
    if size % 2 ** (levels - 1):
        raise PaseError(f"--image-size {size}: {spec.name}'s {levels} levels halve the image {levels - 1} times, so "
                        f"the size must be a multiple of {2 ** (levels - 1)}")
    images = load_images(options.data, size, int(sample.shape[1]), options.data_count, options.seed)
    train, held_out = split_held_out(images, 0.1, options.seed)
    return train, held_out, size


def pretrained_builder(spec: ModelSpec, init: Path | None, init_seed: int, device: torch.device,
                       ) -> Callable[[], nn.Module]:
    """Builds the starting weights again on every call: streamed from ``init``, or seeded random weights."""
    if init is not None and not paths.is_file(init):
        raise PaseError(f"--init {init} is not a file; give a weights file (pase train writes OUT/model.safetensors)")

    def build() -> nn.Module:
        if init is None:
            torch.manual_seed(init_seed)
            return spec.build().to(device)
        with torch.device("meta"):
            model = spec.build()
        model = model.to_empty(device=device)
        load_weights_into(model, init)
        return model

    return build


def warm_imports(spec: ModelSpec, text: bool = False) -> None:
    """Build the model once on the meta device, so the libraries its build imports (diffusers' model
    code; for text-to-image, transformers' CLIP and diffusers' VAE) are loaded before the memory baseline is
    taken and do not count as training memory."""
    with torch.device("meta"):
        spec.build()
    if text:
        import diffusers.training_utils  # noqa: F401, PLC0415
        from diffusers import AutoencoderKL  # noqa: F401, PLC0415
        from transformers import CLIPTextModel  # noqa: F401, PLC0415
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])


def _job_identity(options: JobOptions, strategy: str, **extra: Any) -> dict[str, Any]:
    return {"model": options.model, "strategy": strategy, "data": options.data, "image_size": options.image_size,
            "batch": options.batch, **({"grad_accum": options.grad_accum} if options.grad_accum > 1 else {}),
            "seed": options.seed, "init": str(options.init) if options.init else None,
            "init_seed": options.init_seed, "ema": options.ema, **extra}


def _world_group(env: DistEnv) -> DataGroup:
    return DataGroup(dist.group.WORLD if env.backend else None, env.rank, env.world, env.device, env.is_main)


def _max_over_ranks(value: int, env: DistEnv) -> int:
    if not env.backend:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def _planned(options: JobOptions, env: DistEnv, spec: ModelSpec, strategy: str, parallelize: Parallelize,
             plan: Plan | None) -> tuple[PlannedRun | None, Parallelize, str | None]:
    """The job's plan checked against the world and the model before any work starts (None without --plan),
    the loop's parallelize under it, and the autocast dtype."""
    if options.gradient_checkpointing and strategy == "tuneqdm":
        raise PaseError("--gradient-checkpointing does not run with TuneQDM (its quantized layers keep their own "
                        "activations); leave it out")
    if plan is None:
        if options.gradient_checkpointing:
            parallelize = checkpointing_first(parallelize, spec, options.batch // env.world)
        return None, parallelize, autocast_for(options.precision, env.device, None)
    if options.gradient_checkpointing and not plan.options.get("checkpointing"):
        raise PaseError(f"the plan {options.plan} was made without activation checkpointing, so its time and memory "
                        "assume none; re-plan with `pase plan --checkpoint ...` (whose plans checkpoint by themselves) "
                        "or leave --gradient-checkpointing out")
    if getattr(options, "ema", None) is not None and plan.options.get("ema") is False:  # (older plans: not priced)
        raise PaseError(f"the plan {options.plan} was priced without an EMA, so its memory and step time leave out "
                        "the moving average; re-plan with `pase plan --ema ...` or leave --ema out")
    if plan.stages and options.grad_accum > 1:
        raise PaseError(f"--grad-accum does not combine with the pipeline plan {options.plan}, whose schedule already "
                        f"accumulates over its {plan.microbatches} microbatches; plan the larger batch instead "
                        "(pase plan --batch)")
    planned_px = plan.options.get("resolution")
    if planned_px is not None and options.image_size != planned_px:
        trained = f"{options.image_size} px" if options.image_size else "the model's own size"
        raise PaseError(f"the plan {options.plan} was made for {planned_px} px images (pase plan --resolution) but "
                        f"this job trains at {trained}; train with --resolution {planned_px}, or re-plan")
    planned = check_plan(plan, env, spec, strategy)
    planned.image_size = options.image_size
    autocast = autocast_for(options.precision, env.device, planned.plan)
    return planned, planned.parallelize(autocast), autocast


def with_micro_steps(options: JobOptionsT, plan: Plan | None) -> JobOptionsT:
    """A plan's micro-steps as the job's gradient accumulation: ``--batch`` per micro-step becomes the plan's batch
    over its micro-steps, which ``--grad-accum`` may repeat but not contradict."""
    if plan is None or plan.micro_steps == 1:
        return options
    if options.grad_accum not in (1, plan.micro_steps):
        raise PaseError(f"the plan {options.plan} runs each step as {plan.micro_steps} micro-steps of "
                        f"{plan.micro_batch}; drop --grad-accum {options.grad_accum} (the plan sets it) or re-plan "
                        "with `pase plan --micro-steps N`")
    if options.batch not in (plan.batch, plan.micro_batch):
        raise PaseError(f"the plan was made for a global batch of {plan.batch}, not {options.batch}; drop --batch or "
                        "re-plan")
    return replace(options, batch=plan.micro_batch, grad_accum=plan.micro_steps)


def checkpointing_first(parallelize: Parallelize, spec: ModelSpec, batch_per_rank: int) -> Parallelize:
    """``parallelize`` after wrapping the blocks a ``--checkpoint`` plan would (``strategies.checkpointing``: every
    block whose output alone leaves it) in activation checkpointing; the blocks come from the model's layer graph."""
    if spec.family == "user":
        raise PaseError("--gradient-checkpointing without a plan needs a zoo model or a diffusers folder; for your own "
                        "model make a plan with `pase plan --checkpoint` and train with --plan")
    blocks = checkpointed_blocks(extract_model(spec.name, max(1, batch_per_rank), use_cache=True))

    def apply(model: nn.Module, group: DataGroup) -> nn.Module:
        apply_checkpointing(model, blocks)
        return parallelize(model, group)

    return apply


def _plan_report(planned: PlannedRun | None) -> dict[str, Any]:
    if planned is None:
        return {}
    return {"plan": planned.kind, "plan_predicted_step_seconds": planned.plan.predicted.step_seconds}


def _full_state(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """The weights at full size (gathered from the plan's shards: every rank calls this)."""
    return full_state_dict(model) if env.backend else model.state_dict()


def _save_full(out: Path | None, model: nn.Module, result: TrainResult, metadata: dict[str, str],
               env: DistEnv, spec: ModelSpec | None = None) -> list[str]:
    """The trained weights at full size: a diffusers folder for a folder model (``OUT/unet/``, the pipeline's other
    parts around it, ``OUT/unet-ema/``), else ``OUT/model.safetensors`` (and ``model-ema``)."""
    weights = _full_state(model, env)
    if not (out and env.is_main):
        return []
    if spec is not None and looks_like_folder(spec.name):
        exported = export_model(out, spec, weights)
        if result.ema:
            exported += export_model(out, spec, {**weights, **result.ema}, folder="unet-ema")
        return [str(p) for p in exported if p.parent.name in ("unet", "unet-ema") or p.name == "model_index.json"]
    paths = [save_weights(out / "model.safetensors", weights, metadata)]
    if result.ema:
        state = {**weights, **result.ema}
        paths.append(save_weights(out / "model-ema.safetensors", state, metadata))
    return [str(p) for p in paths]


def _report(options: JobOptions, env: DistEnv, result: TrainResult, memory: PeakMemory, peak: int, strategy: str,
            trainable: int, total: int, grad_and_optimizer: int, outputs: list[str], **extra: Any) -> dict[str, Any]:
    head = {"model": options.model, "data": options.data, "steps": result.steps, "steps_run": result.steps_run,
            "batch": options.batch, "grad_accum": options.grad_accum,
            "gradient_checkpointing": options.gradient_checkpointing, "world_size": env.world,
            "device": str(env.device),
            "step_seconds": result.step_seconds,
            "last_learning_rate": result.learning_rates[-1] if result.learning_rates else None,
            "samples_per_second": result.samples_per_second,
            "initial_loss": sum(result.losses[:10]) / len(result.losses[:10]) if result.losses else None,
            "memory_method": memory.method, "resumed_from": str(result.resumed_from) if result.resumed_from else None,
            "outputs": outputs, **extra}
    tail = {"strategy": strategy, "trainable_params": int(trainable), "total_params": int(total),
            "grad_and_optimizer_bytes": int(grad_and_optimizer), "peak_memory_bytes": int(peak),
            "final_loss": float(result.final_loss)}
    return {**head, **tail}


def run_train(options: JobOptions, env: DistEnv, *, parallelize: Parallelize = default_parallelize,
              loader: LoaderFactory = step_batches) -> dict[str, Any]:
    """Train a model from seeded random weights (or ``--init``, or a folder's own weights): the epsilon loss on
    images, or for a text-to-image pipeline folder the latent loss on captioned images or a cache."""
    plan = load_plan(options.plan) if options.plan else None
    options = with_micro_steps(options, plan)
    spec = job_model(options.model, plan)
    planned, parallelize, autocast = _planned(options, env, spec, "train", parallelize, plan)
    with _owned(options, env):  # after the checks: a refused run leaves no --out behind
        return _fit_whole_model(options, env, spec, planned, parallelize, loader, autocast, "train",
                                f"train {_short(options.model)}")


def _owned(options: JobOptions, env: DistEnv) -> contextlib.AbstractContextManager[None]:
    """This job's hold on --out for its whole run (pase.train.out_folder), once every rank is known to read the same
    --init and --resume files (pase.train.node_views)."""
    check_same_view(describe_view(options.out, options.init, options.resume), distributed=bool(env.backend))
    return owned_out(options.out, options.resume, options.overwrite, env.is_main, distributed=bool(env.backend))


def _fit_whole_model(options: JobOptions, env: DistEnv, spec: ModelSpec, planned: PlannedRun | None,
                     parallelize: Parallelize, loader: LoaderFactory, autocast: str | None, strategy: str,
                     description: str) -> dict[str, Any]:
    """Every weight trained (``pase train``, ``pase finetune --strategy full``); full weights saved."""
    text = is_text_conditioned(spec)
    if options.validation_prompts and not text:
        raise PaseError("--validation-prompt makes images with a text-to-image pipeline; give a pipeline folder as "
                        "--model, or leave --validation-prompt out")
    if options.validation_every and not options.validation_prompts:
        raise PaseError("--validation-every needs at least one --validation-prompt")
    if (options.random_crop or options.random_flip) and not text:
        raise PaseError("--random-crop and --random-flip apply to captioned images for a text-to-image pipeline "
                        f"folder; {spec.name} trains on --data {options.data} without them")
    run_log = RunLog(options.out, options.report_to, active=env.is_main)
    dataset: Any = None if text else _data(options, spec)[0]
    warm_imports(spec, text)
    memory = PeakMemory(env.device).start()  # the frozen encoders are part of what the job holds
    objective = epsilon_objective()
    identity = _job_identity(options, strategy)
    if text:
        job = _text_job(options, spec, env, autocast)
        dataset, loader, objective = job.dataset, job.loader, job.objective
        identity.update(job.identity)
    hooks: list[AfterStep] = [run_log]
    validation = None
    if options.validation_prompts:
        unet, pipeline = folders.unet_folder(spec.name)
        validation = Validation(unet, check_pipeline(pipeline, spec.name), options.validation_prompts,
                                options.validation_every, options.steps, job.resolution, options.out, run_log,
                                env.device, options.seed, env.is_main, distributed=bool(env.backend))
        hooks.append(validation)
    model = pretrained_builder(spec, options.init, options.init_seed, env.device)()
    total = sum(p.numel() for p in model.parameters())
    try:
        result = fit(model, objective, dataset, _loop_config(options, description, autocast),
                     group=_world_group(env), parallelize=parallelize, loader=loader, job=identity, after_step=hooks)
    finally:
        run_log.close()
    peak = _max_over_ranks(memory.stop(), env)
    outputs = _save_full(options.out, model, result, {"pase_model": options.model}, env, spec)
    if run_log.path is not None and run_log.path.is_file():
        outputs.append(str(run_log.path))
    if validation is not None:
        outputs += [str(path) for path in validation.saved]
    return _report(options, env, result, memory, peak, strategy, result.trainable_params, total,
                   result.grad_and_optimizer_bytes, outputs, **_plan_report(planned))


def _text_job(options: JobOptions, spec: ModelSpec, env: DistEnv, autocast: str | None) -> TextTraining:
    """The streamed captioned data (or cache) and latent objective of a text-to-image job; the frozen encoders in
    the training precision."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16 if env.device.type == "cuda" else
             torch.float32}.get(autocast or "", torch.float32)
    return text_training(spec, options.data, options.image_size, LatentLoss(options.prediction_type,
                         options.snr_gamma, options.noise_offset), env.device, dtype, options.workers,
                         Augment(options.random_crop, options.random_flip))


def _short(model: str) -> str:
    """A model's name for a progress bar: a folder's last part."""
    return Path(model).name if looks_like_folder(model) else model


def run_finetune(options: FinetuneOptions, env: DistEnv, *, parallelize: Parallelize = default_parallelize,
                 loader: LoaderFactory = step_batches) -> dict[str, Any]:
    """Fine-tune with one strategy; the report ends with REPORT_TAIL's keys."""
    if options.strategy not in STRATEGIES:
        raise PaseError(f"unknown --strategy {options.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    plan = load_plan(options.plan) if options.plan else None
    options = with_micro_steps(options, plan)
    spec = job_model(options.model, plan)
    planned, planned_parallelize, autocast = _planned(options, env, spec, options.strategy, parallelize, plan)
    if options.strategy != "full":
        _check_strategy_options(options, spec)
    with _owned(options, env):  # after the checks: a refused run leaves no --out behind
        return _finetune(options, env, spec, planned, planned_parallelize, parallelize, loader, autocast)


def _finetune(options: FinetuneOptions, env: DistEnv, spec: ModelSpec, planned: PlannedRun | None,
              planned_parallelize: Parallelize, parallelize: Parallelize, loader: LoaderFactory,
              autocast: str | None) -> dict[str, Any]:
    if options.strategy == "full":
        return _fit_whole_model(options, env, spec, planned, planned_parallelize, loader, autocast, "full",
                                f"fine-tune {_short(options.model)} (full)")
    text = is_text_conditioned(spec)
    images = None if text else _data(options, spec)
    warm_imports(spec, text)
    memory = PeakMemory(env.device).start()  # the frozen encoders are part of what the job holds
    if text:
        job = _text_job(options, spec, env, autocast)
        data = FinetuneData(job.dataset, None, job.loader, job)
        if options.strategy == "deme":
            data.train, data.held_out = split_held_out_items(job.dataset, options.seed)
    else:
        assert images is not None
        data = FinetuneData(images[0], images[1], loader)
    if options.strategy == "tuneqdm":
        # check_plan admits only data-parallel plans for TuneQDM: they run as the job's own DDP, which
        # tolerates the experts that get no gradient in a step (find_unused_parameters)
        report = _finetune_tuneqdm(options, env, spec, data, parallelize, memory, autocast)
    else:
        report = _finetune_deme(options, env, spec, data, planned_parallelize, memory, autocast,
                                single_group=planned is not None)
    head = {k: v for k, v in report.items() if k not in REPORT_TAIL}
    return {**head, **_plan_report(planned), **{k: report[k] for k in REPORT_TAIL}}


@dataclass
class FinetuneData:
    """A DeMe or TuneQDM job's data: images in memory, or a text-to-image job's streamed captioned data (``text``)."""
    train: Any
    held_out: Any  # DeMe's merge is scored on it (None for TuneQDM on captioned data)
    loader: LoaderFactory
    text: TextTraining | None = None


def _check_strategy_options(options: FinetuneOptions, spec: ModelSpec) -> None:
    """Options DeMe and TuneQDM do not run are refused by name, not ignored."""
    name = "DeMe" if options.strategy == "deme" else "TuneQDM"
    if options.validation_prompts or options.report_to != "none":
        raise PaseError(f"--validation-prompt and --report-to run with --strategy full; {name} reports its losses in "
                        "the job's summary (and --json)")
    if not is_text_conditioned(spec) and (options.random_crop or options.random_flip):
        raise PaseError("--random-crop and --random-flip apply to captioned images for a text-to-image pipeline "
                        f"folder; {spec.name} fine-tunes on --data {options.data} without them")
    if options.strategy != "deme":
        return
    if options.antithetic and is_text_conditioned(spec):
        raise PaseError("--antithetic pairs timesteps within a batch, but captioned data draws each sample's timestep "
                        "from the sample's own seed (so 1 and N processes train alike); leave --antithetic out")
    if options.adapters and looks_like_folder(spec.name):
        raise PaseError("--adapters add 1x1 layers that a diffusers UNet config cannot describe, so the merged UNet "
                        f"would not load with from_pretrained; leave --adapters out for the folder {spec.name}")


def _finetune_tuneqdm(options: FinetuneOptions, env: DistEnv, spec: ModelSpec, data: FinetuneData,
                      parallelize: Parallelize, memory: PeakMemory, autocast: str | None = None) -> dict[str, Any]:
    steps = int(data.text.scheduler.config.num_train_timesteps) if data.text else 1000
    config = tuneqdm.TuneQDMConfig(options.bits, options.experts, steps, train_input_scales=options.input_scales)
    if options.init is not None:  # stream: quantize each float weight as it is read, never the whole float model
        with torch.device("meta"):
            model = spec.build()
        tuneqdm.quantize_model(model, config)
        model = model.to_empty(device=env.device)
        tuneqdm.load_quantized_weights(model, options.init)
    else:
        model = pretrained_builder(spec, None, options.init_seed, env.device)()
        tuneqdm.quantize_model(model, config)
    identity = _job_identity(options, "tuneqdm", bits=options.bits, experts=options.experts,
                             input_scales=options.input_scales, **(data.text.identity if data.text else {}))
    objective = data.text.objective_with(order_by_timestep=True) if data.text else \
        epsilon_objective(sort_timesteps=True)
    result = fit(model, objective, data.train,
                 _loop_config(options, f"fine-tune {_short(options.model)} (TuneQDM {options.bits}-bit, "
                                       f"{options.experts} experts)", autocast),
                 group=_world_group(env), parallelize=partial(parallelize, find_unused_parameters=True)
                 if parallelize is default_parallelize else parallelize, loader=data.loader,
                 param_groups=tuneqdm.expert_param_groups(model), job=identity)
    peak = _max_over_ranks(memory.stop(), env)
    outputs = []
    if options.out and env.is_main:
        outputs.append(str(tuneqdm.save_scales(options.out / "scales.safetensors", model,
                                               {"model": options.model, "init": str(options.init)})))
    return _report(options, env, result, memory, peak, "tuneqdm", result.trainable_params,
                   tuneqdm.weight_count(model), result.grad_and_optimizer_bytes, outputs, bits=options.bits,
                   experts=options.experts)


def _finetune_deme(options: FinetuneOptions, env: DistEnv, spec: ModelSpec, data: FinetuneData,
                   parallelize: Parallelize, memory: PeakMemory, autocast: str | None = None,
                   single_group: bool = False) -> dict[str, Any]:
    text = data.text
    steps = int(text.scheduler.config.num_train_timesteps) if text else 1000
    ranges = deme.parse_bounds(options.range_bounds, steps) if options.range_bounds else \
        deme.uniform_ranges(options.ranges, steps)
    config = deme.DeMeConfig(ranges, options.p_global, options.antithetic, options.consistency, options.adapters,
                             steps)
    if options.merge_weights is not None and len(options.merge_weights) != len(ranges):
        raise PaseError(f"--merge-weights has {len(options.merge_weights)} value(s) for {len(ranges)} ranges; give "
                        "one per range, e.g. 0.1,0.1,0.2,0.5 for four")
    build = pretrained_builder(spec, options.init, options.init_seed, env.device)
    identity = _job_identity(options, "deme", ranges=[list(r) for r in ranges], p_global=options.p_global,
                             antithetic=options.antithetic, consistency=options.consistency, adapters=options.adapters,
                             **(text.identity if text else {}))

    def latent_range_objective(teacher: nn.Module | None, sampler: deme.RangeSampler,
                               consistency: float) -> Objective:
        assert text is not None
        return text.objective_with(timesteps=sampler.sample, teacher=teacher, consistency=consistency)

    results, tuned, layout = train_deme_ranges(build, data.train, config, _loop_config(options, "DeMe", autocast),
                                               env, parallelize=parallelize, loader=data.loader, job=identity,
                                               single_group=single_group,
                                               objective_for=latent_range_objective if text else deme_objective)
    peak = _max_over_ranks(memory.stop(), env)
    first = results[min(results)]
    report_extra: dict[str, Any] = {"ranges": [list(r) for r in ranges],
                                    "groups": [list(g) for g in layout.groups]}
    outputs: list[str] = []
    if env.is_main:
        base_model = build()
        if options.adapters:
            deme.add_channel_projections(base_model)
        base = {k: v.detach().to("cpu").clone() for k, v in base_model.state_dict().items()}
        vectors = deme.task_vectors(base, [tuned[i] for i in range(len(ranges))])
        if text:
            score = latent_score(base_model, encode_held_out(data.held_out, text.encode, options.batch),
                                 text.scheduler, text.loss, batch=options.batch, seed=options.seed + 1,
                                 device=env.device)
        else:
            score = denoising_score(base_model, data.held_out, batch=options.batch, seed=options.seed + 1,
                                    device=env.device)
        if options.merge_weights is not None:
            weights = tuple(options.merge_weights)
        else:
            grid = deme.grid_search(base, vectors, options.merge_grid, score)
            weights = grid.weights
            report_extra["grid_candidates"] = len(grid.scores)
        merged = deme.merge(base, vectors, weights)
        report_extra["merge_weights"] = list(weights)
        report_extra["held_out_items"] = len(data.held_out)
        report_extra["held_out_loss_pretrained"] = score(base)
        report_extra["held_out_loss_merged"] = score(merged)
        report_extra["range_losses"] = [results[i].final_loss for i in sorted(results)]
        if options.out:
            outputs = [str(p) for p in save_range_weights(options.out, tuned)]
            if looks_like_folder(spec.name):  # the merged UNet as diffusers writes it, in its pipeline
                outputs += [str(p) for p in export_model(options.out, spec, merged)
                            if p.parent.name == "unet" or p.name == "model_index.json"]
            else:
                outputs.append(str(save_weights(options.out / "model.safetensors", merged,
                                                {"pase_model": options.model,
                                                 "pase_deme_weights": str(list(weights))})))
        del base_model
    total = sum(v.numel() for v in tuned[min(tuned)].values() if v.is_floating_point()) if tuned else 0
    return _report(options, env, first, memory, peak, "deme", first.trainable_params, total or first.trainable_params,
                   first.grad_and_optimizer_bytes, outputs, **report_extra)
