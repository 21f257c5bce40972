"""DeMe and TuneQDM on a text-to-image pipeline folder with captioned images: the range and expert objectives, the
merged UNet and the scales as people load them, and 2 processes against one.

A tiny SD-1.x-style pipeline (``pase.models.tiny_pipeline``) and captioned PNGs, built here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_sd_cases import max_rel, torchrun_pase

from pase.errors import PaseError
from pase.models.tiny_pipeline import save_captioned_shapes, save_tiny_pipeline
from pase.train.distributed import DistEnv
from pase.train.jobs import FinetuneOptions, run_finetune
from pase.train.streaming import row_seed
from pase.train.text_finetune import split_held_out
from pase.train.text_to_image import LatentLoss, latent_objective, noise_scheduler
from pase.weights import load_weights
from strategies.deme import RangeSampler
from strategies.tuneqdm import apply_scales, scale_state

SINGLE = DistEnv(0, 1, 0, torch.device("cpu"), None)
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
PROMPT = "a red disc on a blue background"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-sd-finetune")
    return {"pipeline": save_tiny_pipeline(root / "pipeline"), "images": save_captioned_shapes(root / "images", 16)}


def _options(tiny_sd: dict[str, Path], out: Path | None, **changes) -> FinetuneOptions:
    settings = {"model": str(tiny_sd["pipeline"]), "data": str(tiny_sd["images"]), "steps": 2, "batch": 4,
                "lr": 1e-3, "out": out, "progress": False, "workers": 0}
    return FinetuneOptions(**{**settings, **changes})


class _Recorder(torch.nn.Module):
    """Predicts a constant and records the timesteps it is called with."""
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.seen = value, []

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor) -> torch.Tensor:
        self.seen.append(timestep.clone())
        return torch.full_like(sample, self.value)


def _latent_batch(rows: int) -> dict[str, torch.Tensor]:
    return {"latent_mean": torch.randn(rows, 4, 8, 8), "latent_std": torch.rand(rows, 4, 8, 8) * 0.1,
            "encoder_hidden_states": torch.randn(rows, 16, 32),
            "seeds": torch.tensor([row_seed(0, 3, item) for item in range(rows)])}


def test_a_deme_range_draws_its_timesteps_per_sample_and_adds_the_teacher_term(tiny_sd) -> None:
    scheduler = noise_scheduler(tiny_sd["pipeline"])
    batch = _latent_batch(8)
    student, teacher = _Recorder(0.5), _Recorder(0.0)
    sampler = RangeSampler(200, 400, p_global=0.0)
    plain = latent_objective(scheduler, LatentLoss("epsilon"), timesteps=sampler.sample)
    with_teacher = latent_objective(scheduler, LatentLoss("epsilon"), timesteps=sampler.sample, teacher=teacher,
                                    consistency=2.0)
    base = float(plain(student, batch, torch.Generator()))
    assert all(200 <= int(t) < 400 for t in student.seen[0])
    # the student predicts 0.5 everywhere and the teacher 0: the consistency term is 2 * 0.25
    assert float(with_teacher(student, batch, torch.Generator())) == pytest.approx(base + 0.5, rel=1e-6)
    assert torch.equal(student.seen[0], student.seen[1]) and torch.equal(teacher.seen[0], student.seen[1])
    halves = [float(plain(student, {k: v[rows] for k, v in batch.items()}, torch.Generator()))
              for rows in (slice(0, 4), slice(4, 8))]  # per-sample draws: any split of the batch, the same loss
    assert base == pytest.approx(sum(halves) / 2, rel=1e-6)


def test_ordering_by_timestep_sorts_the_rows_and_keeps_the_loss(tiny_sd) -> None:
    scheduler = noise_scheduler(tiny_sd["pipeline"])
    batch = _latent_batch(8)
    model = _Recorder(0.0)
    loss = LatentLoss("v_prediction", snr_gamma=5.0)
    unordered = float(latent_objective(scheduler, loss)(model, batch, torch.Generator()))
    ordered = float(latent_objective(scheduler, loss, order_by_timestep=True)(model, batch, torch.Generator()))
    assert not torch.equal(model.seen[0], model.seen[0].sort().values)  # the draws were not sorted already
    assert torch.equal(model.seen[1], model.seen[0].sort().values)
    assert ordered == pytest.approx(unordered, rel=1e-6)


def test_the_held_out_split_is_seeded_capped_and_disjoint() -> None:
    data = list(range(1000))
    train, held = split_held_out(data, seed=4)
    assert len(held) == 64 and len(train) == 936  # 10%, at most 64 items
    assert not set(train.indices) & set(held.indices) and split_held_out(data, seed=4)[1].indices == held.indices
    assert len(split_held_out(list(range(16)), seed=0)[1]) == 1


def test_deme_fine_tunes_a_pipeline_folder_into_a_merged_pipeline(tiny_sd, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    report = run_finetune(_options(tiny_sd, tmp_path / "deme", strategy="deme", ranges=2), SINGLE)
    assert report["ranges"] == [[0, 500], [500, 1000]] and report["held_out_items"] == 1
    # the grid holds the pretrained weights (all weights 0), so the merge is never worse than them on held-out data
    assert report["held_out_loss_merged"] <= report["held_out_loss_pretrained"]
    base = load_file(tiny_sd["pipeline"] / UNET_WEIGHTS)
    ranges = [load_weights(tmp_path / "deme" / f"range-{r}" / "weights.safetensors") for r in (0, 1)]
    merged = load_file(tmp_path / "deme" / UNET_WEIGHTS)
    weights = report["merge_weights"]
    want = {k: base[k] + sum(w * (theta[k] - base[k]) for w, theta in zip(weights, ranges)) for k in base}
    assert max_rel(merged, want) < 1e-6
    assert max_rel(ranges[0], base) > 1e-4  # the ranges trained
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "deme", local_files_only=True)
    image = pipeline(PROMPT, num_inference_steps=2, height=16, width=16, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and float(image.std()) > 0


def test_tuneqdm_scales_load_into_the_pipeline_they_were_trained_from(tiny_sd, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    report = run_finetune(_options(tiny_sd, tmp_path / "tq", strategy="tuneqdm", bits=8, experts=2), SINGLE)
    assert report["trainable_params"] < report["total_params"] / 10
    scales = tmp_path / "tq" / "scales.safetensors"

    def generate(with_scales: bool) -> torch.Tensor:
        pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd["pipeline"], local_files_only=True)
        if with_scales:
            apply_scales(pipeline.unet, scales)
            saved = load_file(scales)
            assert all(torch.equal(value, saved[name]) for name, value in scale_state(pipeline.unet).items())
        return torch.from_numpy(pipeline(PROMPT, num_inference_steps=2, height=16, width=16, output_type="np",
                                         generator=torch.Generator().manual_seed(0)).images)

    tuned, base = generate(True), generate(False)
    assert tuned.shape == (1, 16, 16, 3) and float((tuned - base).abs().max()) > 0


def test_options_deme_and_tuneqdm_do_not_run_are_refused(tiny_sd, tmp_path) -> None:
    with pytest.raises(PaseError, match="--antithetic pairs timesteps"):
        run_finetune(_options(tiny_sd, tmp_path / "a", strategy="deme", antithetic=True), SINGLE)
    with pytest.raises(PaseError, match="--adapters add 1x1 layers"):
        run_finetune(_options(tiny_sd, tmp_path / "b", strategy="deme", adapters=True), SINGLE)
    with pytest.raises(PaseError, match="--validation-prompt and --report-to run with --strategy full"):
        run_finetune(_options(tiny_sd, tmp_path / "c", strategy="tuneqdm", validation_prompts=[PROMPT]), SINGLE)
    assert not any((tmp_path / name).exists() for name in "abc")  # refused before --out was claimed


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("strategy", ["deme", "tuneqdm"])
def test_two_processes_fine_tune_a_pipeline_folder_as_one(tiny_sd, tmp_path, strategy) -> None:
    """DeMe: each process trains one range in its own group; TuneQDM: the batch split over both (DDP)."""
    extra = {"deme": {"ranges": 2, "merge_weights": [0.5, 1.0]}, "tuneqdm": {"experts": 2}}[strategy]
    single = run_finetune(_options(tiny_sd, tmp_path / "single", strategy=strategy, **extra), SINGLE)
    flags = ["--ranges", "2", "--merge-weights", "0.5,1"] if strategy == "deme" else ["--experts", "2"]
    report = torchrun_pase("finetune", "--strategy", strategy, "--model", str(tiny_sd["pipeline"]), "--data",
                       str(tiny_sd["images"]), "--steps", "2", "--batch", "4", "--lr", "1e-3", "--workers", "0",
                       "--out", str(tmp_path / "two"), "--no-progress", "--json", *flags)
    assert report["world_size"] == 2 and report["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
    output = UNET_WEIGHTS if strategy == "deme" else Path("scales.safetensors")
    # DeMe: each range trains on one process as it does alone (seen: bit-equal); TuneQDM: the gradients are averaged
    # over the two processes, in another order (seen: 4e-5 on one machine, 9.6e-4 on a later one, in a 128-element
    # s_out whose values are two Adam steps from zero: Adam's normalised step magnifies rounding differences of
    # small gradients; the losses agree to 1e-5 above)
    tolerance = 1e-6 if strategy == "deme" else 2e-3
    assert max_rel(load_file(tmp_path / "two" / output), load_file(tmp_path / "single" / output)) < tolerance
