"""The CLI's leaf module: consoles, number formatting and the option checks every command shares.

Imports nothing heavy (no torch), so every command module can import it at load time.
"""
from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console

from pase import paths
from pase.errors import InputShapeError, PaseError

# Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
# No emoji codes: a PCI bus id such as 0000:ab:00.0 would print with an emoji in it.
console = Console(width=shutil.get_terminal_size((150, 24)).columns, emoji=False)
err_console = Console(stderr=True, width=shutil.get_terminal_size((150, 24)).columns, emoji=False)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


MAX_SEED = (1 << 63) - 1  # torch generators take seeds in [0, 2^63)
MAX_BATCH = 1 << 31  # no training step is larger; a larger --batch is a typo (and would make loops over it endless)


def finite(param: typer.CallbackParam, value: float | None) -> float | None:
    """A float option's callback: NaN and infinities are usage errors (click's ranges let NaN through, and a NaN
    learning rate or tolerance would run to a meaningless result)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number", param=param)
    return value


def check_precision(precision: str, option: str = "--precision") -> str:
    """``precision`` if pase knows it (fp32, bf16, fp16), else the user's error naming ``option``."""
    if precision not in DTYPES:
        raise PaseError(f"unknown {option} {precision!r}; choose one of {', '.join(DTYPES)}")
    return precision


def parse_input_shapes(values: list[str]) -> tuple[dict[str, tuple[int, ...]], list[tuple[int, ...]]]:
    """``name=8,4,64,64`` overrides a zoo input; a bare ``8,3,32,32`` is a positional input of a user model."""
    named: dict[str, tuple[int, ...]] = {}
    positional: list[tuple[int, ...]] = []
    for value in values:
        name, _, shape_text = value.rpartition("=")
        try:
            shape = tuple(int(part) for part in shape_text.replace("x", ",").split(",") if part.strip())
        except ValueError:
            raise InputShapeError(
                f"--input-shape {value!r} is not a shape: write comma-separated integers, batch first, "
                "e.g. 8,3,32,32 (or name=8,3,32,32 to override one input of a zoo model)") from None
        if any(d <= 0 for d in shape):
            raise InputShapeError(f"--input-shape {value!r} has a non-positive extent; every extent must be >= 1")
        if name:
            named[name] = shape
        else:
            positional.append(shape)
    return named, positional


def human(value: float, unit: str = "") -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 1000 or prefix == "P":
            return f"{value:.3g} {prefix}{unit}".strip()
        value /= 1000
    return f"{value:.3g}"


def size(value: float) -> str:
    if abs(value) < 1024:
        return f"{int(value)} B"
    for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or prefix == "TiB":
            return f"{value:.3g} {prefix}"
        value /= 1024
    return f"{value:.3g}"


def check_writable(path: Path | None, option: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, a path under a file, or a folder
    this user may not write (the nearest one that exists; missing folders are created)."""
    if path is None:
        return
    path = paths.expanded(path)
    if paths.is_dir(path):
        raise PaseError(f"{option} {path} is a folder; give the name of a file (in it, or elsewhere)")
    parent = path.absolute().parent
    while not paths.exists(parent):
        parent = parent.parent
    if not paths.is_dir(parent):
        raise PaseError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PaseError(f"{option} {path}: the folder {parent} is not writable; choose another path")


def write_output(path: Path, option: str, write: Callable[[Path], object], announce: bool = True) -> None:
    """``write(path)``; a path that cannot be written is the user's error, named with its option."""
    try:
        write(path)
    except OSError as exc:
        raise PaseError(f"cannot write {option} {path}: {exc.strerror or exc}") from None
    if announce:
        console.print(f"wrote {path}")


__all__ = ["DTYPES", "check_precision", "check_writable", "console", "err_console", "human", "parse_input_shapes",
           "size", "write_output"]
