"""Every rank of a job must read the same ``--init`` weights and, with ``--resume``, the same checkpoints in
``--out``. On several nodes that takes a file system they all share: a node that sees another folder would start
from other weights or another step, and then wait forever in a collective. So at start-up each rank describes what
it sees, the descriptions are gathered, and when they differ every rank stops with the same line naming the first
rank that differs and its host.

Only rank 0 writes to ``--out`` (weights, checkpoints, logs); the other ranks read it to resume.
"""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pase.errors import PaseError

_EDGE_BYTES = 1 << 20  # a weights file is told apart by its size and a hash of its first and last MiB


class DifferentViewsError(PaseError):
    """Ranks of one job see different ``--init`` files or ``--out`` checkpoints."""


def describe_view(out: Path | None, init: Path | None, resume: bool) -> dict[str, tuple[str, str]]:
    """What this rank will read, as option -> (its path, what is there): the ``--init`` file's size and edge hash,
    and with ``--resume`` the checkpoints in ``--out`` (names and sizes). Only what is there is compared (a shared
    folder may be mounted at different paths)."""
    view: dict[str, tuple[str, str]] = {}
    if init is not None:
        view["--init"] = (str(init), _file_digest(Path(init)))
    if resume and out is not None:
        view["--resume"] = (str(out), _checkpoints(Path(out)))
    return view


def _file_digest(path: Path) -> str:
    if not path.is_file():
        return "no such file"
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=8)
    with path.open("rb") as handle:
        digest.update(handle.read(_EDGE_BYTES))
        if size > 2 * _EDGE_BYTES:
            handle.seek(size - _EDGE_BYTES)
            digest.update(handle.read(_EDGE_BYTES))
    return f"{size} bytes, hash {digest.hexdigest()}"


def _checkpoints(out: Path) -> str:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return "no checkpoints"
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")
    return ", ".join(f"{p.name} ({p.stat().st_size} bytes)" for p in files) or "no checkpoints"


def check_same_view(view: dict[str, tuple[str, str]], distributed: bool) -> None:
    """Gather every rank's ``view``; raise ``DifferentViewsError`` on every rank when one differs from rank 0's."""
    if not distributed or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (socket.gethostname(), view))
    host0, view0 = gathered[0]
    for rank, (host, other) in enumerate(gathered):
        option = next((key for key in sorted({*view0, *other}) if _seen(view0, key) != _seen(other, key)), None)
        if option is None:
            continue
        raise DifferentViewsError(
            f"ranks see different {option}: rank 0 on {host0} sees {_told(view0, option)}, rank {rank} on {host} "
            f"sees {_told(other, option)}; on several nodes put --out and --init on a file system every node "
            "shares (only rank 0 writes there), or copy the same files to every node")


def _seen(view: dict[str, tuple[str, str]], option: str) -> str | None:
    return view[option][1] if option in view else None


def _told(view: dict[str, tuple[str, str]], option: str) -> str:
    return f"{view[option][0]}: {view[option][1]}" if option in view else "nothing"


__all__ = ["DifferentViewsError", "check_same_view", "describe_view"]
