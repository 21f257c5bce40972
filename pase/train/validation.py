"""Validation images during text-to-image training: ``--validation-prompt P --validation-every N``.

Every ``N`` steps and after the last, the UNet's current weights are gathered at full size (a collective:
every rank takes part, whatever the plan shards), and rank 0 alone runs the pipeline folder's own diffusers
pipeline with them, at the training resolution, 20 inference steps and a fixed seed, so that images from
step to step differ only by training. The images of all prompts go into one PNG row,
``OUT/validation/step-NNNNNNNN.png`` (written atomically), and to TensorBoard when it is on. The other ranks
go on to the next step, whose first collective waits for rank 0 (the process group's timeout is 30 min).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pase import atomic
from pase.models import folders
from pase.runtime.state import full_state_dict
from pase.train.run_log import RunLog

INFERENCE_STEPS = 20


class Validation:
    """The ``after_step`` hook of ``fit`` that makes validation images (see the module docstring)."""
    def __init__(self, unet_folder: Path, pipeline: Path, prompts: list[str], every: int, total_steps: int,
                 resolution: int, out: Path | None, log: RunLog, device: torch.device, seed: int, is_main: bool,
                 distributed: bool) -> None:
        self.unet_folder, self.pipeline, self.prompts = unet_folder, pipeline, prompts
        self.every, self.total_steps, self.resolution = every, total_steps, resolution
        self.out, self.log, self.device, self.seed = out, log, device, seed
        self.is_main, self.distributed = is_main, distributed
        self.runner: Any = None  # the pipeline, built at the first validation (rank 0)
        self.saved: list[Path] = []

    def due(self, step: int) -> bool:
        return step == self.total_steps or bool(self.every and step % self.every == 0)

    def __call__(self, step: int, record: dict[str, float], model: nn.Module) -> None:
        """``fit``'s after-step hook: every rank calls it (the weights are gathered collectively)."""
        if not self.due(step):
            return
        weights = full_state_dict(model) if self.distributed else model.state_dict()
        if not self.is_main:
            return
        runner = self._runner()
        runner.unet.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        with torch.no_grad(), folders.quiet_loading():
            images = runner(self.prompts, num_inference_steps=INFERENCE_STEPS, height=self.resolution,
                            width=self.resolution, generator=generator, output_type="np").images
        row = (np.concatenate(list(images), axis=1).clip(0, 1) * 255).round().astype(np.uint8)
        self.log.image("validation", step, row)
        if self.out is not None:
            self.saved.append(_write_png(self.out / "validation" / f"step-{step:08d}.png", row))

    def _runner(self) -> Any:
        if self.runner is None:
            import diffusers  # noqa: PLC0415

            cls, config = folders.read_config(self.unet_folder)
            unet = getattr(diffusers, cls).from_config(config).to(self.device)
            index = json.loads((self.pipeline / "model_index.json").read_text())
            extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
            with folders.quiet_loading():
                self.runner = diffusers.DiffusionPipeline.from_pretrained(
                    self.pipeline, unet=unet, local_files_only=True, low_cpu_mem_usage=folders.LOW_MEMORY_LOAD,
                    **extra).to(self.device)
            self.runner.set_progress_bar_config(disable=True)
        return self.runner


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image  # noqa: PLC0415

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return atomic.write_bytes(path, buffer.getvalue())


__all__ = ["INFERENCE_STEPS", "Validation"]
