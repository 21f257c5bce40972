"""Sampler core, ParaDiGMS and SRDS on one process: equivalences with sequential sampling and with
diffusers' own schedulers (tiny random UNet with clip_sample=False, one thread; or the analytic
Gaussian denoiser)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import DDIMParallelScheduler, DDIMScheduler, DDPMScheduler, UNet2DModel

from pase.errors import PaseError
from pase.sampling import Evaluator, build_core, core_from_scheduler, paradigms, sequential, srds
from pase.sampling.denoiser import GaussianDenoiser, UNetDenoiser
from pase.sampling.srds import default_blocks

SHAPE = (1, 3, 8, 8)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def unet() -> UNetDenoiser:
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return UNetDenoiser(model)


def setup(kind: str, steps: int, seed: int = 0, shape: tuple[int, ...] = SHAPE, **config):
    core = build_core(kind, steps, clip_sample=False, **config)
    x_t, noise = core.initial_and_noise(shape, seed)
    return core, x_t, noise


# ---------------------------------------------------------------------------------------------- core
def test_ddpm_matches_diffusers_sequential_step_with_the_same_generator(unet):
    """Noise drawn up front in step order reproduces diffusers' DDPMScheduler.step(generator=g)."""
    core, x_t, noise = setup("ddpm", 20, seed=7)
    ours = sequential(core, Evaluator(unet), x_t, noise).sample
    scheduler = DDPMScheduler(clip_sample=False)
    scheduler.set_timesteps(20)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(SHAPE, generator=generator)
    assert torch.equal(x, x_t)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t.expand(1)), t, x, generator=generator).prev_sample
    assert rel(ours, x) < 1e-6


@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_ddim_matches_diffusers_sequential_step(unet, alpha_to_one):
    core, x_t, noise = setup("ddim", 20, set_alpha_to_one=alpha_to_one)
    ours = sequential(core, Evaluator(unet), x_t, noise).sample
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=alpha_to_one)
    scheduler.set_timesteps(20)
    x = x_t.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t.expand(1)), t, x).prev_sample
    assert rel(ours, x) < 1e-6


def test_final_alpha_regression_batched_last_step_uses_final_alpha_cumprod():
    """diffusers' batched DDIM uses alpha = 1 at the last step; ours uses final_alpha_cumprod like step()."""
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    core = core_from_scheduler(scheduler)
    x, eps = torch.randn(3, *SHAPE[1:]), torch.randn(3, *SHAPE[1:])
    last = torch.full((3,), 9)
    ours = core.step(eps, x, last)
    reference = scheduler.step(eps, scheduler.timesteps[9], x).prev_sample
    assert rel(ours, reference) < 1e-6
    # the alpha = 1 update (diffusers' batched path) is measurably different, so this test catches the bug
    buggy_core = replace(core, final_alpha=torch.tensor(1.0))
    assert rel(buggy_core.step(eps, x, last), reference) > 1e-4
    parallel = DDIMParallelScheduler(clip_sample=False, set_alpha_to_one=False)
    parallel.set_timesteps(10)
    upstream = parallel.batch_step_no_noise(eps, parallel.timesteps[last], x)
    assert rel(upstream, reference) < 1e-6 or rel(upstream, buggy_core.step(eps, x, last)) < 1e-6


def test_previous_timestep_table_follows_a_non_uniform_grid():
    core = build_core("ddim", 7, timestep_spacing="linspace")
    assert not core.uniform
    assert torch.equal(core.prev[:-1], core.timesteps[1:]) and int(core.prev[-1]) == -1
    assert build_core("ddpm", 10).uniform


def test_ddim_jump_chains_compose_to_steps():
    """A jump to the next grid point is exactly the DDIM step (the coarse solver's consistency)."""
    core, x_t, _ = setup("ddim", 10)
    eps = torch.randn_like(x_t)
    index = torch.tensor([3])
    assert torch.allclose(core.jump(eps, x_t, core.timesteps[index], core.prev[index]), core.step(eps, x_t, index))


# ---------------------------------------------------------------------------------------------- ParaDiGMS
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_paradigms_window_one_equals_sequential(unet, kind):
    core, x_t, noise = setup(kind, 30)
    evaluator = Evaluator(unet)
    reference = sequential(core, evaluator, x_t, noise).sample
    result = paradigms(core, evaluator, x_t, noise, window=1, tol=0.1)
    assert result.passes == 30 and result.evals == 30
    assert rel(result.sample, reference) < 1e-6


@pytest.mark.parametrize("kind,window", [("ddpm", 4), ("ddim", 16)])
def test_paradigms_tolerance_zero_equals_sequential(unet, kind, window):
    core, x_t, noise = setup(kind, 30)
    evaluator = Evaluator(unet)
    reference = sequential(core, evaluator, x_t, noise).sample
    result = paradigms(core, evaluator, x_t, noise, window=window, tol=0.0)
    assert result.passes <= 30
    assert rel(result.sample, reference) < 1e-5


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_paradigms_passes_bounded_and_non_increasing_in_tolerance(unet, kind):
    core, x_t, noise = setup(kind, 40)
    evaluator = Evaluator(unet)
    reference = sequential(core, evaluator, x_t, noise).sample
    passes, errors = [], []
    for tol in (0.0, 1e-3, 1e-2, 0.1, 0.5):
        result = paradigms(core, evaluator, x_t, noise, window=8, tol=tol)
        passes.append(result.passes)
        errors.append(rel(result.sample, reference))
    assert all(p <= 40 for p in passes)
    assert passes == sorted(passes, reverse=True), passes
    assert passes[-1] < passes[0]  # a loose tolerance really saves passes
    assert errors[1] < 1e-3 and errors[-1] < 0.2


def test_paradigms_on_several_samples_matches_per_sample_sequential():
    """Batch of samples: the window's rows are (step, sample); each sample must match its own sequential run."""
    core, x_t, noise = setup("ddpm", 25, shape=(3, 2, 4, 4))
    gaussian = GaussianDenoiser(build_core("ddpm", 25).alphas_cumprod, torch.zeros(2, 4, 4))
    evaluator = Evaluator(gaussian)
    reference = sequential(core, evaluator, x_t, noise).sample
    result = paradigms(core, evaluator, x_t, noise, window=6, tol=0.0)
    assert rel(result.sample, reference) < 1e-5


def test_paradigms_rejects_bad_settings(unet):
    core, x_t, noise = setup("ddim", 10)
    with pytest.raises(PaseError, match="--window"):
        paradigms(core, Evaluator(unet), x_t, noise, window=0, tol=0.1)
    with pytest.raises(PaseError, match="--tol"):
        paradigms(core, Evaluator(unet), x_t, noise, window=4, tol=-1)


# ---------------------------------------------------------------------------------------------- SRDS
def serial_boundaries(core, denoiser, x_t, noise, blocks):
    """x at every block boundary of the serial N-step trajectory."""
    size = core.steps // blocks
    x, out = x_t, [x_t]
    for j in range(core.steps):
        x = core.step(denoiser(x, core.timesteps[j].expand(x.shape[0])), x, torch.tensor([j] * x.shape[0])) + noise[j]
        if (j + 1) % size == 0:
            out.append(x)
    return out


@pytest.mark.parametrize("kind,pipelined", [("ddim", False), ("ddim", True), ("ddpm", False)])
def test_srds_blocks_become_exact_one_per_iteration(unet, kind, pipelined):
    core, x_t, noise = setup(kind, 36)
    blocks = default_blocks(36)
    assert blocks == 6
    serial = serial_boundaries(core, unet, x_t, noise, blocks)
    seen = []

    def check(iteration, boundaries):
        seen.append(iteration)
        for i in range(1, iteration + 1):
            assert rel(boundaries[i], serial[i]) < 1e-5, (iteration, i)

    result = srds(core, Evaluator(unet), x_t, noise, blocks, tol=0.0, pipelined=pipelined, on_iteration=check)
    assert seen == list(range(blocks + 1))
    assert result.iterations == blocks
    assert rel(result.sample, serial[-1]) < 1e-5


def test_srds_single_block_is_serial_and_pipelining_saves_passes(unet):
    core, x_t, noise = setup("ddim", 24)
    evaluator = Evaluator(unet)
    reference = sequential(core, evaluator, x_t, noise).sample
    one = srds(core, evaluator, x_t, noise, blocks=1, tol=0.0)
    assert one.iterations == 1 and rel(one.sample, reference) < 1e-5
    plain = srds(core, evaluator, x_t, noise, blocks=4, tol=1e-3)
    piped = srds(core, evaluator, x_t, noise, blocks=4, tol=1e-3, pipelined=True)
    assert plain.iterations == piped.iterations < 4
    n, b, p = 24 // 4, 4, plain.iterations
    assert plain.passes == b + sum(n + b - k for k in range(1, p + 1))  # init sweep + fine solves + sweeps
    assert piped.passes < plain.passes
    assert rel(piped.sample, plain.sample) < 1e-5
    assert rel(plain.sample, reference) < 1e-2


def test_srds_rejects_blocks_that_do_not_divide_steps(unet):
    core, x_t, noise = setup("ddim", 10)
    with pytest.raises(PaseError, match="must divide"):
        srds(core, Evaluator(unet), x_t, noise, blocks=3)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_srds_pipelined_stops_at_the_first_iteration_within_tolerance(kind):
    """With one-step blocks several pipelined iterations complete in one sweep; the first one within the
    tolerance must end the run (a later one used to overwrite the result and the iteration count)."""
    core, x_t, noise = setup(kind, 12, shape=(1, 2, 4, 4))
    evaluator = Evaluator(GaussianDenoiser(core.alphas_cumprod, torch.zeros(2, 4, 4)))
    plain = srds(core, evaluator, x_t, noise, blocks=12, tol=10.0)
    piped = srds(core, evaluator, x_t, noise, blocks=12, tol=10.0, pipelined=True)
    assert plain.iterations == 1
    assert piped.iterations == 1 and len(piped.extra["changes"]) == 1
    assert torch.equal(piped.sample, plain.sample)


def test_json_summary_counts_are_integers():
    """The issue's --json contract: passes and evals are ints (evals per sample is whole for every sampler)."""
    from pase.sampling.runner import summary

    core, x_t, noise = setup("ddim", 12, shape=(2, 2, 4, 4))
    evaluator = Evaluator(GaussianDenoiser(core.alphas_cumprod, torch.zeros(2, 4, 4)))
    for result in (sequential(core, evaluator, x_t, noise), paradigms(core, evaluator, x_t, noise, 4, 0.1),
                   srds(core, evaluator, x_t, noise, 4, 1e-3, pipelined=True)):
        data = summary(result, None)
        assert type(data["passes"]) is int and type(data["evals"]) is int, data
        assert data["evals"] == result.evals
