"""``pase train`` and ``pase finetune``: the diffusion training loop and the fine-tuning strategies.

Both run alone or under ``torchrun --nproc-per-node N -m pase ...`` (gloo on CPU, NCCL on GPU);
rank 0 shows the progress bar, prints the report and writes the outputs. ``--json`` prints the
report as one JSON object whose last keys are strategy, trainable_params, total_params,
grad_and_optimizer_bytes, peak_memory_bytes and final_loss.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pase.cli.console import MAX_BATCH, MAX_SEED, console, finite, size
from pase.errors import PaseError

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Zoo model (see `pase models`), a diffusers "
                                              "pipeline or UNet folder, or package.module:factory; default: the "
                                              "plan's, or unet-tiny.")]
DataOpt = Annotated[str, typer.Option(help="shapes (generated), digits (the UCI 8x8 handwritten digits, shipped, "
                                      "upscaled) or a folder of images; for a text-to-image pipeline folder, images "
                                      "with captions (a .txt beside each, or metadata.jsonl) or a `pase cache` "
                                      "folder.")]
PredictionOpt = Annotated[str | None, typer.Option(help="Text-to-image: epsilon or v_prediction (default: the "
                                                   "pipeline scheduler's).")]
SnrOpt = Annotated[float | None, typer.Option(callback=finite, help="Text-to-image: min-SNR loss weighting with "
                                              "this gamma (5.0 in the paper); default off.")]
NoiseOffsetOpt = Annotated[float, typer.Option(callback=finite, min=0.0, help="Text-to-image: per-channel noise "
                                               "offset, e.g. 0.05.")]
CropOpt = Annotated[bool, typer.Option("--random-crop", help="Text-to-image: crop a random square of each image "
                                        "(else its centre), drawn per image and epoch from --seed.")]
FlipOpt = Annotated[bool, typer.Option("--random-flip", help="Text-to-image: mirror each image with probability 1/2, "
                                       "drawn per image and epoch from --seed.")]
CheckpointingOpt = Annotated[bool, typer.Option("--gradient-checkpointing", help="Re-run each block's forward in "
                                                "backward instead of keeping its activations (less memory, about "
                                                "a third more compute); a plan made with --checkpoint does this "
                                                "by itself.")]
SchedulerOpt = Annotated[str, typer.Option(help="Learning-rate schedule (diffusers' get_scheduler): constant, "
                                           "constant_with_warmup, linear, cosine, cosine_with_restarts or "
                                           "polynomial.")]
WarmupOpt = Annotated[int, typer.Option(min=0, max=2**31, help="Steps of linear learning-rate warm-up.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the earlier run in OUT (its checkpoints, "
                                            "log, validation images and TensorBoard events); without it a used "
                                            "OUT needs --resume.")]
AccumOpt = Annotated[int, typer.Option(min=1, max=2**16, help="Gradient accumulation: micro-steps of --batch per "
                                       "optimizer step (an effective batch of K x --batch; a plan's batch is one "
                                       "micro-step).")]
ClipOpt = Annotated[float, typer.Option(callback=finite, min=0.0, help="Clip the gradients' global norm to this "
                                        "(0: no clipping).")]
PromptOpt = Annotated[list[str] | None, typer.Option("--validation-prompt", help="Text-to-image: a prompt to draw "
                                                    "(repeatable); images go to OUT/validation/ after the last step "
                                                    "and every --validation-every steps.")]
ValidateEveryOpt = Annotated[int, typer.Option(min=0, max=2**31, help="Steps between validation images (0: after the "
                                               "last step only).")]
ReportOpt = Annotated[str, typer.Option(help="Where the run's per-step log goes besides OUT/log.jsonl: none or "
                                        "tensorboard (OUT/tensorboard/).")]
WorkersOpt = Annotated[int, typer.Option(min=0, max=64, help="Text-to-image: DataLoader worker processes per rank "
                                         "reading images or a cache.")]
StepsOpt = Annotated[int, typer.Option(min=1, help="Total optimizer steps (a resumed run continues up to this).")]
BatchOpt = Annotated[int | None, typer.Option("--batch", "-b", min=1, max=MAX_BATCH,
                                              help="Global batch per step (split over the ranks); default: the "
                                                   "plan's, or 16 (train) / 8 (finetune).")]
PlanOpt = Annotated[Path | None, typer.Option("--plan", help="Run under this plan (`pase plan --json`): DP, FSDP, "
                                              "channel/head splits or pipeline stages, launched with torchrun.")]
PrecisionOpt = Annotated[str, typer.Option(help="auto (bf16 autocast on GPUs unless the plan is fp32 or fp16; fp32 "
                                           "on CPU), fp32, bf16, or fp16 (autocast with a dynamic loss scale; also "
                                           "on CPU, slowly).")]
LossScaleOpt = Annotated[float, typer.Option(min=1.0, max=2.0 ** 64, help="fp16: the initial dynamic loss scale "
                                            "(halved on each overflow, whose step is skipped; doubled after 2000 "
                                            "finite steps).")]
OutOpt = Annotated[Path | None, typer.Option(help="Folder for the weights and checkpoints (needed by --resume).")]
InitOpt = Annotated[Path | None, typer.Option(help="Start from these weights (a safetensors state dict, e.g. OUT/"
                                              "model.safetensors of pase train); default: seeded random weights.")]
CountOpt = Annotated[int, typer.Option(min=2, help="Images to generate for --data shapes.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON (stdout) instead of a table.")]


def _model_and_batch(plan: Path | None, model: str | None, batch: int | None, default_batch: int) -> tuple[str, int]:
    """The plan's model and batch (explicit options must agree with them), or the options' with defaults."""
    if plan is None:
        return model or "unet-tiny", batch or default_batch
    from pase.train.planned import job_settings, load_plan

    return job_settings(load_plan(plan), model, batch)


def _numbers(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        numbers = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PaseError(f"{option} {text!r}: write comma-separated numbers, e.g. 0.1,0.1,0.2,0.5") from None
    if not all(math.isfinite(number) for number in numbers):
        raise PaseError(f"{option} {text!r}: every number must be finite (no nan or inf)")
    return numbers


def _print_report(report: dict[str, Any], as_json: bool, predicted: dict[str, Any] | None) -> None:
    if predicted is not None:
        report = {"predicted_memory": predicted, **report}
        # keep the fixed tail last
        tail = {k: report.pop(k) for k in ("strategy", "trainable_params", "total_params", "grad_and_optimizer_bytes",
                                           "peak_memory_bytes", "final_loss")}
        report.update(tail)
    if as_json:
        print(json.dumps(report, indent=1))
        return
    table = Table(title=f"pase {'train' if report['strategy'] == 'train' else 'finetune'}: {report['model']}, "
                        f"strategy {report['strategy']}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for key, value in report.items():
        if key == "predicted_memory":
            continue
        if key.endswith("_bytes"):
            shown = size(value)
        elif isinstance(value, float):
            shown = f"{value:.4g}"
        elif isinstance(value, list) and value and isinstance(value[0], str):
            shown = "\n".join(value)
        else:
            shown = str(value)
        table.add_row(key.replace("_", " "), shown)
    if predicted is not None:
        table.add_section()
        table.add_row("predicted peak (cost model)", f"{size(predicted['total'])}: weights "
                      f"{size(predicted['weights'])}, grads+optimizer {size(predicted['grad_and_optimizer'])}, "
                      f"activations {size(predicted['activations'])}, teacher {size(predicted['teacher'])}")
    console.print(table)


def _predicted(options: Any, strategy: str, world: int) -> dict[str, Any] | None:
    from cost_models import finetune_memory
    from pase.train.memory import model_sizes

    try:
        sizes = model_sizes(options.model, options.batch, options.image_size)
    except PaseError:
        return None
    per_rank = max(1, options.batch // world)
    if strategy in ("train", "full"):
        estimate = finetune_memory.full_finetune(sizes, per_rank, ema=options.ema is not None)
    elif strategy == "tuneqdm":
        estimate = finetune_memory.tuneqdm(sizes, per_rank, options.bits, options.experts, options.input_scales)
    else:
        count = options.ranges if options.range_bounds is None else len(options.range_bounds.split(",")) - 1
        groups = min(world, count)
        estimate = finetune_memory.deme_group(sizes, options.batch, group_size=max(1, world // groups),
                                              adapters=options.adapters, consistency=options.consistency > 0,
                                              ema=options.ema is not None)
    return estimate.to_dict()


def train(
    model: ModelOpt = None,
    data: DataOpt = "shapes",
    data_count: CountOpt = 2048,
    steps: StepsOpt = 200,
    batch: BatchOpt = None,
    lr: Annotated[float, typer.Option(callback=finite, help="AdamW learning rate.")] = 2e-4,
    weight_decay: Annotated[float, typer.Option(callback=finite, help="AdamW weight decay.")] = 0.0,
    ema: Annotated[float | None, typer.Option(help="Keep an EMA of the weights with this decay, e.g. 0.999.",
                                              callback=finite)] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", "--resolution", min=8, max=4096,
                                                   help="Train at this resolution (default: the model's).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the data order, noise and timesteps.")] = 0,
    init: InitOpt = None,
    init_seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the random starting weights.")] = 0,
    out: OutOpt = None,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint every N steps (0: at the end only).")] = 0,
    keep_checkpoints: Annotated[int, typer.Option(min=0, help="Checkpoints kept in OUT (0: all).")] = 2,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in OUT.")] = False,
    overwrite: OverwriteOpt = False,
    plan: PlanOpt = None,
    precision: PrecisionOpt = "auto",
    loss_scale: LossScaleOpt = 2.0 ** 16,
    prediction_type: PredictionOpt = None,
    snr_gamma: SnrOpt = None,
    noise_offset: NoiseOffsetOpt = 0.0,
    random_crop: CropOpt = False,
    random_flip: FlipOpt = False,
    gradient_checkpointing: CheckpointingOpt = False,
    workers: WorkersOpt = 2,
    lr_scheduler: SchedulerOpt = "constant",
    lr_warmup_steps: WarmupOpt = 0,
    max_grad_norm: ClipOpt = 1.0,
    grad_accum: AccumOpt = 1,
    validation_prompt: PromptOpt = None,
    validation_every: ValidateEveryOpt = 0,
    report_to: ReportOpt = "none",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a diffusion UNet (AdamW) on offline data: epsilon loss on images, or for a text-to-image pipeline
    folder the latent loss on captioned images; data parallel (or a plan) under torchrun."""
    from pase.train.distributed import distributed_session
    from pase.train.jobs import JobOptions, run_train

    model, batch = _model_and_batch(plan, model, batch, 16)
    options = JobOptions(plan=plan, precision=precision, loss_scale=loss_scale, model=model, data=data,
                         data_count=data_count,
                         image_size=image_size, steps=steps,
                         batch=batch, lr=lr,
                         weight_decay=weight_decay, ema=ema, seed=seed, out=out, checkpoint_every=checkpoint_every,
                         keep_checkpoints=keep_checkpoints, resume=resume, overwrite=overwrite,
                         progress=not no_progress, init=init,
                         init_seed=init_seed, prediction_type=prediction_type, snr_gamma=snr_gamma,
                         noise_offset=noise_offset, random_crop=random_crop, random_flip=random_flip,
                         gradient_checkpointing=gradient_checkpointing, workers=workers, lr_scheduler=lr_scheduler,
                         lr_warmup_steps=lr_warmup_steps, grad_clip=max_grad_norm or None, grad_accum=grad_accum,
                         validation_prompts=list(validation_prompt or []), validation_every=validation_every,
                         report_to=report_to)
    with distributed_session() as env:
        report = run_train(options, env)
        if env.is_main:
            _print_report(report, as_json, _predicted(options, "train", env.world))


def finetune(
    strategy: Annotated[str, typer.Option(help="full, deme (timestep-decoupled, merged) or tuneqdm (quantized, "
                                          "scales only).")] = "full",
    model: ModelOpt = None,
    data: DataOpt = "shapes",
    data_count: CountOpt = 2048,
    steps: StepsOpt = 100,
    batch: BatchOpt = None,
    lr: Annotated[float, typer.Option(callback=finite, help="AdamW learning rate.")] = 5e-5,
    weight_decay: Annotated[float, typer.Option(callback=finite, help="AdamW weight decay.")] = 0.0,
    ema: Annotated[float | None, typer.Option(callback=finite, help="EMA decay of the trained weights.")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", "--resolution", min=8, max=4096,
                                                   help="Fine-tune at this resolution.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of data order, noise and timesteps.")] = 0,
    init: InitOpt = None,
    init_seed: Annotated[int, typer.Option(min=0, max=MAX_SEED,
                                           help="Seed of the random starting weights (without --init).")] = 0,
    out: OutOpt = None,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint every N steps (0: at the end).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoints in OUT.")] = False,
    overwrite: OverwriteOpt = False,
    ranges: Annotated[int, typer.Option(help="DeMe: number of uniform timestep ranges.")] = 4,
    range_bounds: Annotated[str | None, typer.Option(help="DeMe: explicit bounds, e.g. 0,100,400,1000.")] = None,
    p_global: Annotated[float, typer.Option(help="DeMe: probability of a timestep from all of [0, T).",
                                            callback=finite)] = 0.3,
    antithetic: Annotated[bool, typer.Option("--antithetic", help="DeMe: antithetic timestep pairs.")] = False,
    consistency: Annotated[float, typer.Option(help="DeMe: weight of the consistency loss (0: off).",
                                               callback=finite)] = 1.0,
    adapters: Annotated[bool, typer.Option("--adapters", help="DeMe: identity 1x1 channel projections.")] = False,
    merge_weights: Annotated[str | None, typer.Option(help="DeMe: merge weights, one per range (default: grid "
                                                      "search on held-out loss).")] = None,
    merge_grid: Annotated[str, typer.Option(help="DeMe: values each weight takes in the grid search.")] = "0,0.5,1",
    bits: Annotated[int, typer.Option(help="TuneQDM: 8 or 4 (packed two per byte).")] = 8,
    experts: Annotated[int, typer.Option(help="TuneQDM: timestep experts (scale sets).")] = 2,
    no_input_scales: Annotated[bool, typer.Option("--no-input-scales", help="TuneQDM: output scales only "
                                                  "(the PEQA baseline).")] = False,
    plan: PlanOpt = None,
    precision: PrecisionOpt = "auto",
    loss_scale: LossScaleOpt = 2.0 ** 16,
    prediction_type: PredictionOpt = None,
    snr_gamma: SnrOpt = None,
    noise_offset: NoiseOffsetOpt = 0.0,
    random_crop: CropOpt = False,
    random_flip: FlipOpt = False,
    gradient_checkpointing: CheckpointingOpt = False,
    workers: WorkersOpt = 2,
    lr_scheduler: SchedulerOpt = "constant",
    lr_warmup_steps: WarmupOpt = 0,
    max_grad_norm: ClipOpt = 1.0,
    grad_accum: AccumOpt = 1,
    validation_prompt: PromptOpt = None,
    validation_every: ValidateEveryOpt = 0,
    report_to: ReportOpt = "none",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a UNet: full, DeMe (one fine-tune per timestep range, then a task-vector merge) or TuneQDM."""
    from pase.train.distributed import distributed_session
    from pase.train.jobs import FinetuneOptions, run_finetune

    model, batch = _model_and_batch(plan, model, batch, 8)

    grid = _numbers(merge_grid, "--merge-grid")
    if not grid:
        raise PaseError("--merge-grid needs at least one value, e.g. 0,0.5,1")
    options = FinetuneOptions(plan=plan, precision=precision, loss_scale=loss_scale, model=model, data=data,
                              data_count=data_count,
                              image_size=image_size, steps=steps,
                              batch=batch, lr=lr,
                              weight_decay=weight_decay, ema=ema, seed=seed, out=out,
                              checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite,
                              progress=not no_progress, init=init,
                              init_seed=init_seed, strategy=strategy, ranges=ranges, range_bounds=range_bounds,
                              p_global=p_global, antithetic=antithetic, consistency=consistency, adapters=adapters,
                              merge_weights=_numbers(merge_weights, "--merge-weights"), merge_grid=grid, bits=bits,
                              experts=experts, input_scales=not no_input_scales, prediction_type=prediction_type,
                              snr_gamma=snr_gamma, noise_offset=noise_offset, random_crop=random_crop,
                              random_flip=random_flip, gradient_checkpointing=gradient_checkpointing,
                              workers=workers,
                              lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps,
                              grad_clip=max_grad_norm or None, grad_accum=grad_accum,
                              validation_prompts=list(validation_prompt or []),
                              validation_every=validation_every, report_to=report_to)
    with distributed_session() as env:
        report = run_finetune(options, env)
        if env.is_main:
            _print_report(report, as_json, _predicted(options, strategy, env.world))


def cache(
    model: Annotated[str, typer.Option("--model", "-m", help="A diffusers text-to-image pipeline folder (its "
                                       "tokenizer, text_encoder and vae encode the data).")],
    data: Annotated[Path, typer.Option(help="A folder of images with captions (a .txt beside each, or "
                                       "metadata.jsonl).")],
    out: Annotated[Path, typer.Option(help="The cache folder to write (safetensors shards and cache.json).")],
    image_size: Annotated[int | None, typer.Option("--image-size", "--resolution", min=8, max=4096,
                                                   help="Resolution in pixels (default: the UNet's sample size "
                                                   "times the VAE's factor).")] = None,
    batch: Annotated[int, typer.Option("--batch", "-b", min=1, max=4096, help="Images encoded at once.")] = 8,
    workers: WorkersOpt = 2,
    precision: Annotated[str, typer.Option(help="fp32, or bf16 (GPUs): the encoders' precision.")] = "fp32",
    as_json: JsonOpt = False,
) -> None:
    """Encode captioned images once (VAE latents, text embeddings) into a cache that `pase train --data` reads
    without loading the VAE or the text encoder."""
    import os

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pase.models.zoo import resolve_model
    from pase.process_group import pick_device
    from pase.train.latent_cache import write_cache
    from pase.train.text_jobs import text_cache_settings

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PaseError("pase cache runs as one process; run it once, without torchrun")
    if precision not in ("fp32", "bf16"):
        raise PaseError(f"--precision {precision!r}: choose fp32 or bf16")
    pipeline, resolution = text_cache_settings(resolve_model(model), image_size)
    device = pick_device(0)
    bar = Progress(TextColumn("cache"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console if not as_json else None, transient=as_json)
    with bar:
        task = bar.add_task("cache", total=None)
        manifest = write_cache(pipeline, data, out, resolution, device,
                               torch.bfloat16 if precision == "bf16" else torch.float32, batch, workers=workers,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        print(json.dumps(manifest, indent=1))
        return
    console.print(f"cached {manifest['count']} images at {resolution} px into {out} "
                  f"({len(manifest['shards'])} shard(s); latents {manifest['shapes']['latent_mean']}, text "
                  f"embeddings {manifest['shapes']['encoder_hidden_states']})")


def register(app: typer.Typer) -> None:
    app.command("cache")(cache)
    app.command("train")(train)
    app.command("finetune")(finetune)
