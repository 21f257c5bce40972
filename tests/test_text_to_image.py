"""Text-to-image training from a diffusers pipeline folder: captions, frozen encoders, latents, the cache, outputs.

Every run uses a tiny SD-1.x-style pipeline built and saved here (``pase.models.tiny_pipeline``: a CLIP text
encoder, a VAE, a cross-attention UNet and a DDPM scheduler, saved with ``save_pretrained``) and PNGs of
coloured shapes captioned with what they show.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_sd_cases import max_rel, torchrun_pase
from typer.testing import CliRunner

from pase.cli import app
from pase.errors import PaseError
from pase.models.tiny_pipeline import save_captioned_shapes, save_tiny_pipeline
from pase.models.zoo import resolve_model
from pase.train.captions import Augment, CaptionedImages, find_captioned
from pase.train.data import DataError
from pase.train.distributed import DistEnv
from pase.train.jobs import JobOptions, run_train
from pase.train.latent_cache import LatentCache, write_cache
from pase.train.streaming import batch_indices, row_seed
from pase.train.text_jobs import text_training
from pase.train.text_to_image import (
    FrozenEncoders,
    LatentLoss,
    TextToImageError,
    Tokenize,
    check_pipeline,
    latent_objective,
    noise_scheduler,
)
from pase.train.validation import INFERENCE_STEPS

REPO = Path(__file__).parent.parent
PROFILE = REPO / "tests" / "fixtures" / "calibration" / "cpu_gloo_2.json"
SINGLE = DistEnv(0, 1, 0, torch.device("cpu"), None)
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-sd")
    return {"pipeline": save_tiny_pipeline(root / "pipeline"), "images": save_captioned_shapes(root / "images", 16),
            "metadata": save_captioned_shapes(root / "metadata", 8, seed=1, metadata=True), "root": root,
            "xl": save_tiny_pipeline(root / "xl", seed=2, xl=True)}


def _options(tiny_sd: dict[str, Path], out: Path | None, **changes) -> JobOptions:
    settings = {"model": str(tiny_sd["pipeline"]), "data": str(tiny_sd["images"]), "steps": 3, "batch": 4,
                "lr": 1e-3, "out": out, "progress": False, "workers": 0}
    return JobOptions(**{**settings, **changes})


def test_captions_come_from_txt_files_or_metadata_jsonl(tiny_sd) -> None:
    for folder, count in ((tiny_sd["images"], 16), (tiny_sd["metadata"], 8)):
        items = find_captioned(folder)
        assert len(items) == count and all(item.path.suffix == ".png" for item in items)
        words = [item.caption.split() for item in items]
        assert all(w[0] == "a" and w[2] in ("disc", "square") and w[-1] == "background" for w in words)
        assert len({item.caption for item in items}) > 1


def test_missing_captions_and_bad_metadata_are_named(tiny_sd, tmp_path) -> None:
    images = shutil.copytree(tiny_sd["images"], tmp_path / "images")
    (images / "0003.txt").unlink()
    with pytest.raises(DataError, match=r"1 of 16 images .* no caption .*0003.png"):
        find_captioned(images)
    metadata = shutil.copytree(tiny_sd["metadata"], tmp_path / "metadata")
    lines = (metadata / "metadata.jsonl").read_text().splitlines()
    (metadata / "metadata.jsonl").write_text("\n".join([lines[0], "{not json", *lines[2:]]))
    with pytest.raises(DataError, match="line 2 is not JSON"):
        find_captioned(metadata)
    (metadata / "metadata.jsonl").write_text(json.dumps({"file_name": "../images/0000.png", "text": "x"}))
    with pytest.raises(DataError, match="not a file inside"):
        find_captioned(metadata)


def test_pipelines_without_their_parts_are_refused(tiny_sd, tmp_path) -> None:
    with pytest.raises(TextToImageError, match="without its pipeline"):
        check_pipeline(None, "sd15-unet")
    sdxl = shutil.copytree(tiny_sd["xl"], tmp_path / "sdxl")
    assert check_pipeline(sdxl, str(sdxl)) == sdxl
    shutil.rmtree(sdxl / "tokenizer_2")
    with pytest.raises(TextToImageError, match="no tokenizer_2"):
        check_pipeline(sdxl, str(sdxl))
    shutil.rmtree(sdxl / "vae")
    with pytest.raises(TextToImageError, match="no vae, tokenizer_2"):
        check_pipeline(sdxl, str(sdxl))
    result = CliRunner().invoke(app, ["train", "--model", "sd15-unet", "--steps", "1"])
    assert isinstance(result.exception, PaseError) and "give the pipeline folder" in str(result.exception)


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_the_encoders_give_what_the_pipeline_itself_encodes(tiny_sd, tmp_path, xl) -> None:
    from diffusers import DiffusionPipeline

    folder = tiny_sd["xl" if xl else "pipeline"]
    images = save_captioned_shapes(tmp_path / "images", 3, size=16, seed=4)
    Image.new("RGB", (24, 16), (200, 30, 30)).save(images / "wide.png")  # landscape: resized, then cropped
    (images / "wide.txt").write_text("a wide red picture")
    items = find_captioned(images)
    data = CaptionedImages(items, 16, Tokenize(folder))
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    encoded = FrozenEncoders(folder, torch.device("cpu"))(batch)
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    prompts = [item.caption for item in items]
    want = pipeline.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(encoded["encoder_hidden_states"], want[0])
    if xl:
        torch.testing.assert_close(encoded["text_embeds"], want[2])
        wide = [i for i, item in enumerate(items) if item.path.name == "wide.png"][0]
        assert encoded["time_ids"][wide].tolist() == [16, 24, 0, 4, 16, 16]  # original h, w; crop top, left; target
    latents = pipeline.vae.encode(batch["pixel_values"]).latent_dist
    scale = pipeline.vae.config.scaling_factor
    torch.testing.assert_close(encoded["latent_mean"], latents.mean * scale)
    torch.testing.assert_close(encoded["latent_std"], latents.std * scale)


class _Zeros(torch.nn.Module):
    """A stand-in network that predicts zeros, so that the loss is the weighted mean square of the target."""
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(sample)


@pytest.mark.parametrize(("prediction_type", "snr_gamma", "noise_offset"),
                         [("epsilon", None, 0.0), ("epsilon", 5.0, 0.1), ("v_prediction", 5.0, 0.0)])
def test_the_objective_follows_the_scheduler_and_min_snr_formulas(tiny_sd, prediction_type, snr_gamma,
                                                                  noise_offset) -> None:
    scheduler = noise_scheduler(tiny_sd["pipeline"])
    batch = {"latent_mean": torch.randn(6, 4, 8, 8), "latent_std": torch.rand(6, 4, 8, 8) * 0.1,
             "encoder_hidden_states": torch.randn(6, 16, 32)}
    loss = latent_objective(scheduler, LatentLoss(prediction_type, snr_gamma, noise_offset))
    got = float(loss(_Zeros(), batch, torch.Generator().manual_seed(3)))
    # the same draws, in the order the objective documents, and the formulas written out
    generator = torch.Generator().manual_seed(3)
    latents = batch["latent_mean"] + batch["latent_std"] * torch.randn(6, 4, 8, 8, generator=generator)
    noise = torch.randn(6, 4, 8, 8, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(6, 4, 1, 1, generator=generator)
    t = torch.randint(0, 1000, (6,), generator=generator)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    per_sample = (target**2).mean(dim=(1, 2, 3))
    if snr_gamma is None:
        want = per_sample.mean()
    else:
        snr = (abar / (1 - abar)).flatten()
        weights = snr.clamp(max=snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        want = (per_sample * weights).mean()
    assert got == pytest.approx(float(want), rel=1e-5)


def test_per_sample_seeds_make_the_loss_independent_of_how_the_batch_is_split(tiny_sd) -> None:
    scheduler = noise_scheduler(tiny_sd["pipeline"])
    batch = {"latent_mean": torch.randn(4, 4, 8, 8), "latent_std": torch.rand(4, 4, 8, 8) * 0.1,
             "encoder_hidden_states": torch.randn(4, 16, 32), "seeds": torch.tensor([row_seed(0, 7, i) for i in
                                                                                      (5, 1, 9, 2)])}
    loss = latent_objective(scheduler, LatentLoss("epsilon", 5.0, 0.05))
    whole = float(loss(_Zeros(), batch, torch.Generator().manual_seed(0)))
    halves = [float(loss(_Zeros(), {k: v[rows] for k, v in batch.items()}, torch.Generator().manual_seed(r)))
              for r, rows in enumerate((slice(0, 2), slice(2, 4)))]  # two ranks, each with its own generator
    assert whole == pytest.approx(sum(halves) / 2, rel=1e-6)


def test_the_batch_schedule_walks_distributed_sampler_epochs_and_resumes_mid_epoch() -> None:
    data = list(range(10))  # 10 items, 2 ranks, 2 per rank: 2 steps per epoch (the remainder dropped)

    def steps(rank: int, start: int, count: int) -> list[list[int]]:
        schedule = batch_indices(data, 2, rank, 2, seed=5, start_step=start)
        return [next(schedule) for _ in range(count)]

    full = [steps(rank, 0, 6) for rank in (0, 1)]
    for rank in (0, 1):
        assert steps(rank, 3, 3) == full[rank][3:]  # resumed at step 3 (mid epoch 1): the same batches
    for epoch in range(3):
        seen = [i for rank in (0, 1) for step in full[rank][2 * epoch:2 * epoch + 2] for i in step]
        assert len(seen) == len(set(seen)) == 8  # an epoch hands each item out at most once
    assert full[0][0:2] != full[0][2:4]  # the epoch advances: a new order


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_training_from_a_cache_equals_training_from_images(tiny_sd, tmp_path, xl) -> None:
    folder = tiny_sd["xl" if xl else "pipeline"]
    cache = tmp_path / "cache"
    manifest = write_cache(folder, tiny_sd["images"], cache, 16, torch.device("cpu"), batch=5, shard_items=6,
                           workers=0)
    assert manifest["count"] == 16 and [s["count"] for s in manifest["shards"]] == [10, 6]
    assert LatentCache(cache).shape("latent_mean") == (4, 8, 8)
    assert ("text_embeds" in manifest["shapes"]) == xl
    from_images = run_train(_options(tiny_sd, tmp_path / "images", model=str(folder), workers=2), SINGLE)
    from_cache = run_train(_options(tiny_sd, tmp_path / "cached", model=str(folder), data=str(cache)), SINGLE)
    assert from_cache["final_loss"] == pytest.approx(from_images["final_loss"], rel=1e-5)
    got, want = (load_file(tmp_path / run / UNET_WEIGHTS) for run in ("cached", "images"))
    assert max_rel(got, want) < 1e-4  # AdamW steps amplify the encoders' batch-size rounding (~1e-7)
    start = load_file(folder / UNET_WEIGHTS)
    assert max_rel(want, start) > 1e-4  # and training changed the weights
    other = tiny_sd["pipeline" if xl else "xl"]
    with pytest.raises(DataError, match="SDXL's pooled text"):  # a cache of the other kind does not fit
        text_training(resolve_model(str(other)), str(cache), None, LatentLoss(), torch.device("cpu"))
    if xl:  # the output is an SDXL pipeline folder
        from diffusers import StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline.from_pretrained(tmp_path / "images", local_files_only=True)
        image = pipeline("a red disc", num_inference_steps=2, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images
        assert image.shape == (1, 16, 16, 3)


def test_a_cache_that_does_not_fit_the_model_is_refused(tiny_sd, tmp_path) -> None:
    cache = tmp_path / "cache"
    write_cache(tiny_sd["pipeline"], tiny_sd["metadata"], cache, 16, torch.device("cpu"), workers=0)
    spec = resolve_model(str(tiny_sd["pipeline"]))
    with pytest.raises(DataError, match="not --image-size 32"):
        text_training(spec, str(cache), 32, LatentLoss(), torch.device("cpu"))
    with pytest.raises(DataError, match="--random-flip need the images"):
        text_training(spec, str(cache), None, LatentLoss(), torch.device("cpu"), augment=Augment(random_flip=True))
    manifest = json.loads((cache / "cache.json").read_text())
    manifest["shapes"]["encoder_hidden_states"] = [16, 64]
    (cache / "cache.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="does not fit"):
        text_training(spec, str(cache), None, LatentLoss(), torch.device("cpu"))
    (cache / "cache.json").write_text("{")
    with pytest.raises(DataError, match="cannot read the cache manifest"):
        text_training(spec, str(cache), None, LatentLoss(), torch.device("cpu"))


def test_the_output_folder_loads_as_a_pipeline_and_resume_continues_exactly(tiny_sd, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    straight = run_train(_options(tiny_sd, tmp_path / "straight", steps=4, checkpoint_every=2), SINGLE)
    run_train(_options(tiny_sd, tmp_path / "resumed", steps=2, checkpoint_every=2), SINGLE)
    resumed = run_train(_options(tiny_sd, tmp_path / "resumed", steps=4, checkpoint_every=2, resume=True), SINGLE)
    assert resumed["steps_run"] == 2 and resumed["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-6)
    assert max_rel(load_file(tmp_path / "resumed" / UNET_WEIGHTS), load_file(tmp_path / "straight" / UNET_WEIGHTS)) \
        < 1e-6
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "straight", local_files_only=True)
    image = pipeline("a red disc on a blue background", num_inference_steps=2, height=16, width=16,
                     output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and float(image.std()) > 0


def test_gradient_accumulation_trains_as_the_larger_batch_and_resumes(tiny_sd, tmp_path) -> None:
    """K micro-steps of B read the rows and draw the noise of one step of K*B (per-sample seeds by epoch)."""
    large = run_train(_options(tiny_sd, tmp_path / "large", steps=2, batch=8), SINGLE)
    run_train(_options(tiny_sd, tmp_path / "accum", steps=1, batch=4, grad_accum=2, checkpoint_every=1), SINGLE)
    accum = run_train(_options(tiny_sd, tmp_path / "accum", steps=2, batch=4, grad_accum=2, resume=True), SINGLE)
    assert accum["grad_accum"] == 2 and accum["steps_run"] == 1
    assert accum["final_loss"] == pytest.approx(large["final_loss"], rel=1e-5)
    assert max_rel(load_file(tmp_path / "accum" / UNET_WEIGHTS), load_file(tmp_path / "large" / UNET_WEIGHTS)) < 1e-4
    with pytest.raises(PaseError, match="grad_accum: 2 there, None here"):  # a resume keeps the accumulation
        run_train(_options(tiny_sd, tmp_path / "accum", steps=3, batch=4, resume=True), SINGLE)


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_validation_images_and_the_run_log_follow_training_and_resume(tiny_sd, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, prompts = tmp_path / "run", ["a red square on a white background", "a blue disc"]
    options = _options(tiny_sd, out, steps=4, checkpoint_every=2, validation_prompts=prompts, validation_every=2,
                       report_to="tensorboard")
    report = run_train(options, SINGLE)
    shown = [out / "validation" / f"step-{step:08d}.png" for step in (2, 4)]
    assert all(str(path) in report["outputs"] for path in shown) and str(out / "log.jsonl") in report["outputs"]
    after_two, after_four = (_png(path) for path in shown)
    assert after_four.shape == (16, 2 * 16, 3) and np.abs(after_four - after_two).max() > 0  # training changed them
    pipeline = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)  # the saved weights draw the same
    pipeline.set_progress_bar_config(disable=True)
    again = pipeline(prompts, num_inference_steps=INFERENCE_STEPS, height=16, width=16, output_type="np",
                     generator=torch.Generator().manual_seed(options.seed)).images
    assert np.abs(np.concatenate(list(again), axis=1) * 255 - after_four).max() <= 1

    # a run killed after logging step 4 but before saving it resumes from step 2: steps 3-4 are logged once
    (out / "checkpoints" / "step-00000004.safetensors").unlink()
    resumed = run_train(dataclasses.replace(options, resume=True), SINGLE)
    assert resumed["steps_run"] == 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert resumed["final_loss"] == pytest.approx(sum(r["loss"] for r in records) / 4, rel=1e-6)  # the last 10
    assert records[-1]["learning_rate"] == pytest.approx(options.lr) and records[0]["samples_per_second"] > 0
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records])
    assert [e.step for e in events.Images("validation")] == [2, 4]


def test_validation_and_reporting_settings_are_checked(tiny_sd, tmp_path) -> None:
    with pytest.raises(PaseError, match="--validation-every needs at least one --validation-prompt"):
        run_train(_options(tiny_sd, tmp_path, validation_every=2), SINGLE)
    with pytest.raises(PaseError, match="--validation-prompt makes images with a text-to-image pipeline"):
        run_train(JobOptions(model="unet-tiny", steps=1, batch=2, progress=False, validation_prompts=["x"]), SINGLE)
    with pytest.raises(PaseError, match="--report-to 'wandb': choose one of none, tensorboard"):
        run_train(_options(tiny_sd, tmp_path, report_to="wandb"), SINGLE)
    with pytest.raises(PaseError, match="--report-to tensorboard writes under --out"):
        run_train(_options(tiny_sd, None, report_to="tensorboard"), SINGLE)


def test_pase_cache_cli_writes_a_manifest(tiny_sd, tmp_path) -> None:
    result = CliRunner().invoke(app, ["cache", "--model", str(tiny_sd["pipeline"]), "--data", str(tiny_sd["metadata"]),
                                      "--out", str(tmp_path / "cache"), "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert manifest["count"] == 8 and manifest["resolution"] == 16
    assert manifest["shapes"] == {"latent_mean": [4, 8, 8], "latent_std": [4, 8, 8],
                                  "encoder_hidden_states": [16, 32]}
    again = CliRunner().invoke(app, ["cache", "--model", str(tiny_sd["pipeline"]), "--data", str(tiny_sd["metadata"]),
                                     "--out", str(tmp_path / "cache")])
    assert isinstance(again.exception, PaseError) and "already holds a cache" in str(again.exception)


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("kind", "only"), [
    pytest.param("pipeline", "dp", marks=pytest.mark.slow),
    pytest.param("pipeline", "tensor", marks=pytest.mark.slow),  # 22 s; pipelines run in tests/test_pipeline_runtime.py
    pytest.param("xl", "tensor", marks=pytest.mark.slow)])
def test_two_processes_under_a_plan_match_one_process(tiny_sd, tmp_path, kind, only) -> None:
    plan = tmp_path / "plan.json"
    planned = CliRunner().invoke(app, ["plan", "--model", str(tiny_sd[kind]), "--cluster", "local", "--devices",
                                       "2", "--batch", "4", "--only", only, "--profile", str(PROFILE), "--json",
                                       str(plan)])
    assert planned.exit_code == 0, planned.output
    prompt = "a green triangle"
    single = run_train(_options(tiny_sd, tmp_path / "single", model=str(tiny_sd[kind]), steps=2, batch=8,
                                validation_prompts=[prompt], validation_every=1), SINGLE)
    # the plan's batch of 4 twice per step (gradient accumulation, reduced once) trains as one process's batch of 8
    report = torchrun_pase("train", "--plan", str(plan), "--data", str(tiny_sd["images"]), "--steps", "2", "--lr",
                           "1e-3", "--workers", "1", "--out", str(tmp_path / "two"), "--no-progress", "--json",
                           "--grad-accum", "2", "--validation-prompt", prompt, "--validation-every", "1")
    assert report["world_size"] == 2 and report["plan"] == only
    assert report["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
    got, want = (load_file(tmp_path / run / UNET_WEIGHTS) for run in ("two", "single"))
    # full tensors saved (not a rank's shards), equal to one process's; the gradients add up in another order, and
    # AdamW's normalised step turns that into up to 4e-4 of a tiny tensor's norm (a norm bias near 0, seen here)
    assert max_rel(got, want) < 1e-3
    for step in (1, 2):  # validation draws with the whole gathered UNet, as one process does
        png = Path("validation") / f"step-{step:08d}.png"
        assert np.abs(_png(tmp_path / "two" / png) - _png(tmp_path / "single" / png)).max() <= 2
    assert len((tmp_path / "two" / "log.jsonl").read_text().splitlines()) == 2  # rank 0 alone logs


@pytest.mark.slow  # pipeline stages of this UNet by default: tests/test_runtime_cli.py (verify --check)
@pytest.mark.timeout(400)
def test_a_pipeline_plan_trains_as_one_process(tiny_sd, tmp_path) -> None:
    """Two pipeline stages of the text-to-image UNet (the text embeddings sent on to the second stage's
    cross-attention, min-SNR weights carried with the target to the last stage): the same losses and weights as one
    process, and the validation image from the gathered stages."""
    plan = tmp_path / "plan.json"
    planned = CliRunner().invoke(app, ["plan", "--model", str(tiny_sd["pipeline"]), "--cluster", "local", "--devices",
                                       "2", "--batch", "8", "--only", "pipeline", "--profile", str(PROFILE), "--json",
                                       str(plan)])
    assert planned.exit_code == 0, planned.output
    prompt = "a green triangle"
    single = run_train(_options(tiny_sd, tmp_path / "single", steps=2, batch=8, snr_gamma=5.0,
                                validation_prompts=[prompt], validation_every=2), SINGLE)
    report = torchrun_pase("train", "--plan", str(plan), "--data", str(tiny_sd["images"]), "--steps", "2", "--lr",
                           "1e-3", "--workers", "1", "--out", str(tmp_path / "two"), "--no-progress", "--json",
                           "--snr-gamma", "5", "--validation-prompt", prompt, "--validation-every", "2")
    assert report["world_size"] == 2 and report["plan"] == "pipeline"
    assert report["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
    got, want = (load_file(tmp_path / run / UNET_WEIGHTS) for run in ("two", "single"))
    assert max_rel(got, want) < 1e-3
    png = Path("validation") / f"step-{2:08d}.png"
    assert np.abs(_png(tmp_path / "two" / png) - _png(tmp_path / "single" / png)).max() <= 2


def test_random_crops_and_flips_follow_the_row_seed(tmp_path) -> None:
    """A row's crop and flip are a function of its seed alone; a flip mirrors the pixels and, as diffusers' SDXL
    script does, counts the crop's left from the right edge."""
    from pase.train.captions import load_square

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 40, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    path = tmp_path / "wide.png"
    centre, _, (top, left) = load_square(path, 16)
    assert (top, left) == (0, 12)
    crops = {seed: load_square(path, 16, Augment(random_crop=True), seed) for seed in range(12)}
    assert len({crop for _, _, crop in crops.values()}) > 3  # the crop moves with the seed ...
    for seed, (pixels, original, (top, left)) in crops.items():  # ... and is the same for the same seed
        again, _, crop = load_square(path, 16, Augment(random_crop=True), seed)
        assert torch.equal(again, pixels) and crop == (top, left) and original == (16, 40) and 0 <= left <= 24
    flips = {seed: load_square(path, 16, Augment(random_flip=True), seed) for seed in range(12)}
    flipped = [seed for seed, (_, _, crop) in flips.items() if crop != (0, 12)]
    assert 0 < len(flipped) < 12  # about half
    for seed in flipped:
        pixels, _, crop = flips[seed]
        assert crop == (0, 16 - 12) and torch.equal(pixels, centre.flip(-1))
    with pytest.raises(ValueError, match="seed"):
        load_square(path, 16, Augment(random_flip=True))


def test_augmented_rows_train_alike_however_the_batch_is_split(tiny_sd, tmp_path) -> None:
    """With --random-crop and --random-flip, 2 micro-steps of 4 read the pixels of one step of 8 (flips drawn from
    the row's seed); the flips change what is trained; a cache cannot flip and says so."""
    augment = {"random_crop": True, "random_flip": True}
    large = run_train(_options(tiny_sd, tmp_path / "large", steps=2, batch=8, **augment), SINGLE)
    accum = run_train(_options(tiny_sd, tmp_path / "accum", steps=2, batch=4, grad_accum=2, **augment), SINGLE)
    plain = run_train(_options(tiny_sd, tmp_path / "plain", steps=2, batch=8), SINGLE)
    assert accum["final_loss"] == pytest.approx(large["final_loss"], rel=1e-5)
    assert plain["final_loss"] != pytest.approx(large["final_loss"], rel=1e-6)
    with pytest.raises(PaseError, match="--random-flip apply to captioned images"):
        run_train(JobOptions(model="unet-tiny", steps=1, batch=2, random_flip=True, progress=False), SINGLE)


def test_gradient_checkpointing_wraps_the_blocks_and_trains_the_same(tiny_sd, tmp_path) -> None:
    """--gradient-checkpointing re-runs blocks in backward: the blocks a --checkpoint plan would wrap are wrapped,
    and the weights come out as without it; a plan priced without checkpointing refuses it."""
    from pase.train.loop import default_parallelize
    from strategies.checkpointing import CHECKPOINTED

    wrapped: list[int] = []

    def recording(model, group):  # noqa: ANN001, ANN202 - the loop's parallelize
        wrapped.append(sum(bool(getattr(m, CHECKPOINTED, False)) for m in model.modules()))
        return default_parallelize(model, group)

    on = run_train(_options(tiny_sd, tmp_path / "on", steps=2, gradient_checkpointing=True), SINGLE,
                   parallelize=recording)
    off = run_train(_options(tiny_sd, tmp_path / "off", steps=2), SINGLE, parallelize=recording)
    assert wrapped[0] > 2 and wrapped[1] == 0 and on["gradient_checkpointing"] is True
    assert on["final_loss"] == pytest.approx(off["final_loss"], rel=1e-6)
    assert max_rel(load_file(tmp_path / "on" / UNET_WEIGHTS), load_file(tmp_path / "off" / UNET_WEIGHTS)) < 1e-5
    plan = tmp_path / "plan.json"
    planned = CliRunner().invoke(app, ["plan", "--model", str(tiny_sd["pipeline"]), "--cluster", "local", "--devices",
                                       "2", "--batch", "4", "--profile", str(PROFILE), "--json", str(plan)])
    assert planned.exit_code == 0, planned.output
    with pytest.raises(PaseError, match="made without activation checkpointing"):
        run_train(_options(tiny_sd, None, plan=plan, gradient_checkpointing=True), SINGLE)
