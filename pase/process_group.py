"""The torch.distributed process group every pase entry point runs in (the runtime's ``pase.distributed``,
training, sampling, calibration), so that they agree on the backend, on where a rank computes, on how a
process learns its place in the job, and on how the group ends.

- Backend: NCCL when CUDA devices are visible, gloo otherwise; a rank computes on GPU ``LOCAL_RANK``
  (modulo the visible count) under NCCL and on the CPU under gloo.
- Launch: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or ranks a
  local spawner started that meet on a free port of 127.0.0.1.
- Teardown is explicit and bounded: collect the garbage that holds the group (DDP wrappers), a barrier
  that waits a bounded time, then ``destroy_process_group``; gloo can hang at exit without it
  (a rank stuck in ProcessGroupGloo's destructor). After an error the barrier is skipped: the other ranks may never
  reach it (torchrun, or ``spawn``'s deadline, stops them).

Below every other pase package: imports only the standard library, torch, ``pase.errors`` and ``pase.rank_faults``.
"""
from __future__ import annotations

import gc
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pase.errors import PaseError
from pase.rank_faults import (
    PeerFailure,
    is_collective_failure,
    peer_failure,
    record_failure,
    register_process,
    watch_sigterm,
)

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; long enough for a first step that compiles or loads


def _has_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def pick_backend() -> str:
    """NCCL on a machine with CUDA devices, gloo otherwise."""
    return "nccl" if _has_gpu() else "gloo"


def pick_device(local_rank: int) -> torch.device:
    """Where rank ``local_rank`` of this host computes: its GPU when there are any, else the CPU."""
    return torch.device("cuda", local_rank % torch.cuda.device_count()) if _has_gpu() else torch.device("cpu")


@dataclass(frozen=True)
class Launch:
    """A process's place in a job: its rank, the world's size, its rank on this host (which picks its GPU),
    and where the ranks meet (a torch ``init_method``; None when nobody said)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    init_method: str | None = None

    @classmethod
    def from_torchrun(cls) -> Launch | None:
        """What torchrun puts in the environment; None in a process it did not start (no WORLD_SIZE)."""
        env = os.environ
        if "WORLD_SIZE" not in env:
            return None
        meets = "MASTER_ADDR" in env and "MASTER_PORT" in env
        world = int(env["WORLD_SIZE"])
        if world <= 1 and not meets:  # a world of one needs no rendezvous address
            return cls.local()
        return cls(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")), "env://" if meets else None)

    @classmethod
    def local(cls, rank: int = 0, world_size: int = 1, port: int | None = None) -> Launch:
        """Rank ``rank`` of ``world_size`` processes on this host, meeting at 127.0.0.1:``port`` (default: a
        free one, which suits a world of one)."""
        return cls(rank, world_size, rank, f"tcp://127.0.0.1:{port or free_port()}")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (for rank 0's rendezvous store)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def open_group(launch: Launch, backend: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group ``launch`` describes (backend: ``pick_backend()`` unless given), every collective
    bounded by ``timeout_s``; returns this rank's device."""
    if launch.init_method is None:
        raise PaseError(f"WORLD_SIZE is {launch.world_size} but MASTER_ADDR and MASTER_PORT are not both set: "
                        "launch with torchrun (torchrun --nproc-per-node N -m pase ...)")
    backend = backend or pick_backend()
    device = pick_device(launch.local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=launch.init_method, rank=launch.rank,
                            world_size=launch.world_size, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    if launch.world_size > 1:
        register_process()
    return device


def close_group(timeout_s: float = DEFAULT_TIMEOUT_S, *, barrier: bool = True) -> None:
    """Leave the process group (if any): garbage first, then (unless ``barrier`` is False, after an error) wait
    at most ``timeout_s`` for every rank, then destroy it, even when the wait failed."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    try:
        if barrier:
            _bounded_barrier(timeout_s)
    finally:
        dist.destroy_process_group()


def _bounded_barrier(timeout_s: float) -> None:
    """gloo's monitored barrier gives up after ``timeout_s`` and names the missing ranks, and leaves nothing
    pending that would stall ``destroy_process_group``; NCCL's barrier is bounded by the group's timeout (its
    watchdog stops the process)."""
    if dist.get_backend() != "gloo":
        dist.barrier()
        return
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PaseError(f"not every rank reached the end of the run within {timeout_s:g} s: {detail}") from exc


@contextmanager
def leaving_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """``close_group`` after the block: with the barrier when the block succeeded, at once after an error (the
    other ranks may never reach the barrier, and the error, not a timeout, is what the user must see).

    In a job of several ranks (``pase.rank_faults``): a rank's own error is recorded for the others before it
    leaves; a rank stopped by another's failure (a collective that lost its peer, or torchrun's SIGTERM) raises
    ``PeerFailure``, one line naming the failed rank and its error."""
    with watch_sigterm() as sigterm:
        try:
            yield
        except BaseException as exc:
            sigterm.ignore()  # torchrun's SIGTERM must not cut short the line that says why this rank stops
            failure = _job_failure(exc)
            close_group(timeout_s, barrier=False)
            if failure is not None:
                raise failure from exc
            raise
    close_group(timeout_s)


def _job_failure(exc: BaseException) -> PeerFailure | None:
    """``PeerFailure`` when ``exc`` means another rank failed; otherwise record ``exc`` as this rank's failure."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if isinstance(exc, SystemExit) and not exc.code:
        return None
    if is_collective_failure(exc):
        return peer_failure(exc)
    record_failure(exc)
    return None


@contextmanager
def process_group(launch: Launch, backend: str | None = None, *,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[torch.device]:
    """``open_group`` for the block, yielding this rank's device; then ``leaving_group``'s teardown."""
    device = open_group(launch, backend, timeout_s=timeout_s)
    with leaving_group(timeout_s):
        yield device


def spawn(worker: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout_s: float) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` fresh processes and wait at most ``timeout_s`` for all of them;
    any still alive then (or after one failed) is killed. Raises TimeoutError, or torch's ``ProcessException``
    for the first rank that failed."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} processes did not finish within {timeout_s:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


__all__ = ["DEFAULT_TIMEOUT_S", "Launch", "close_group", "free_port", "leaving_group", "open_group",
           "pick_backend", "pick_device", "process_group", "spawn"]
