"""What a training run reports while it runs: ``OUT/log.jsonl`` and, with ``--report-to tensorboard``, TensorBoard.

Rank 0 writes one JSON object per optimizer step (step, loss, learning rate, samples/s, seconds) to
``OUT/log.jsonl``, flushed as it goes, so a run can be followed with ``tail -f`` or loaded with pandas; a
resumed run first drops the lines of steps from its first on (a killed run may have logged steps it never
saved), so the file reads as one run. TensorBoard event files go to ``OUT/tensorboard/`` (scalars and
validation images).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pase import atomic
from pase.errors import PaseError

REPORTERS = ("none", "tensorboard")
LOG = "log.jsonl"


class RunLog:
    """Per-step records of one run on the reporting rank (``active``); a no-op elsewhere or without ``out``.
    Opened at the first record: its step tells where this run starts (after a resume, the checkpoint's next)."""
    def __init__(self, out: Path | None, report_to: str = "none", active: bool = True) -> None:
        if report_to not in REPORTERS:
            raise PaseError(f"--report-to {report_to!r}: choose one of {', '.join(REPORTERS)}")
        if report_to != "none" and out is None:
            raise PaseError(f"--report-to {report_to} writes under --out; give an --out folder")
        if report_to == "tensorboard":
            try:
                import tensorboard  # noqa: F401, PLC0415 - torch's SummaryWriter needs it
            except ImportError as exc:
                raise PaseError(f"--report-to tensorboard needs the tensorboard package ({exc}); pip install "
                                "tensorboard") from None
        self.out, self.report_to = out, report_to
        self.path = out / LOG if out is not None and active else None
        self.handle: Any = None
        self.writer: Any = None

    def _open(self, step: int) -> None:
        assert self.path is not None and self.out is not None
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            _keep_steps_before(self.path, step)
            self.handle = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise PaseError(f"cannot write the run log {self.path}: {exc}; check --out") from None
        if self.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"), purge_step=step)

    def record(self, step: int, values: dict[str, float]) -> None:
        if self.path is None:
            return
        if self.handle is None:
            self._open(step)
        self.handle.write(json.dumps({"step": step, **values}) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def __call__(self, step: int, values: dict[str, float], model: Any = None) -> None:
        """``fit``'s after-step hook."""
        self.record(step, values)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 image, to TensorBoard when it is on."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.writer is not None:
            self.writer.close()


def _keep_steps_before(path: Path, step: int) -> None:
    """Drop the records of ``step`` and later (a new run, starting at step 1, drops them all)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) < step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    atomic.write_text(path, "".join(f"{line}\n" for line in kept))


__all__ = ["LOG", "REPORTERS", "RunLog"]
