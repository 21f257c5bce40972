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
        assert point["kind"] in ("training", "sampling", "inference"), point["id"]
        # a publication's address, or a measurement of pase's own kept in the repository (marked apart)
        published = (point.get("source_url") or "").startswith("http")
        assert published or (ROOT / point["source_file"]).is_file(), point["id"]
        assert point["value"] > 0 and point["unit"], point["id"]
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


def test_points_are_priced_in_the_configuration_they_ran() -> None:
    """MLPerf v3.1's NeMo ran plain DDP with a per-device fused Adam: those points say so, with the config file, and
    are priced as pase's ddp baseline; every MLPerf point clipped (NVIDIA's gradient_clip_val 1.0); pase's own
    single-H200 steps did not, ran eagerly, and their values are batch / the recorded step time."""
    points = json.loads((ROOT / "tools" / "data" / "fidelity_points.json").read_text())["points"]
    v31 = [p for p in points if p["id"].startswith("mlperf31-") and "gaudi" not in p["id"]]
    assert v31 and all(p["configuration"] == "ddp" and "megatron_fused_adam" in p["configuration_source"]
                       for p in v31)
    assert all(p.get("gradient_clipping", True) for p in points if p["id"].startswith("mlperf"))
    own = [p for p in points if p.get("source_file")]
    assert len(own) == 2 and all(p["gpus"] == 1 and p["stack"] == "eager" and p["gradient_clipping"] is False
                                 for p in own)
    recorded = {e["batch"]: e["eager"]["step"] for e in json.loads((ROOT / own[0]["source_file"]).read_text())}
    for point in own:
        assert point["value"] == round(point["global_batch"] / recorded[point["global_batch"]], 2)
    tool = _tool()
    assert all(tool.point_stack(p) == "eager" for p in own)


def test_the_reference_codes_multi_gpu_runs_are_priced_on_its_runtime() -> None:
    """The ParaDiGMS README's multi-GPU runs (its table, its plot beyond one GPU) ran torch.nn.DataParallel in one
    process, and are priced so (with the code's own source for it); the final abstract's 14.6 s, whose run is not
    published, is listed and not priced; each plot point names the run its convergence comes from."""
    points = {p["id"]: p for p in json.loads((ROOT / "tools" / "data" / "fidelity_points.json").read_text())["points"]}
    tool = _tool()
    for point_id, (sampler, _steps, _scheduler, gpus, _measure) in tool.SAMPLING.items():
        point = points[point_id]
        if point_id.startswith("paradigms") and sampler == "paradigms" and gpus > 1:
            assert point["runtime"] == "nn.DataParallel" and "DataParallel" in point["runtime_source"], point_id
        if "convergence_from" in point.get("run", {}):  # a run with both counts, which lay out its passes
            assert {"passes", "evaluations"} <= set(points[point["run"]["convergence_from"]]["run"])
    assert points["paradigms-sd2-ddpm1000-parallel"]["value"] == 16.2  # the table's time, paired with its counts
    assert "paradigms-sd2-ddpm1000-abstract" not in tool.SAMPLING
    assert "not published" in tool.sampling_skipped(points["paradigms-sd2-ddpm1000-abstract"])


def test_inference_points_price_the_network_call_they_timed() -> None:
    """diffusers' published SD-1.5 steps/s: under guidance each step calls the UNet on twice the images, on an eager
    stack, on GPUs the catalog holds, of 3+ architectures; pase's price of the call falls with the batch and each
    point's error is its steps/s against the published one."""
    points = [p for p in json.loads((ROOT / "tools" / "data" / "fidelity_points.json").read_text())["points"]
              if p["kind"] == "inference"]
    tool = _tool()
    assert len(points) >= 12 and len({p["arch"] for p in points}) >= 3
    for point in points:
        assert point["unet_batch"] == 2 * point["images_per_call"] and point["stack"] == "eager", point["id"]
        assert tool.catalog_gpu(point["gpu"]) is not None and point["source_url"].startswith("https://"), point["id"]
    a100 = sorted((p for p in points if p["gpu"] == "A100"), key=lambda p: p["unet_batch"])
    priced = [tool.predict_inference(p) for p in (a100[0], a100[-1])]
    assert priced[0][1] == priced[1][1] == "A100-80GB-SXM"
    assert priced[0][0] > priced[1][0] > 0  # more latents per call: fewer steps per second
