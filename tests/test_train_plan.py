"""`pase train --plan` under torchrun (2 gloo ranks): it learns, a SIGKILLed run resumes exactly, bad plans are refused.

Every run is a real `torchrun --nproc-per-node 2 -m pase train` on the shipped UCI digits at 8x8 pixels (unet-tiny
runs at any size divisible by 2) with plans from `pase plan --cluster local --devices 2`, priced by the
calibration fixture.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pase.cli import app
from pase.errors import PaseError
from pase.models.zoo import ZOO
from pase.runtime import PlanMismatch
from pase.train.checkpoint import load_checkpoint, step_path

REPO = Path(__file__).parent.parent
PROFILE = REPO / "tests" / "fixtures" / "calibration" / "cpu_gloo_2.json"
TORCHRUN = Path(sys.executable).with_name("torchrun")
COMMON = ["--data", "digits", "--image-size", "8", "--no-progress", "--json", "--lr", "1e-3"]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def make_plan(folder: Path, only: str) -> Path:
    path = folder / f"{only}.json"
    result = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--cluster", "local", "--devices", "2", "--batch",
                                      "8", "--only", only, "--profile", str(PROFILE), "--json", str(path)])
    assert result.exit_code == 0, result.output
    return path


def torchrun_command(*args: str) -> list[str]:
    return [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "pase", *args]


def train(plan: Path, out: Path, steps: int, *extra: str, timeout: float = 200) -> dict:
    done = subprocess.run(torchrun_command("train", "--plan", str(plan), "--steps", str(steps), "--out", str(out),
                                           *COMMON, *extra),
                          capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in list(handle.keys())}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def kill_when(command: list[str], checkpoint: Path, timeout: float = 150) -> None:
    """Run ``command`` (torchrun) until ``checkpoint`` exists, then SIGKILL the workers and the launcher."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=REPO,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not checkpoint.exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"{checkpoint} did not appear in {timeout} s"
            time.sleep(0.05)
        workers = _children(process.pid)  # torchrun starts each worker in its own session
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        for pid in _children(process.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("plans")
    return {only: make_plan(folder, only) for only in ("dp",)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_under_a_plan_lowers_the_loss_over_200_steps(plans, tmp_path) -> None:
    report = train(plans["dp"], tmp_path, 200, timeout=280)
    assert report["plan"] == "dp" and report["world_size"] == 2 and report["steps"] == 200
    assert report["final_loss"] < 0.5 * report["initial_loss"], (report["initial_loss"], report["final_loss"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkilled_run_resumes_with_identical_parameters(plans, tmp_path) -> None:
    reference = tmp_path / "uninterrupted"  # 30 steps under the data-parallel plan, every 10th step's checkpoint kept
    train(plans["dp"], reference, 30, "--checkpoint-every", "10", "--keep-checkpoints", "0", timeout=280)
    out = tmp_path / "killed"
    command = torchrun_command("train", "--plan", str(plans["dp"]), "--steps", "30", "--out", str(out), *COMMON,
                               "--checkpoint-every", "10", "--keep-checkpoints", "0")
    kill_when(command, step_path(out / "checkpoints", 20))
    assert not step_path(out / "checkpoints", 30).exists()  # killed mid-run, before the last step
    last = max(p for p in (out / "checkpoints").glob("step-*.safetensors"))
    killed_at = load_checkpoint(last).step
    assert 20 <= killed_at < 30
    report = train(plans["dp"], out, 30, "--checkpoint-every", "10", "--keep-checkpoints", "0", "--resume")
    assert report["resumed_from"].endswith(last.name) and report["steps_run"] == 30 - killed_at
    got = tensors(step_path(out / "checkpoints", 30))
    want = tensors(step_path(reference / "checkpoints", 30))
    assert got.keys() == want.keys() and any(k.startswith("optim.") for k in got)
    different = [k for k in want if not (got[k] == want[k]).all()]
    assert not different, different[:5]  # parameters and optimizer state bit-identical at step 30


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("only", ["fsdp", "tensor", "pipeline"])
def test_resume_under_sharded_plans_is_exact(only: str, tmp_path) -> None:
    """Checkpoints gather FSDP2 shards, channel shards and pipeline stages to full tensors; a resumed run matches an
    uninterrupted one bit for bit."""
    plan = make_plan(tmp_path, only)
    train(plan, tmp_path / "a", 6, "--checkpoint-every", "2")
    train(plan, tmp_path / "b", 4, "--checkpoint-every", "2")
    report = train(plan, tmp_path / "b", 6, "--checkpoint-every", "2", "--resume")
    assert report["plan"] == only and report["resumed_from"].endswith("step-00000004.safetensors")
    got, want = tensors(tmp_path / "b" / "model.safetensors"), tensors(tmp_path / "a" / "model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fp16_pipeline_plans_scale_each_microbatch_loss_and_train_as_one_process(tmp_path) -> None:
    """The stages are traced under fp16 autocast (activations cross stage boundaries in fp16, as priced), each
    microbatch's loss is scaled before its backward and the overflow check spans both stages: with a usable scale
    the steps match one process's fp16 steps; with one far too large every step is skipped on both stages."""
    plan = make_plan(tmp_path, "pipeline")
    fp16 = ("--precision", "fp16")
    report = train(plan, tmp_path / "two", 3, *fp16, "--loss-scale", "1024")
    assert report["plan"] == "pipeline"
    alone = subprocess.run([sys.executable, "-m", "pase", "train", "--model", "unet-tiny", "--batch", "8", "--steps",
                            "3", "--out", str(tmp_path / "one"), *COMMON, *fp16, "--loss-scale", "1024"],
                           capture_output=True, text=True, timeout=200, env=_env(), cwd=REPO)
    assert alone.returncode == 0, alone.stderr[-3000:]
    two, one = _log(tmp_path / "two"), _log(tmp_path / "one")
    assert [r["loss_scale"] for r in two] == [1024.0] * 3 and not any(r["step_skipped"] for r in two)
    for got, want in zip(two, one):  # fp16 rounds microbatches of 4 differently from a batch of 8
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-3)
    got, want = tensors(tmp_path / "two" / "model.safetensors"), tensors(tmp_path / "one" / "model.safetensors")
    difference = sum(float((got[k] - want[k]).pow(2).sum()) for k in want) ** 0.5
    assert difference / sum(float(want[k].pow(2).sum()) for k in want) ** 0.5 < 5e-3  # seen: 9e-4
    train(plan, tmp_path / "huge", 2, *fp16, "--loss-scale", str(2.0 ** 60))
    assert [(r["loss_scale"], r["step_skipped"]) for r in _log(tmp_path / "huge")] == [(2.0 ** 59, True),
                                                                                       (2.0 ** 58, True)]
    torch.manual_seed(0)  # --init-seed's default: the weights training started from
    initial = ZOO["unet-tiny"].build().state_dict()
    last = tensors(tmp_path / "huge" / "model.safetensors")
    assert all(torch.equal(last[k], initial[k]) for k in last)  # nothing stepped


@pytest.mark.timeout(120)
def test_plans_for_another_world_or_model_are_refused(plans, tmp_path) -> None:
    runner = CliRunner()
    alone = runner.invoke(app, ["train", "--plan", str(plans["dp"]), "--steps", "2", *COMMON])
    assert isinstance(alone.exception, PlanMismatch)  # the CLI's main prints it as one red line, exit 2
    assert "made for 2 devices" in str(alone.exception) and "1 processes" in str(alone.exception)
    other = runner.invoke(app, ["finetune", "--plan", str(plans["dp"]), "--model", "pase-unet", "--steps", "2",
                                *COMMON])
    assert isinstance(other.exception, PaseError) and "made for model 'unet-tiny'" in str(other.exception)
    plan = json.loads(plans["dp"].read_text())
    world1 = {**plan, "devices": 1, "model_fingerprint": "0123456789abcdef"}  # the same name, another architecture
    (tmp_path / "other1.json").write_text(json.dumps(world1))
    refused = runner.invoke(app, ["train", "--plan", str(tmp_path / "other1.json"), "--steps", "2", "--out",
                                  str(tmp_path / "never"), *COMMON])
    assert isinstance(refused.exception, PlanMismatch) and "another model" in str(refused.exception)
    assert not (tmp_path / "never").exists()  # refused before any work
    ema = runner.invoke(app, ["train", "--plan", str(plans["dp"]), "--ema", "0.999", "--steps", "2", "--out",
                              str(tmp_path / "never"), *COMMON])
    assert isinstance(ema.exception, PaseError) and "priced without an EMA" in str(ema.exception)
    assert not (tmp_path / "never").exists()


def test_strategies_refused_under_plan_kinds_they_cannot_run(tmp_path) -> None:
    """check_plan is what the jobs call first; a 2-process world is all it needs to know."""
    import torch

    from pase.models.zoo import ZOO
    from pase.planning.plan import Plan
    from pase.train.distributed import DistEnv
    from pase.train.planned import check_plan

    env = DistEnv(0, 2, 0, torch.device("cpu"), None)
    spec = ZOO["unet-tiny"]
    tensor, pipeline, dp = (Plan.load(make_plan(tmp_path, only)) for only in ("tensor", "pipeline", "dp"))
    with pytest.raises(PaseError, match="TuneQDM cannot run under a tensor plan"):
        check_plan(tensor, env, spec, "tuneqdm")
    with pytest.raises(PaseError, match="TuneQDM cannot run under a pipeline plan"):
        check_plan(pipeline, env, spec, "tuneqdm")
    with pytest.raises(PaseError, match="DeMe cannot run under a pipeline plan"):
        check_plan(pipeline, env, spec, "deme")
    assert check_plan(dp, env, spec, "tuneqdm").kind == "dp"
    assert check_plan(tensor, env, spec, "deme").kind == "tensor"
    assert check_plan(pipeline, env, spec, "full").kind == "pipeline"
    from pase.train.jobs import JobOptions, run_train

    with pytest.raises(PaseError, match="--grad-accum does not combine with the pipeline plan"):
        run_train(JobOptions(plan=tmp_path / "pipeline.json", model="unet-tiny", batch=8, grad_accum=2), env)
