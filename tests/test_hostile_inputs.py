"""Hostile inputs, property-based (hypothesis; targets in hostile_targets.py): mutated plan files, cost graphs,
calibration profiles, NVML recordings, safetensors files and mistyped command-line options end in a clean one-line
error or, when valid, are accepted: never a traceback. `python tools/hostile_inputs.py` runs thousands of cases
and prints the counts."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import hostile_targets as targets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("PASE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# each JSON file kind: how to get a valid one, and how pase reads it
DOCUMENTS: dict[str, tuple[Callable[[], Any], Callable[[bytes], str]]] = {
    "plan file": (lambda: targets.plan_base()[0], targets.plan_case),
    "cost graph": (targets.cost_graph_base, targets.cost_graph_case),
    "calibration profile": (lambda: json.loads(targets.PROFILE.read_text()), targets.profile_case),
    "NVML recording": (lambda: json.loads(targets.RECORDING.read_text()), targets.recording_case),
}


@pytest.mark.parametrize("kind", list(DOCUMENTS))
def test_mutated_files(kind: str) -> None:
    make, read = DOCUMENTS[kind]
    base = make()
    assert read(json.dumps(base).encode()) == "ok"  # the unmutated file is read without complaint

    @FUZZ
    @given(st.data())
    def case(data: st.DataObject) -> None:
        read(data.draw(targets.mutated(base)))

    case()


@FUZZ
@given(targets.safetensors_bytes())
def test_safetensors_files(data: bytes) -> None:
    targets.safetensors_case(data)


@FUZZ
@given(targets.cli_case())
def test_command_line_options(args: list[str]) -> None:
    assert targets.run_cli(args) == "clean", f"pase {' '.join(args)} was accepted"
