"""`pase sample` on a diffusers pipeline folder: the prompt through the folder's CLIP text encoder(s), the samplers on
its latents over its noise schedule, the VAE decoding to a PNG. With DDIM and --tol 0, sequential, ParaDiGMS and
SRDS draw what the folder's own StableDiffusionPipeline (or StableDiffusionXLPipeline) draws from the same x_T
(latents and decoded image)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pase.cli import app
from pase.errors import PaseError
from pase.models.tiny_pipeline import save_tiny_pipeline
from pase.sampling.runner import SampleConfig, make_core, sample

PROMPT, NEGATIVE, STEPS, SEED, GUIDANCE = "a red disc on a blue background", "a green square", 10, 3, 4.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sample-folders")
    return {"sd": save_tiny_pipeline(root / "sd"), "xl": save_tiny_pipeline(root / "xl", seed=2, xl=True)}


@pytest.fixture(scope="module")
def pipeline_output(folders: dict[str, Path]) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """(x_T, the pipeline's latents, its decoded image) with a DDIM scheduler from the folder's config."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = folders["sd"]
    config = SampleConfig(model=str(folder), scheduler="ddim", steps=STEPS, seed=SEED, prompt=PROMPT)
    x_t, _ = make_core(config).initial_and_noise((1, 4, 8, 8), SEED)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"), safety_checker=None,
        local_files_only=True)
    common = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
              "height": 16, "width": 16}
    latents = pipe(**common, latents=x_t.clone(), output_type="latent").images
    image = pipe(**common, latents=x_t.clone(), output_type="np").images[0]
    return x_t, image, latents


@pytest.mark.parametrize("negative", [NEGATIVE, None])
def test_sdxl_folders_draw_what_their_pipeline_draws(folders, tmp_path, negative: str | None) -> None:
    """An SDXL folder: both encoders' hidden states, the pooled embedding and the size ids reach the UNet, and
    without a negative prompt the unconditional branch is all zeros (force_zeros_for_empty_prompt), as
    StableDiffusionXLPipeline does; ParaDiGMS at --tol 0 and the decoded PNG agree with it too."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    folder = folders["xl"]
    config = SampleConfig(model=str(folder), scheduler="ddim", steps=STEPS, seed=SEED, prompt=PROMPT)
    x_t, _ = make_core(config).initial_and_noise((1, 4, 8, 8), SEED)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        folder, scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"), local_files_only=True)
    common = {"prompt": PROMPT, "negative_prompt": negative, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
              "height": 16, "width": 16}
    want = pipe(**common, latents=x_t.clone(), output_type="latent").images
    image = pipe(**common, latents=x_t.clone(), output_type="np").images[0]
    for sampler in ("sequential", "paradigms"):
        result, _ = sample(SampleConfig(model=str(folder), sampler=sampler, scheduler="ddim", steps=STEPS, tol=0.0,
                                        seed=SEED, guidance_scale=GUIDANCE, prompt=PROMPT, negative_prompt=negative,
                                        window=4))
        error = float((result.sample - want).norm() / want.norm())
        assert error < 1e-4, (sampler, error)
    out = tmp_path / "xl.png"
    args = ["sample", "--model", str(folder), "--prompt", PROMPT, "--guidance-scale", str(GUIDANCE), "--scheduler",
            "ddim", "--steps", str(STEPS), "--tol", "0", "--seed", str(SEED), "--out", str(out)]
    result = CliRunner().invoke(app, args + (["--negative-prompt", negative] if negative else []))
    assert result.exit_code == 0, result.output
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.round(image * 255).astype(np.int16)).max() <= 1


@pytest.mark.parametrize("sampler", ["sequential", "paradigms", "srds"])
def test_samplers_draw_what_the_pipeline_draws(folders, pipeline_output, sampler: str) -> None:
    _, _, want = pipeline_output
    config = SampleConfig(model=str(folders["sd"]), sampler=sampler, scheduler="ddim", steps=STEPS, tol=0.0,
                          seed=SEED, guidance_scale=GUIDANCE, prompt=PROMPT, negative_prompt=NEGATIVE, window=4,
                          blocks=2 if sampler == "srds" else None)
    result, _ = sample(config)
    error = float((result.sample - want).norm() / want.norm())
    assert error < 1e-4, error


def test_the_cli_writes_the_decoded_image(folders, pipeline_output, tmp_path) -> None:
    _, want, _ = pipeline_output
    out = tmp_path / "drawn.png"
    result = CliRunner().invoke(app, ["sample", "--model", str(folders["sd"]), "--prompt", PROMPT, "--negative-prompt",
                                      NEGATIVE, "--guidance-scale", str(GUIDANCE), "--scheduler", "ddim", "--steps",
                                      str(STEPS), "--tol", "0", "--seed", str(SEED), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert got.shape == (16, 16, 3)
    assert np.abs(got - np.round(want * 255).astype(np.int16)).max() <= 1


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "{sd}"], "say what to draw with --prompt"),
    (["--model", "unet-tiny", "--prompt", "x"], "is a zoo model without a text encoder"),
    (["--model", "{sd}/unet", "--prompt", "x"], "a UNet folder without a pipeline around it"),
    (["--model", "{sd}", "--prompt", "x", "--negative-prompt", "y"], "--negative-prompt acts through classifier-free"),
    (["--model", "unet-tiny", "--out", "{tmp}/x.png"], "--out FILE.png decodes latents"),
])
def test_folder_sampling_names_what_does_not_fit(folders, tmp_path, args: list[str], needle: str) -> None:
    filled = [a.format(sd=folders["sd"], xl=folders["xl"], tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, ["sample", "--steps", "2", *filled])
    assert isinstance(result.exception, PaseError) and needle in str(result.exception), result.output
