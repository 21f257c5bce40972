"""The header every versioned pase JSON file carries (``schema`` + ``schema_version``), checked in one place."""
from __future__ import annotations

from typing import Any

from pase.errors import PaseError


def check_header(data: Any, schema: str, version: int, what: str, rerun: str,
                 error: type[Exception] = PaseError) -> None:
    """Raise ``error`` naming what the file is not, or which version it has and how to get a readable one."""
    found = data.get("schema") if isinstance(data, dict) else None
    if found != schema:
        raise error(f"not a {what} (schema {found!r}, want {schema!r})")
    if data.get("schema_version") != version:
        raise error(f"{what} schema version {data.get('schema_version')} is not supported (this pase reads "
                    f"version {version}); re-run `{rerun}`")
