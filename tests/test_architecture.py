"""The package layers hold: import-linter's contract (pyproject.toml) finds no upward import."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_no_module_imports_a_layer_above_its_own() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(lint).exists():
        pytest.skip("import-linter is not installed (pip install -e .[test])")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_bottom_layer_needs_nothing_above_it() -> None:
    """pase.process_group (with pase.rank_faults), pase.weights, pase.atomic, pase.schema and pase.errors import in
    a fresh interpreter without loading the graph, cost models or anything above."""
    code = ("import sys, pase.process_group, pase.weights, pase.atomic, pase.schema, pase.errors; "
            "print(sorted(m for m in sys.modules if m.startswith(('pase.', 'cost_models', 'strategies'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == str(sorted(["pase._version", "pase.atomic", "pase.errors", "pase.process_group",
                                                "pase.rank_faults", "pase.schema", "pase.weights"]))
