"""One run per output folder: ``OUT/.pase-run.lock`` is held while a run writes there, a folder that holds an
earlier run is continued only with ``--resume`` or replaced only with ``--overwrite``, and temporary files a killed
run left (``*.pase-tmp``, see ``pase.atomic``) are removed before the new run writes.

Rank 0 takes the lock and decides; the other ranks of the job learn the outcome from one broadcast, so a run that
cannot start fails on every rank with the same line, at once. The lock is an ``flock`` (the kernel releases it
when its process ends, however it ends: no stale locks); the file names the holder's pid and host for the
message another run gets.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from pase.atomic import TEMP_SUFFIX
from pase.errors import PaseError

LOCK = ".pase-run.lock"
RUN_STATE = ("checkpoints", "log.jsonl", "validation", "tensorboard")  # what would mix with a new run's


class OutFolderError(PaseError):
    """An --out folder another run holds, or holds an earlier run's results."""


@dataclass
class OutLock:
    """An exclusive ``flock`` on the lock file, held through an open descriptor: the kernel drops it when the run
    ends in any way (SIGKILL included), so a lock is never stale. The file itself stays (empty when free)."""
    fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(self.fd)


@contextlib.contextmanager
def owned_out(out: Path | None, resume: bool, overwrite: bool, is_main: bool = True,
              distributed: bool = False) -> Iterator[None]:
    """The job's hold on ``out`` (nothing without one) for the duration of the block."""
    if out is None:
        yield
        return
    lock, problem = None, None
    if is_main:
        try:
            lock = claim(out, resume, overwrite)
        except PaseError as exc:
            problem = str(exc)
    if distributed:  # every rank learns rank 0's outcome: all start, or all stop with its line
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise OutFolderError(problem)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def claim(out: Path, resume: bool, overwrite: bool) -> OutLock:
    """Take ``out`` for this run (see the module docstring); raises OutFolderError with the way out."""
    if resume and overwrite:
        raise OutFolderError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if out.exists() and not out.is_dir():
        raise OutFolderError(f"--out {out} is a file; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = _take_lock(out / LOCK)
    except OSError as exc:  # read-only, no space, not permitted
        raise OutFolderError(f"cannot write in --out {out} ({exc.strerror or exc}); choose a folder you can "
                             "write") from None
    try:
        earlier = [name for name in RUN_STATE if (out / name).exists()]
        if earlier and not (resume or overwrite):
            raise OutFolderError(f"--out {out} holds an earlier run ({', '.join(earlier)}); continue it with "
                                 "--resume, replace it with --overwrite, or choose another --out")
        if overwrite:
            for name in earlier:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        remove_temporaries(out)
    except BaseException:
        lock.release()
        raise
    return lock


def remove_temporaries(out: Path) -> list[Path]:
    """Delete the half-written files (``*.pase-tmp``) a killed run left under ``out``."""
    stray = sorted(out.rglob(f"*{TEMP_SUFFIX}"))
    for path in stray:
        with contextlib.suppress(OSError):
            path.unlink()
    return stray


def _take_lock(path: Path) -> OutLock:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode("utf-8", "replace")
        os.close(fd)
        raise OutFolderError(f"--out {path.parent} is in use by another run ({_describe(holder)}); wait for it to "
                             "finish or choose another --out") from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(), 0)
    return OutLock(fd)


def _describe(holder: str) -> str:
    try:
        record = json.loads(holder)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["started"])))
        return f"pid {int(record['pid'])} on {record['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "a run starting this instant"


__all__ = ["LOCK", "OutFolderError", "OutLock", "claim", "owned_out", "remove_temporaries"]
