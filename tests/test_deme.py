"""DeMe: ranges and sampler, consistency loss, channel projections, merge, and the 2-process group run."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pase.errors import PaseError
from pase.models.zoo import ZOO
from pase.train.deme import deme_objective
from pase.train.distributed import DistEnv
from pase.train.jobs import FinetuneOptions, run_finetune
from pase.train.loop import add_noise, ddpm_alphas_cumprod, model_output
from pase.weights import load_weights
from strategies.deme import (
    RangeSampler,
    add_channel_projections,
    frozen_copy,
    grid_search,
    group_layout,
    merge,
    parse_bounds,
    task_vectors,
    uniform_ranges,
)

ROOT = Path(__file__).resolve().parent.parent


def _unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ZOO["unet-tiny"].build()


def _states(count: int) -> tuple[dict, list[dict]]:
    base = {"w": torch.randn(4, 3), "b": torch.randn(3), "steps": torch.tensor([7])}
    tuned = [{"w": torch.randn(4, 3), "b": torch.randn(3), "steps": torch.tensor([9 + i])} for i in range(count)]
    return base, tuned


def test_ranges() -> None:
    assert uniform_ranges(4) == ((0, 250), (250, 500), (500, 750), (750, 1000))
    assert parse_bounds("0,100,400,1000") == ((0, 100), (100, 400), (400, 1000))
    for bad in ("0,500,400,1000", "10,1000", "0,500"):
        with pytest.raises(PaseError, match="contiguous"):
            parse_bounds(bad)


def test_merge_formula() -> None:
    base, tuned = _states(3)
    vectors = task_vectors(base, tuned)
    zero = merge(base, vectors, [0, 0, 0])
    assert all(torch.equal(zero[k], base[k]) for k in base)
    one_hot = merge(base, vectors, [0, 1, 0])
    assert torch.allclose(one_hot["w"], tuned[1]["w"], atol=1e-6) and torch.equal(one_hot["steps"], base["steps"])
    a, b = [0.1, 0.2, 0.5], [0.3, -0.1, 0.2]
    sum_ab = merge(base, vectors, [x + y for x, y in zip(a, b)])
    linear = merge(base, vectors, a)["w"] + merge(base, vectors, b)["w"] - base["w"]
    assert torch.allclose(sum_ab["w"], linear, atol=1e-6)
    expected = (1 - sum(a)) * base["w"] + sum(w * t["w"] for w, t in zip(a, tuned))
    assert torch.allclose(merge(base, vectors, a)["w"], expected, atol=1e-6)
    with pytest.raises(PaseError, match="one weight per range"):
        merge(base, vectors, [1.0])
    with pytest.raises(PaseError, match="other keys"):
        task_vectors(base, [{"w": base["w"]}])


def test_grid_search_finds_the_best_weights() -> None:
    base, tuned = _states(2)
    vectors = task_vectors(base, tuned)
    target = merge(base, vectors, [0.5, 1.0])["w"]
    result = grid_search(base, vectors, [0, 0.5, 1], lambda state: float((state["w"] - target).norm()))
    assert result.weights == (0.5, 1.0) and len(result.scores) == 9 and result.score < 1e-6


def test_sampler_statistics() -> None:
    sampler = RangeSampler(250, 500, p_global=0.3, num_train_timesteps=1000)
    t = sampler.sample(40000, torch.Generator().manual_seed(0))
    outside = ((t < 250) | (t >= 500)).float().mean().item()
    assert abs(outside - 0.3 * (1 - 250 / 1000)) < 0.01
    assert t.min() >= 0 and t.max() < 1000
    anti = RangeSampler(250, 500, p_global=0.0, antithetic=True).sample(1000, torch.Generator().manual_seed(1))
    assert torch.equal(anti[:500] + anti[500:], torch.full((500,), 250 + 500 - 1))
    assert ((anti >= 250) & (anti < 500)).all()
    assert (RangeSampler(0, 100, p_global=0.0).sample(500, torch.Generator()) < 100).all()


def test_consistency_loss_is_zero_at_start_and_gradient_is_the_plain_one() -> None:
    student = _unet()
    teacher = frozen_copy(copy.deepcopy(student))
    sampler = RangeSampler(0, 500, 0.3)
    x0 = torch.randn(2, 3, 16, 16)
    with_consistency = deme_objective(teacher, sampler, consistency=1.0)(student, x0, torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(with_consistency, list(student.parameters()))
    generator = torch.Generator().manual_seed(3)  # the same draws, in the same order, without the teacher
    noise = torch.randn(x0.shape, generator=generator)
    t = sampler.sample(2, generator)
    plain = F.mse_loss(model_output(student(add_noise(x0, noise, t, ddpm_alphas_cumprod()), t)), noise)
    assert torch.allclose(with_consistency, plain, rtol=1e-6)
    plain_grads = torch.autograd.grad(plain, list(student.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(grads, plain_grads))


def test_identity_projections_leave_output_unchanged_and_merged_weights_load() -> None:
    model = _unet()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        before = model(x, t).sample
        names = add_channel_projections(model)
        after = model(x, t).sample
    assert len(names) == 2 + 1 + 2 and torch.allclose(before, after, atol=1e-6)
    widths = [model.get_parameter(n).shape[0] for n in names]
    assert sum(model.get_parameter(n).numel() for n in names) == sum(w * w for w in widths)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for n in names:
            tuned.get_parameter(n).add_(0.01)
    merged = merge(model.state_dict(), task_vectors(model.state_dict(), [tuned.state_dict()]), [0.5])
    fresh = _unet(seed=1)
    add_channel_projections(fresh)
    fresh.load_state_dict(merged)  # strict: the adapter-enabled architecture takes the merged weights
    assert torch.allclose(fresh.get_parameter(names[0]), model.get_parameter(names[0]) + 0.005)
    with pytest.raises(PaseError, match="diffusers UNet"):
        add_channel_projections(ZOO["pase-unet"].build())


def test_group_layout() -> None:
    assert group_layout(4, 2).groups == ((0, 1), (2, 3)) and group_layout(4, 2).ranges_of == ((0,), (1,))
    assert group_layout(2, 4).ranges_of == ((0, 2), (1, 3)) and group_layout(2, 4).leader(3) == 1
    with pytest.raises(PaseError, match="equal DeMe groups"):
        group_layout(3, 2)


def _options(out: Path) -> list[str]:
    return ["--strategy", "deme", "--ranges", "2", "--model", "unet-tiny", "--image-size", "16", "--data", "digits",
            "--steps", "3", "--batch", "4", "--lr", "1e-3", "--merge-weights", "0.5,0.5", "--adapters",
            "--out", str(out), "--no-progress", "--json"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_groups_equal_ranges_run_one_after_another(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pase",
               "finetune", *_options(tmp_path / "parallel")]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun DeMe run timed out: {exc.stderr}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["groups"] == [[0], [1]] and report["world_size"] == 2 and report["strategy"] == "deme"
    assert report["peak_memory_bytes"] > 4 * report["trainable_params"]  # a fresh process: at least the weights

    sequential = FinetuneOptions(strategy="deme", ranges=2, model="unet-tiny", image_size=16, data="digits", steps=3,
                                 batch=4, lr=1e-3, merge_weights=[0.5, 0.5], adapters=True, out=tmp_path / "sequential",
                                 progress=False)
    local = run_finetune(sequential, DistEnv(0, 1, 0, torch.device("cpu"), None))
    assert local["groups"] == [[0]]
    for name in ("range-0/weights.safetensors", "range-1/weights.safetensors", "model.safetensors"):
        parallel, serial = load_weights(tmp_path / "parallel" / name), load_weights(tmp_path / "sequential" / name)
        assert parallel.keys() == serial.keys()
        for key in parallel:
            assert torch.equal(parallel[key], serial[key]), (name, key)
    pretrained = _unet(seed=0).state_dict()
    range0 = load_weights(tmp_path / "sequential" / "range-0/weights.safetensors")
    assert not torch.equal(range0["conv_in.weight"], pretrained["conv_in.weight"])  # it did train
