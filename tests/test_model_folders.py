"""`--model` takes diffusers folders: a pipeline folder (model_index.json, its unet/) or a UNet folder
(config.json and weights, as save_pretrained writes them, fp16 variants included). Planning reads the config
alone; building elsewhere than on meta loads the weights; a plan records the folder, and `pase verify` rebuilds
it from anywhere."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pase.errors import PaseError, UnknownModelError
from pase.graph import extract_model
from pase.models.zoo import SD_TINY, recorded_model, resolve_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD pipeline folder (unet/ and a tokenizer config), a bare UNet folder with fp16 weights only, and the
    saved model's weights."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    model = UNet2DConditionModel(**SD_TINY)
    pipeline = root / "tiny-sd"
    model.save_pretrained(pipeline / "unet")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    (pipeline / "tokenizer").mkdir()
    (pipeline / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    torch.save(model.state_dict(), root / "weights.pt")
    model.half().save_pretrained(root / "unet-fp16", variant="fp16")
    return {"pipeline": pipeline, "fp16": root / "unet-fp16", "weights": root / "weights.pt", "root": root}


def test_a_pipeline_folder_is_its_unet(folders) -> None:
    spec = resolve_model(str(folders["pipeline"]))
    assert spec.family == "diffusers.UNet2DConditionModel" and spec.name == str(folders["pipeline"].resolve())
    shapes = {i.name: i.concrete(2) for i in spec.inputs}
    assert shapes == {"sample": (2, 4, 16, 16), "timestep": (2,), "encoder_hidden_states": (2, 64, 32)}  # tokenizer's
    assert {i.name: i.concrete(2) for i in resolve_model(str(folders["fp16"])).inputs}["encoder_hidden_states"] == \
        (2, 77, 32)  # no tokenizer beside it: CLIP's 77 tokens
    assert recorded_model(str(folders["pipeline"])) is not None and recorded_model("my.models:make") is None


def test_building_loads_the_weights_and_meta_reads_only_the_config(folders) -> None:
    want = torch.load(folders["weights"])
    for folder in (folders["pipeline"], folders["fp16"]):
        spec = resolve_model(str(folder))
        with torch.device("meta"):
            assert all(p.is_meta for p in spec.build().parameters())
        got = spec.build().state_dict()
        tolerance = 1e-3 if folder == folders["fp16"] else 0.0  # fp16 weights, loaded as stored
        assert set(got) == set(want)
        assert max(float((got[k].float() - want[k]).abs().max()) for k in want) <= tolerance


def test_the_graph_of_a_folder_is_its_architectures(folders) -> None:
    graph = extract_model(str(folders["fp16"]), 4, use_cache=True)
    zoo = extract_model("sd-tiny", 4, input_shapes={"encoder_hidden_states": (4, 77, 32)})
    assert graph.fingerprint() == zoo.fingerprint() and graph.meta["model"] == str(folders["fp16"].resolve())


def test_sdxl_conditioning_from_the_config(tmp_path) -> None:
    config = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "sample_size": [24, 16],
              "cross_attention_dim": [64, 64], "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 80}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shapes = {i.name: (i.concrete(3), i.keyword) for i in resolve_model(str(tmp_path)).inputs}
    assert shapes == {"sample": ((3, 4, 24, 16), None), "timestep": ((3,), None),
                      "encoder_hidden_states": ((3, 77, 64), None), "text_embeds": ((3, 32), "added_cond_kwargs"),
                      "time_ids": ((3, 6), "added_cond_kwargs")}


@pytest.mark.parametrize("layout,message", [
    ("missing", "does not exist"), ("empty", "neither model_index.json"), ("no-unet", "without unet/config.json"),
    ("other-class", "describes a 'SD3Transformer2DModel'"), ("no-weights", "no weights"),
    ("class-labels", "class embeddings")])
def test_bad_folders_are_refused_by_name(tmp_path, layout: str, message: str) -> None:
    folder = tmp_path / "model"
    if layout != "missing":
        folder.mkdir()
    if layout == "no-unet":
        (folder / "model_index.json").write_text("{}")
    config = {"other-class": {"_class_name": "SD3Transformer2DModel"},
              "no-weights": {"_class_name": "UNet2DModel", "in_channels": 3, "sample_size": 8},
              "class-labels": {"_class_name": "UNet2DConditionModel", "class_embed_type": "timestep"}}.get(layout)
    if config:
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownModelError, match=message):
        spec = resolve_model(str(folder))
        spec.build()  # (a folder without weights fails when the weights are needed)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_plan_and_verify_a_pipeline_folder_from_another_directory(folders) -> None:
    """`pase plan --model FOLDER` records the folder's absolute path; `pase verify --check` under torchrun, started
    elsewhere, rebuilds the model from it (weights loaded) and matches a single process, bytes as priced."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    plan_path = folders["root"] / "plan.json"
    planned = subprocess.run([sys.executable, "-m", "pase", "plan", "--model", "tiny-sd", "--cluster", "local",
                              "--devices", "2", "--batch", "4", "--only", "tensor", "--json", str(plan_path)],
                             capture_output=True, text=True, timeout=120, env=env, cwd=folders["root"])
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert json.loads(plan_path.read_text())["model"] == str(folders["pipeline"].resolve())
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "pase", "verify", "--plan",
                           str(plan_path), "--steps", "2", "--warmup", "1", "--json", "--check"],
                          capture_output=True, text=True, timeout=150, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["max_rel_error"] <= 1e-4 and summary["layers_as_planned"] == summary["layers_total"]
    assert summary["comm_bytes_measured"] == pytest.approx(summary["comm_bytes_predicted"], rel=0.01)


def test_training_a_pipeline_folder_without_its_encoders_is_refused_in_one_line(folders, tmp_path) -> None:
    from typer.testing import CliRunner

    from pase.cli import app

    result = CliRunner().invoke(app, ["train", "--model", str(folders["pipeline"]), "--data", "digits", "--steps",
                                      "1", "--batch", "2", "--out", str(tmp_path / "run"), "--no-progress"])
    assert isinstance(result.exception, PaseError)  # `pase` prints it as one line (pase.cli.run)
    assert "has no text_encoder, vae, scheduler folder(s)" in str(result.exception)
