"""tools/gpu_validate.sh end to end on CPU (--dry): probe skipped, calibrate, plan, verify, report."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_writes_a_complete_report(tmp_path) -> None:
    out = tmp_path / "report"
    done = subprocess.run([str(ROOT / "tools" / "gpu_validate.sh"), "--dry", "--out", str(out)],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert not report["errors"]
    assert report["machine"]["dry"] and report["gpus"] == 2
    for case in report["cases"]:  # every case measured, predicted both ways, and ran as planned
        assert case["measured_s"] > 0 and case["predicted_catalog_s"] > 0 and case["predicted_calibrated_s"] > 0
        planned, total = case["layers_as_planned"].split("/")
        assert planned == total
        assert case["per_layer_kind"]["conv"]["measured_seconds"] > 0  # `pase verify --per-layer`, per kind
    assert {row["kind"] for row in report["per_kind"]} >= {"conv", "linear", "attention"}
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ops = {row["op"] for row in report["kernels"] if "error" not in row}  # tools/bench_kernels.py, each group
    assert ops == {"launch", "adamw", "conv3x3", "attention", "gemm", "groupnorm", "silu", "unet_forward"}, ops
    assert all(row["seconds"] > 0 for row in report["kernels"])
    [overhead] = report["step_overhead"]  # eager against the runtime, phase by phase
    assert overhead["eager"]["step"] > 0 and overhead["pase"]["step"] > 0 and overhead["pase_cpu_hot_ops"]


def test_without_a_gpu_it_says_to_use_dry(tmp_path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real run applies")
    done = subprocess.run([str(ROOT / "tools" / "gpu_validate.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--dry" in done.stderr
