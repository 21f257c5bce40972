"""Atomic, durable file writes: a temp file in the same folder, flushed to disk, then a rename (and the folder
synced), so neither a crash nor a power cut leaves half a file or an old name pointing at unwritten data."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".pase-tmp"  # a half-written file a killed run left: removed when a run takes its folder


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it, which races with threads


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (creating parent folders); returns the path."""
    return _write(Path(path), lambda handle: handle.write(data))


def copy_file(source: str | Path, path: str | Path) -> Path:
    """Copy ``source`` to ``path`` atomically, streamed (a multi-GB weights file is never held in memory)."""
    with Path(source).open("rb") as reading:
        return _write(Path(path), lambda handle: shutil.copyfileobj(reading, handle, 16 * 2**20))


def _write(path: Path, fill: Callable[[BinaryIO], object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            # mkstemp makes the file private (0600): give it a normal file's mode, where the file system has modes
            with contextlib.suppress(OSError):
                os.fchmod(handle.fileno(), 0o666 & ~UMASK)
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)  # and the rename itself survives a power cut
    return path


def _sync_folder(folder: Path) -> None:
    """fsync a folder (where the platform allows opening one), so a rename in it is durable."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))

