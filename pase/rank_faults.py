"""When one rank of a job fails, every other rank stops within seconds with one line naming it and its error.

- The failing rank writes ``rank R failed: <its error in one line>`` to the job's rendezvous store (the first
  failure wins) before it leaves the group. Under torchrun the store lives in the launcher's agent, so it outlives
  any rank.
- A rank whose collective then fails (gloo: "Connection closed by peer" as soon as the failed rank's sockets close;
  NCCL: its watchdog) or whom the launcher stops with SIGTERM reads that record and raises ``PeerFailure``: one line,
  no traceback. A rank that died without a word (SIGKILL, the OOM killer) is named by its process, when it ran on
  this host.
- ``watch_sigterm`` turns torchrun's SIGTERM (sent to the survivors when a rank exits with an error) into
  ``LauncherStop`` so that the survivors say why they stop instead of vanishing.

Below every other pase package: imports only the standard library, torch and ``pase.errors``.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch.distributed as dist

from pase.errors import PaseError

FAILURE_KEY = "pase/failure"
_FIRST_KEY = "pase/failure-count"
_PROCESS_KEY = "pase/process/{rank}"
READ_WAIT_S = 3.0  # how long a survivor waits for the failed rank's record: it is written before that rank leaves
# What gloo, NCCL and the store say when a peer is gone or never answers.
_COLLECTIVE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport",
                       "ProcessGroupGloo", "NCCL", "Timed out", "timed out", "monitoredBarrier", "Socket Timeout")


class PeerFailure(PaseError):
    """This rank stopped because another rank of the job failed (the message names it and its error)."""


class LauncherStop(BaseException):
    """The launcher (torchrun) sent SIGTERM: another rank has failed. A BaseException, like KeyboardInterrupt, so
    that no ``except Exception`` on the way swallows it."""


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: a PaseError's message, otherwise ``Type: first line``."""
    text = (str(exc).strip().splitlines() or [""])[0].strip()
    if isinstance(exc, PaseError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_collective_failure(exc: BaseException) -> bool:
    """Did ``exc`` (or an exception behind it) come from a collective or the store losing a peer, rather than from
    this rank's own work?"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (LauncherStop, PeerFailure, dist.DistError)):
            return True
        if isinstance(current, RuntimeError) and any(marker in str(current) for marker in _COLLECTIVE_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _store() -> dist.Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def register_process() -> None:
    """Record this rank's host and pid, so that a survivor can name a rank that died without a word."""
    store = _store()
    if store is not None:
        store.set(_PROCESS_KEY.format(rank=dist.get_rank()), f"{socket.gethostname()}:{os.getpid()}")


def record_failure(exc: BaseException) -> None:
    """Tell the other ranks that this one failed with ``exc`` (the first failure of the job is the one kept)."""
    store = _store()
    if store is None:
        return
    try:
        if store.add(_FIRST_KEY, 1) == 1:
            store.set(FAILURE_KEY, f"rank {dist.get_rank()} failed: {one_line(exc)}")
    except Exception:  # noqa: BLE001 - the store may be gone with the rank that hosted it; the error still prints
        pass


def peer_failure(exc: BaseException) -> PeerFailure:
    """The one-line error for a rank whose collective failed (or whom the launcher stopped) because of another."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    store = _store()
    reported, gone = _await_record(store)
    if reported:
        return PeerFailure(f"rank {rank} stopped because {reported}")
    who = f"rank {', '.join(map(str, gone))}" if gone else "another rank"
    return PeerFailure(f"rank {rank} stopped because {who} left the job without an error message (killed by a "
                       f"signal or out of memory?; {_symptom(exc)}); see that rank's output and the launcher's summary")


def _await_record(store: dist.Store | None) -> tuple[str | None, list[int]]:
    """(the failed rank's record, ranks on this host known dead): polls for the record up to ``READ_WAIT_S``,
    half a second when a rank of this host is already gone (a killed rank writes none)."""
    started = time.monotonic()
    local = _local_peers(store)  # read once: every rank registered at start-up
    while True:
        reported = _read(store, FAILURE_KEY)
        if reported:
            return reported, []
        gone = [rank for rank, pid in local.items() if not _alive(pid)]
        waited = time.monotonic() - started
        if waited > READ_WAIT_S or (gone and waited > 0.5) or store is None:
            return None, gone
        time.sleep(0.1)


def _symptom(exc: BaseException) -> str:
    """What this rank saw, in a few words."""
    if isinstance(exc, LauncherStop):
        return "the launcher stopped this rank"
    text = str(exc)
    marker = next((m for m in _COLLECTIVE_MARKERS[:3] if m in text), None)
    return f"its collective saw {marker!r}" if marker else one_line(exc)


def _read(store: dist.Store | None, key: str) -> str | None:
    """``key``'s value if it is set now (``check`` first: a ``get`` or ``wait`` of a missing key blocks, then prints
    C++ warnings), None otherwise or when the store is gone."""
    if store is None:
        return None
    try:
        return bytes(store.get(key)).decode(errors="replace") if store.check([key]) else None
    except Exception:  # noqa: BLE001 - no store (it went with the rank that hosted it): the caller says what it can
        return None


def _local_peers(store: dist.Store | None) -> dict[int, int]:
    """{rank: pid} of the other ranks registered on this host."""
    if store is None or not dist.is_initialized():
        return {}
    host, peers = socket.gethostname(), {}
    for rank in range(dist.get_world_size()):
        record = _read(store, _PROCESS_KEY.format(rank=rank)) if rank != dist.get_rank() else None
        if record and record.rpartition(":")[0] == host:
            peers[rank] = int(record.rpartition(":")[2])
    return peers


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class _SigtermWatch:
    """SIGTERM raises ``LauncherStop`` once; after ``ignore()`` (while a failure is being reported) it does nothing."""

    def __init__(self) -> None:
        self.quiet = False

    def ignore(self) -> None:
        self.quiet = True

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        if not self.quiet:
            self.quiet = True
            raise LauncherStop("the launcher stopped this rank (SIGTERM)")


@contextmanager
def watch_sigterm() -> Iterator[_SigtermWatch]:
    """Within the block (main thread only), SIGTERM raises ``LauncherStop`` instead of ending the process
    silently; the previous handler is restored after."""
    watch = _SigtermWatch()
    if threading.current_thread() is not threading.main_thread():
        yield watch
        return
    previous = signal.signal(signal.SIGTERM, watch)
    try:
        yield watch
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["FAILURE_KEY", "LauncherStop", "PeerFailure", "is_collective_failure", "one_line", "peer_failure",
           "record_failure", "register_process", "watch_sigterm"]
