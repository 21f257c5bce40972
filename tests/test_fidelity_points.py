"""The validation set of tools/bench_fidelity.py: every point names its source and what it measured, every point the
tool prices exists, and each is priced on the stack it ran (MLPerf's CUDA-graphed steps; the papers' eager ones)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():  # noqa: ANN202 - the tool's module
    spec = importlib.util.spec_from_file_location("_pase_bench_fidelity", ROOT / "tools" / "bench_fidelity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_point_has_a_source_a_value_and_a_unit() -> None:
    points = json.loads((ROOT / "tools" / "data" / "fidelity_points.json").read_text())["points"]
    ids = [p["id"] for p in points]
    assert len(ids) == len(set(ids))
    for point in points:
        assert point["kind"] in ("training", "sampling"), point["id"]
        assert point["source_url"].startswith("http") and point["value"] > 0 and point["unit"], point["id"]
    tool = _tool()
    assert set(tool.SAMPLING) <= set(ids)  # every sampling point the tool prices is in the set
    for point_id in tool.SAMPLING:  # the papers' SD-v2 samples at 768 px, and the data says where that comes from
        point = next(p for p in points if p["id"] == point_id)
        assert point["resolution_px"] == 768 and point["resolution_source"]
    priced = [p for p in points if p["kind"] == "training" and tool.why_skipped(p) is None]
    assert len(priced) >= 10 and len({tool.catalog_gpu(p["gpu"]) for p in priced}) >= 3
    assert {tool.point_stack(p) for p in priced if p["id"].startswith("mlperf")} == {"graphed"}
    assert tool.point_stack({"id": "nemo-controlnet-a100-1gpu-bs8"}) == "eager"


def test_published_gpu_names_map_to_the_catalog() -> None:
    tool = _tool()
    assert tool.catalog_gpu("H100-SXM5-80GB") == "H100-SXM"
    assert tool.catalog_gpu("A100-SXM4-40GB") == "A100-40GB-SXM"
    assert tool.catalog_gpu("GB200 (B200 GPU in Grace-Blackwell superchip, 186GB)") == "GB200"
    assert tool.catalog_gpu("Intel-Gaudi2-96GB") is None
    assert tool.cluster_spec({"gpu": "H100-SXM5-80GB", "gpus": 64, "interconnect": "InfiniBand NDR"}) == \
        "8x8xH100-SXM+IB-NDR400x8"
