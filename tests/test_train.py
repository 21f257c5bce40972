"""The training loop: offline data, step-indexed batches, checkpoints, exact resume, memory measurement."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pase.cli import app
from pase.errors import PaseError
from pase.models.zoo import ZOO
from pase.train.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from pase.train.data import load_images, split_held_out, step_batches
from pase.train.loop import DataGroup, LoopConfig, epsilon_objective, fit
from pase.train.memory import PeakMemory, saved_activation_bytes
from pase.weights import load_weights

TAIL = ["strategy", "trainable_params", "total_params", "grad_and_optimizer_bytes", "peak_memory_bytes", "final_loss"]


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ZOO["pase-unet"].build()


def test_generated_shapes_are_seeded_and_in_range() -> None:
    a = load_images("shapes", 16, 3, 32, seed=3)
    b = load_images("shapes", 16, 3, 32, seed=3)
    c = load_images("shapes", 16, 3, 32, seed=4)
    assert a.shape == (32, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1


def test_digits_are_grey_repeated_over_channels() -> None:
    images = load_images("digits", 16, 3)
    assert images.shape == (1797, 3, 16, 16)
    assert torch.equal(images[:, 0], images[:, 2]) and images.min() >= -1 and images.max() <= 1


def test_shipped_digits_are_the_uci_set() -> None:
    """1797 digits of 8x8 integer pixels in 0..16, about 180 per class, and labels that match the images:
    each class's mean image is closer to its own members than any other class's mean."""
    from pase.train.data import digits_raw

    images, labels = digits_raw()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 16
    counts = np.bincount(labels, minlength=10)
    assert counts.size == 10 and counts.min() >= 170 and counts.max() <= 190
    flat = images.reshape(len(images), -1).astype(np.float64)
    means = np.stack([flat[labels == k].mean(axis=0) for k in range(10)])
    nearest = ((flat[:, None, :] - means[None]) ** 2).sum(axis=2).argmin(axis=1)
    assert (nearest == labels).mean() > 0.85


def test_image_folder(tmp_path) -> None:
    from PIL import Image

    for i, size in enumerate([(40, 30), (20, 20)]):
        Image.fromarray(np.full((size[1], size[0], 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    images = load_images(str(tmp_path), 8, 3)
    assert images.shape == (2, 3, 8, 8)
    assert images[0].allclose(torch.tensor(-1.0)) and images[1].allclose(torch.tensor(60 / 255 * 2 - 1), atol=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PaseError, match="no images"):
        load_images(str(tmp_path / "empty"), 8, 3)
    with pytest.raises(PaseError, match="unknown data source"):
        load_images("cifar", 8, 3)


def test_step_batches_depend_only_on_the_step_and_split_over_ranks() -> None:
    data = torch.arange(10.0)[:, None]
    fresh = step_batches(data, 3, 0, 1, seed=1)
    batches = [next(fresh) for _ in range(6)]  # 18 samples: crosses an epoch boundary
    resumed = step_batches(data, 3, 0, 1, seed=1, start_step=4)
    assert torch.equal(next(resumed), batches[4]) and torch.equal(next(resumed), batches[5])
    first_epoch = torch.cat(batches)[:10].flatten().sort().values
    assert torch.equal(first_epoch, torch.arange(10.0))  # each epoch is a permutation
    whole = next(step_batches(data, 4, 0, 1, seed=2))
    parts = [next(step_batches(data, 2, rank, 2, seed=2)) for rank in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_held_out_split_is_disjoint() -> None:
    data = torch.arange(20.0)[:, None]
    train, held = split_held_out(data, 0.1, seed=0)
    assert len(held) == 2 and len(train) == 18
    assert set(train.flatten().tolist()).isdisjoint(held.flatten().tolist())


def test_checkpoint_round_trip_with_optimizer_state(tmp_path) -> None:
    param = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.randn(5)
    optimizer.step()
    path = save_checkpoint(tmp_path / "step-00000001.safetensors",
                           Checkpoint(1, {"w": param}, {"w": param * 2}, optimizer.state_dict(), {"job": {"a": 1}}))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    loaded = load_checkpoint(path)
    assert loaded.step == 1 and loaded.settings == {"job": {"a": 1}}
    assert torch.equal(loaded.model["w"], param.detach()) and torch.equal(loaded.ema["w"], param.detach() * 2)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(5))], lr=1.0)
    other.load_state_dict(loaded.optimizer)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(other.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])
    assert other.param_groups[0]["lr"] == 0.1
    raw = load_file(path)  # a plain safetensors file
    assert torch.equal(raw["model.w"], param.detach())
    assert torch.equal(load_weights(path)["optim.0.exp_avg"], raw["optim.0.exp_avg"])


def test_resume_continues_exactly(tmp_path) -> None:
    data = load_images("shapes", 16, 3, 64, seed=0)
    common = dict(batch=4, lr=1e-3, ema_decay=0.9, progress=False, lr_scheduler="cosine", lr_warmup_steps=1)
    straight = _tiny()
    whole = fit(straight, epsilon_objective(), data, LoopConfig(steps=4, **common))
    first = _tiny()
    begun = fit(first, epsilon_objective(), data, LoopConfig(steps=2, checkpoint_dir=tmp_path, **common), job={"m": 1})
    resumed = _tiny(seed=99)  # different starting weights: everything trainable must come from the checkpoint
    result = fit(resumed, epsilon_objective(), data, LoopConfig(steps=4, checkpoint_dir=tmp_path, resume=True,
                                                                **common), job={"m": 1})
    assert result.steps_run == 2 and result.resumed_from is not None and result.steps == 4
    # warm-up from 0 over 1 step, then a half cosine over the other 3; the resumed run continues the curve
    want = [0.0, *(0.5 * (1 + math.cos(math.pi * s / 3)) * 1e-3 for s in range(3))]
    assert whole.learning_rates == pytest.approx(want) and begun.learning_rates + result.learning_rates == \
        pytest.approx(want)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    assert latest_checkpoint(tmp_path).name == "step-00000004.safetensors"
    with pytest.raises(PaseError, match="another job"):
        fit(_tiny(), epsilon_objective(), data, LoopConfig(steps=5, checkpoint_dir=tmp_path, resume=True, **common),
            job={"m": 2})


def test_fp16_skips_overflowing_steps_and_resumes_its_loss_scale(tmp_path) -> None:
    """Under fp16 autocast with a loss scale far too large, every gradient overflows: the steps are skipped (the
    weights stay as they were) and the scale halves each time; a resumed run continues from the saved scale and
    ends where an unbroken run ends."""
    data = load_images("shapes", 16, 3, 64, seed=0)
    records: list[dict] = []
    common = dict(batch=4, lr=1e-3, progress=False, autocast="fp16")
    model = _tiny()
    fit(model, epsilon_objective(), data, LoopConfig(steps=3, loss_scale=2.0 ** 60, **common),
        after_step=[lambda step, record, _: records.append(record)])
    assert [r["loss_scale"] for r in records] == [2.0 ** 59, 2.0 ** 58, 2.0 ** 57]
    assert all(r["step_skipped"] for r in records)
    for (name, a), (_, b) in zip(model.named_parameters(), _tiny().named_parameters()):
        assert torch.equal(a, b), name  # nothing stepped
    usable = dict(common, loss_scale=2.0 ** 20)  # overflows now and then (steps 1, 2, 4, 5 here), else trains
    straight = _tiny()
    whole = fit(straight, epsilon_objective(), data, LoopConfig(steps=6, **usable))
    fit(_tiny(), epsilon_objective(), data, LoopConfig(steps=3, checkpoint_dir=tmp_path, **usable))
    assert load_checkpoint(latest_checkpoint(tmp_path)).settings["loss_scale"]["scale"] < 2.0 ** 20
    resumed = _tiny(seed=99)
    fit(resumed, epsilon_objective(), data, LoopConfig(steps=6, checkpoint_dir=tmp_path, resume=True, **usable))
    changed = [not torch.equal(a, b) for (_, a), (_, b) in zip(straight.named_parameters(), _tiny().named_parameters())]
    assert any(changed) and len(whole.losses) == 6  # some steps went through
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_loss_goes_down() -> None:
    data = load_images("shapes", 16, 3, 256, seed=0)
    result = fit(_tiny(), epsilon_objective(), data, LoopConfig(steps=40, batch=8, lr=2e-3, progress=False),
                 group=DataGroup.single())
    assert np.mean(result.losses[-10:]) < 0.7 * np.mean(result.losses[:5])
    assert result.trainable_params == sum(p.numel() for p in _tiny().parameters())
    assert result.optimizer_bytes == 2 * result.grad_bytes + 4 * len(list(_tiny().parameters()))  # 2 moments + step


def test_bad_loop_settings() -> None:
    with pytest.raises(PaseError, match="does not split"):
        LoopConfig(steps=1, batch=3).validate(2)
    with pytest.raises(PaseError, match="--resume needs --out"):
        LoopConfig(steps=1, batch=2, resume=True).validate(1)
    with pytest.raises(PaseError, match="--lr-scheduler 'warm'"):
        LoopConfig(steps=1, batch=2, lr_scheduler="warm").validate(1)
    with pytest.raises(PaseError, match="--lr-warmup-steps 5"):
        LoopConfig(steps=4, batch=2, lr_warmup_steps=5).validate(1)


def test_peak_memory_sees_a_transient_allocation() -> None:
    memory = PeakMemory("cpu").start()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    time.sleep(0.05)  # held as a training step holds activations (the sampler needs the GIL once)
    del block
    assert memory.stop() >= 60 * 2**20


_MAPPINGS = """
import ctypes, torch
from pase.train.memory import PeakMemory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
memory = PeakMemory("cpu").start()
large = torch.ones(8 * 2**20 // 4)
del large  # unpinned, glibc would now serve blocks below 8 MiB from the heap
before = libc.mallinfo2().hblks
blocks = [torch.ones(2**20 // 4) for _ in range(48)]  # 48 tensors of 1 MiB
print(memory.method, "|", libc.mallinfo2().hblks - before)
"""


def test_measured_tensors_get_their_own_mappings_so_freeing_them_returns_memory() -> None:
    """PeakMemory pins glibc's mmap threshold: every new tensor of 64 KiB and up is its own mapping (glibc's count
    of mmapped chunks, ``mallinfo2().hblks``, grows by one each), returned to the kernel when freed, even after a
    large free that would otherwise raise the threshold and send them to the heap, whose freed blocks stay
    resident. A fresh process: in a long one, freed heap blocks are reused first."""
    if "glibc" not in " ".join(platform.libc_ver()):
        pytest.skip("not glibc")
    done = subprocess.run([sys.executable, "-c", _MAPPINGS], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 0, done.stderr[-2000:]
    method, mappings = done.stdout.rsplit("|", 1)
    assert "mmap threshold 64 KiB" in method and int(mappings) >= 48


def test_saved_activation_bytes_on_meta_match_cpu() -> None:
    spec = ZOO["unet-tiny"]
    counts = []
    for device in ("meta", "cpu"):
        with torch.device(device):
            model = spec.build()
        counts.append(saved_activation_bytes(model, torch.zeros(2, 3, 16, 16, device=device),
                                             torch.zeros(2, dtype=torch.long, device=device)))
    assert counts[0] == counts[1] > 0


def test_cli_train_and_finetune_full_json(tmp_path) -> None:
    runner = CliRunner()
    common = ["--model", "unet-tiny", "--image-size", "16", "--data", "digits", "--batch", "2", "--no-progress",
              "--json"]
    trained = runner.invoke(app, ["train", "--steps", "2", "--out", str(tmp_path / "pre"), *common])
    assert trained.exit_code == 0, trained.output
    weights = tmp_path / "pre" / "model.safetensors"
    assert weights.is_file()
    result = runner.invoke(app, ["finetune", "--strategy", "full", "--steps", "2", "--init", str(weights), *common])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report)[-6:] == TAIL
    assert report["trainable_params"] == report["total_params"] == 702499
    assert report["grad_and_optimizer_bytes"] >= 12 * 702499  # grads + 2 AdamW moments (+ step counters)
    assert report["peak_memory_bytes"] >= 0  # RSS-based: in this long-lived process freed heap may be reused
    bad = runner.invoke(app, ["finetune", "--strategy", "lora", *common])
    assert isinstance(bad.exception, PaseError) and "unknown --strategy" in str(bad.exception)
