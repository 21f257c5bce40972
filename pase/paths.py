"""Questions about paths the user typed that never raise: a name too long for the file system, one with a NUL byte,
or ``~user`` for a user that does not exist is simply not an existing file or folder (``pathlib`` raises
``OSError``, ``ValueError`` or ``RuntimeError`` for those), so the caller's own "no such file" line applies."""
from __future__ import annotations

from pathlib import Path


def expanded(path: str | Path) -> Path:
    """``~`` expanded where it can be (``~nosuchuser`` stays as written)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def is_dir(path: str | Path) -> bool:
    try:
        return expanded(path).is_dir()
    except (OSError, ValueError):
        return False


def is_file(path: str | Path) -> bool:
    try:
        return expanded(path).is_file()
    except (OSError, ValueError):
        return False


def exists(path: str | Path) -> bool:
    try:
        return expanded(path).exists()
    except (OSError, ValueError):
        return False


__all__ = ["exists", "expanded", "is_dir", "is_file"]
