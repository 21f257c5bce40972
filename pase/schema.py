"""Reading pase's JSON files in one place: the file itself (``read_json``: missing, a folder, not JSON), its top
level (``require_object``) and the header every versioned file carries (``schema`` + ``schema_version``)."""
from __future__ import annotations

import json
from pathlib import Path
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


def read_json(path: str | Path, what: str, fix: str, error: type[Exception] = PaseError) -> Any:
    """The JSON value in ``path``, or one ``error`` line naming the file, what it should be and ``fix``: a missing
    file, a folder, an unreadable file, bytes that are not UTF-8 JSON (or nest too deep to parse)."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not a file; {fix}")
    if not path.exists():
        raise error(f"{what} {path} does not exist; {fix}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}; {fix}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{what} {path} is not JSON ({str(exc).splitlines()[0][:200]}); {fix}") from None


def schema_error(data: Any, schema: dict[str, Any]) -> str | None:
    """``where: what`` for the first part of ``data`` that the JSON Schema ``schema`` refuses (jsonschema's best
    match), or None when it conforms."""
    from jsonschema import Draft202012Validator  # noqa: PLC0415 - only file loading needs it
    from jsonschema.exceptions import best_match  # noqa: PLC0415

    error = best_match(Draft202012Validator(schema).iter_errors(data))
    if error is None:
        return None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    return f"{where or 'top level'}: {error.message}"


def require_object(data: Any, what: str, fix: str, error: type[Exception] = PaseError) -> dict[str, Any]:
    """``data`` when it is a JSON object, else one ``error`` line."""
    if not isinstance(data, dict):
        raise error(f"{what} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data
