"""Two gloo ranks give the same samples as one process: the samplers' API under torch.multiprocessing
spawn, and ``torchrun --nproc-per-node 2 -m pase sample`` against the same command in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pase.process_group import Launch, free_port, process_group

ROOT = Path(__file__).resolve().parents[1]


def _run_two_ranks(target, path: str, timeout: float) -> None:
    """Two forked gloo ranks running ``target(rank, 2, port, path)``; killed if they outlive ``timeout``."""
    context = mp.get_context("fork")  # children inherit the imported diffusers (spawn re-imports: ~10 s)
    port = free_port()
    procs = [context.Process(target=target, args=(rank, 2, port, path)) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]


class CondNet(nn.Module):
    """A small text-conditioned eps-model (conv + time scale + context bias), cheap to import and run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.proj = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        scale = 1 + torch.tanh(t.float() / 1000).reshape(-1, 1, 1, 1)
        return torch.tanh(self.conv(x)) * scale + self.proj(encoder_hidden_states.mean(1))[:, :, None, None]


def _models():
    from diffusers import UNet2DModel

    from pase.sampling.denoiser import UNetDenoiser

    torch.manual_seed(0)
    plain = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=8)
    context = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    return UNetDenoiser(plain), UNetDenoiser(CondNet(), context, guidance_scale=3.0)


def _run_all() -> tuple[dict[str, tuple[torch.Tensor, int]], list[tuple[int, bool]]]:
    """Every sampler once; returns {name: (sample, passes)} and the guided model's (batch, paired) calls."""
    from pase.sampling import Evaluator, batch_parallel, build_core, paradigms, srds

    plain, guided = _models()
    calls: list[tuple[int, bool]] = []

    def record(_module, args, kwargs):  # noqa: ANN001, ANN202 - forward pre-hook
        x = args[0]
        half = x.shape[0] // 2
        calls.append((x.shape[0], bool(torch.equal(x[:half], x[half:]))))

    guided.model.register_forward_pre_hook(record, with_kwargs=True)
    ddpm, ddim = build_core("ddpm", 16, clip_sample=False), build_core("ddim", 16, clip_sample=False)
    out = {}
    x_t, noise = ddpm.initial_and_noise((2, 3, 8, 8), 3)
    result = paradigms(ddpm, Evaluator(plain), x_t, noise, window=5, tol=0.05)
    out["paradigms"] = (result.sample, result.passes)
    x_t, noise = ddim.initial_and_noise((1, 3, 8, 8), 4)
    result = srds(ddim, Evaluator(plain), x_t, noise, blocks=4, tol=1e-4, pipelined=True)
    out["srds"] = (result.sample, result.passes)
    x_t, noise = ddpm.initial_and_noise((3, 3, 8, 8), 5)
    result = batch_parallel(ddpm, Evaluator(plain), x_t, noise)
    out["batch"] = (result.sample, result.passes)
    x_t, noise = ddim.initial_and_noise((1, 3, 8, 8), 6)
    result = paradigms(ddim, Evaluator(guided), x_t, noise, window=6, tol=0.05)
    out["guided"] = (result.sample, result.passes)
    return out, calls


def _worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    with process_group(Launch.local(rank, world, port), "gloo", timeout_s=120):
        out, calls = _run_all()
        if rank == 0:
            torch.save({"out": out, "calls": calls}, path)


@pytest.mark.timeout(180)
def test_two_gloo_ranks_match_one_process(tmp_path):
    one, _ = _run_all()  # also imports diffusers here, so the forked ranks start warm
    path = str(tmp_path / "rank0.pt")
    _run_two_ranks(_worker, path, timeout=150)
    two = torch.load(path)
    for name, (sample, passes) in one.items():
        other, other_passes = two["out"][name]
        assert other_passes == passes, name
        assert float((other - sample).norm() / sample.norm()) < 1e-5, name
    # classifier-free guidance: each rank's call held whole (uncond, cond) pairs of the same rows
    assert two["calls"] and all(batch % 2 == 0 and paired for batch, paired in two["calls"])
    assert any(batch < 12 for batch, _ in two["calls"])  # the 6-row window really was split over the ranks


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_cli_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    from pase.sampling.runner import SampleConfig, sample

    args = ["-m", "pase", "sample", "--model", "unet-tiny", "--size", "8", "--steps", "20", "--scheduler", "ddim",
            "--sampler", "paradigms", "--window", "6", "--tol", "0.05", "--samples", "2", "--json",
            "--out", str(tmp_path / "two.safetensors")]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(free_port()), *args], capture_output=True, text=True,
                              timeout=220, env=env, cwd=ROOT)
    assert launched.returncode == 0, launched.stderr[-3000:]
    lines = [line for line in launched.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    report = json.loads(lines[0])
    assert set(report) >= {"sampler", "passes", "evals", "seconds", "rel_error_vs_sequential"}
    two = load_file(tmp_path / "two.safetensors")["sample"]
    config = SampleConfig("unet-tiny", "paradigms", "ddim", 20, 6, 0.05, samples=2, size=8)
    result, _ = sample(config)
    assert report["passes"] == result.passes and report["evals"] == result.evals
    assert float((two - result.sample).norm() / result.sample.norm()) < 1e-5


def _batch_worker(rank: int, world: int, port: int, path: str) -> None:
    from pase.sampling import Evaluator, batch_parallel, build_core
    from pase.sampling.denoiser import GaussianDenoiser

    torch.set_num_threads(1)
    with process_group(Launch.local(rank, world, port), "gloo", timeout_s=60):
        core = build_core("ddpm", 6, clip_sample=False)
        x_t, noise = core.initial_and_noise((1, 2, 4, 4), 0)  # one sample, two ranks: rank 1 has no share
        result = batch_parallel(core, Evaluator(GaussianDenoiser(core.alphas_cumprod, torch.zeros(2, 4, 4))), x_t,
                                noise)
        if rank == 0:
            torch.save({"sample": result.sample, "passes": result.passes}, path)


@pytest.mark.timeout(120)
def test_batch_parallel_with_fewer_samples_than_ranks(tmp_path):
    """A rank without samples must still join the gather (it used to divide by zero, hanging rank 0)."""
    from pase.sampling import Evaluator, build_core, sequential
    from pase.sampling.denoiser import GaussianDenoiser

    path = str(tmp_path / "rank0.pt")
    _run_two_ranks(_batch_worker, path, timeout=40)
    core = build_core("ddpm", 6, clip_sample=False)
    x_t, noise = core.initial_and_noise((1, 2, 4, 4), 0)
    reference = sequential(core, Evaluator(GaussianDenoiser(core.alphas_cumprod, torch.zeros(2, 4, 4))), x_t, noise)
    two = torch.load(path)
    assert two["passes"] == 6 and two["sample"].shape == reference.sample.shape
    assert torch.allclose(two["sample"], reference.sample, atol=1e-6)
