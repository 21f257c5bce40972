"""The plan file's declared JSON Schema, checked with ``jsonschema`` before any field is read.

A plan is data a user may edit by hand (or a file that is not a plan at all): every type and range the
runtime relies on is declared here once (positive batch, devices and microbatches, split factors of at
least 1, known precisions and schedules), so a bad file is refused in one line naming the field, never
run as something else or ended in a traceback. What needs the model (layer ids, dimension names, factors
that fit the world) is checked against its layer graph by ``pase.runtime.checks.check_model``.
"""
from __future__ import annotations

from typing import Any

from pase.errors import PaseError
from pase.schema import schema_error

MAX_DEVICES = 1 << 20  # no cluster has more; a larger number is a typo
MAX_FACTOR = 1 << 20
_NUMBER = {"type": "number"}
_COUNT = {"type": "integer", "minimum": 1}
_PREDICTION = {"type": "object", "required": ["step_seconds", "samples_per_second", "memory_bytes_per_device"],
               "properties": {"step_seconds": _NUMBER, "samples_per_second": _NUMBER,
                              "memory_bytes_per_device": _NUMBER, "compute_seconds": _NUMBER,
                              "communication_seconds": _NUMBER, "bubble_seconds": _NUMBER,
                              "gradient_sync_seconds": _NUMBER, "comm_bytes_per_device": _NUMBER,
                              "gradient_sync_bytes_per_device": _NUMBER, "micro_steps": _COUNT,
                              "optimizer_seconds": _NUMBER}}
PLAN_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "schema_version", "model", "model_fingerprint", "cluster", "devices", "batch",
                 "precision", "options", "layers", "predicted"],
    "properties": {
        "schema": {"const": "pase.plan"},
        "schema_version": {"type": "integer"},
        "model": {"type": "string", "minLength": 1},
        "model_fingerprint": {"type": "string", "minLength": 1},
        "cluster": {"type": "string"},
        "devices": {"type": "integer", "minimum": 1, "maximum": MAX_DEVICES},
        "batch": _COUNT,
        "precision": {"enum": ["bf16", "fp16", "fp32"]},
        "options": {"type": "object"},
        "layers": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "op", "block", "splits"],
            "properties": {"id": {"type": "string", "minLength": 1}, "op": {"type": "string"},
                           "block": {"type": "string"},
                           "splits": {"type": "object", "additionalProperties": {
                               "type": "integer", "minimum": 1, "maximum": MAX_FACTOR}},
                           "seconds": _NUMBER, "memory_bytes": _NUMBER, "runnable": {"type": "boolean"}}}},
        "predicted": _PREDICTION,
        "baselines": {"type": "object", "additionalProperties": {"anyOf": [{"type": "null"}, _PREDICTION]}},
        "baseline_notes": {"type": "object", "additionalProperties": {"type": "string"}},
        "search": {"type": "object"},
        "stages": {"type": "array", "items": {
            "type": "object", "required": ["layers", "devices", "seconds", "memory_bytes"],
            "properties": {"layers": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                           "devices": {"type": "array", "minItems": 1,
                                       "items": {"type": "integer", "minimum": 0, "maximum": MAX_DEVICES}},
                           "seconds": _NUMBER, "memory_bytes": _NUMBER,
                           "blocks": {"type": "array", "items": {"type": "string"}}, "in_flight": _COUNT}}},
        "microbatches": _COUNT,
        "schedule": {"enum": [None, "1f1b", "gpipe"]},
        "pipeline_replicas": _COUNT,
        "micro_steps": {"type": "integer", "minimum": 1, "maximum": 1 << 16},
        "blocks": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}, "checkpoint": {"type": "boolean"},
                           "sharding": {"enum": ["none", "optimizer", "gradients", "full"]}}}},
        "input_shapes": {"anyOf": [{"type": "null"}, {"type": "array", "minItems": 1, "items": {
            "type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1, "maximum": 1 << 31}}}]},
    },
}


def check_plan_data(data: Any, source: str = "plan file") -> None:
    """Raise ``PaseError`` in one line naming the first field of ``data`` the schema refuses, and the fix."""
    problem = schema_error(data, PLAN_JSON_SCHEMA)
    if problem is not None:
        raise PaseError(f"{source}: {problem}; re-run `pase plan --json` (or fix that field)")


__all__ = ["PLAN_JSON_SCHEMA", "check_plan_data"]
