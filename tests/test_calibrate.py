"""Calibration with 2 gloo processes, and how rates choose measured over catalog figures."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from cost_models.calibrate import fit_alpha_beta, load_profile
from cost_models.cluster import parse_spec
from cost_models.conventions import BUS_FACTOR, bytes_per_element
from cost_models.rates import HardwareRates
from pase.errors import PaseError


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """One real calibration run through the CLI: 2 gloo processes under a hard timeout."""
    out = tmp_path_factory.mktemp("calibration") / "profile.json"
    result = subprocess.run(
        [sys.executable, "-m", "pase", "hw", "calibrate", "--nproc", "2", "--sizes", "4K,64K,1M",
         "--iterations", "3", "--model", "unet-tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "busbw" in result.stdout and "saved" in result.stdout
    return load_profile(out)


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_measured_quantity_is_positive_and_finite(profile) -> None:
    assert profile["backend"] == "gloo" and profile["world_size"] == 2
    assert set(profile["collectives"]) == set(BUS_FACTOR)
    for op, by_group in profile["collectives"].items():
        assert list(by_group) == ["2"], op
        entry = by_group["2"]
        assert [p["bytes"] for p in entry["points"]] == [4096, 65536, 1 << 20], op
        for point in entry["points"]:
            assert all(_positive(point[k]) for k in ("seconds", "algbw_gbps", "busbw_gbps")), (op, point)
            assert point["busbw_gbps"] == pytest.approx(point["algbw_gbps"] * BUS_FACTOR[op](2))
        assert all(_positive(entry[k]) for k in ("alpha_us", "algbw_gbps", "busbw_gbps")), op
    assert {"conv", "linear", "attention", "group_norm"} <= set(profile["compute"])
    for kind, entry in profile["compute"].items():
        rate = entry.get("flops_per_second", entry.get("bytes_per_second"))
        assert _positive(rate), kind
        assert entry["samples"] and all(_positive(s["seconds"]) for s in entry["samples"])
    assert _positive(profile["memory_bandwidth"]["bytes_per_second"])
    assert len(profile["fingerprint"]["id"]) == 12


def test_rates_prefer_the_profile_and_say_so(profile) -> None:
    cluster = parse_spec("2xL40S")
    measured = HardwareRates(cluster, profile)
    catalog = HardwareRates(cluster)
    assert measured.compute("conv").value == pytest.approx(profile["compute"]["conv"]["flops_per_second"])
    assert measured.compute("conv").source.startswith("measured")
    assert catalog.compute("conv").source.startswith("catalog")
    assert catalog.compute("conv").value == pytest.approx(362e12 * cluster.efficiency["conv"])
    ring = measured.collective("all_reduce", [0, 1])
    assert ring.source.startswith("measured")
    assert ring.busbw_gbps == profile["collectives"]["all_reduce"]["2"]["busbw_gbps"]
    assert catalog.collective("all_reduce", [0, 1]).source.startswith("topology")


def test_a_profile_from_other_hardware_is_refused(profile) -> None:
    from cost_models.rates import profile_mismatch

    reason = profile_mismatch(parse_spec("8xH100-SXM"), profile)
    assert reason and "cpu" in reason and "H100-SXM" in reason


def test_alpha_beta_fit_recovers_a_known_line() -> None:
    alpha, algbw = 20e-6, 5e9  # 20 us and 5 GB/s
    points = [{"bytes": b, "seconds": alpha + b / algbw, "algbw_gbps": b / (alpha + b / algbw) / 1e9,
               "busbw_gbps": 0.0} for b in (1 << 12, 1 << 16, 1 << 20, 1 << 24)]
    for p in points:
        p["busbw_gbps"] = p["algbw_gbps"]
    fit = fit_alpha_beta(points, bus_factor=1.0)
    assert fit["alpha_us"] == pytest.approx(20, rel=1e-6)
    assert fit["algbw_gbps"] == pytest.approx(5, rel=1e-6)


def test_collective_time_follows_nccl_tests_convention() -> None:
    from cost_models.rates import CollectiveRate

    rate = CollectiveRate(alpha_s=1e-5, busbw_gbps=100, source="test")
    assert rate.seconds("all_reduce", 1e9, 8) == pytest.approx(1e-5 + 1e9 * 2 * 7 / 8 / 100e9)
    assert rate.seconds("all_reduce", 1e9, 1) == 0.0


def test_profile_file_is_json(profile, tmp_path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    assert load_profile(path)["format"] == "pase-calibration"
    path.write_text(json.dumps({**profile, "format": "other"}))
    with pytest.raises(PaseError, match=r"calibration profile .*p.json: format: 'pase-calibration' was expected"):
        load_profile(path)
    path.write_text(json.dumps({**profile, "compute": {"conv": {"flops_per_second": -1}}}))
    with pytest.raises(PaseError, match=r"compute.conv.flops_per_second: -1 is less than or equal to"):
        load_profile(path)
    for text, needle in (("[1, 2]", "is not of type 'object'"), ("{", "is not JSON")):
        path.write_text(text)
        with pytest.raises(PaseError, match=needle):
            load_profile(path)
    with pytest.raises(PaseError, match="is a folder"):
        load_profile(tmp_path)


def test_group_sizes() -> None:
    from cost_models.calibrate import group_sizes

    assert group_sizes(2) == [2]
    assert group_sizes(8) == [2, 4, 8]
    assert group_sizes(6) == [2, 4, 6]
    assert group_sizes(1) == []  # one process: no collective to time


@pytest.mark.slow  # 10 s; calibration on 2 processes runs in the default suite
def test_one_process_times_compute_and_memory_only(tmp_path) -> None:
    """A one-GPU machine calibrates too (first seen failing on an H200): compute and memory, no collectives;
    and what it writes prices a plan."""
    out = tmp_path / "one.json"
    result = subprocess.run([sys.executable, "-m", "pase", "hw", "calibrate", "--nproc", "1", "--backend", "gloo",
                             "--iterations", "2", "--model", "unet-tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    profile = load_profile(out)
    assert profile["world_size"] == 1 and not any(profile["collectives"].values())
    assert all(_positive(entry.get("flops_per_second", entry.get("bytes_per_second")))
               for entry in profile["compute"].values())
    rates = HardwareRates(parse_spec("2xH100-SXM"), profile=profile)
    assert rates.compute("conv").source.startswith("measured")
    assert not rates.collective("all_reduce", [0, 1]).source.startswith("measured")  # none measured: topology


def test_a_chunked_projection_is_timed_at_its_own_size() -> None:
    """GEGLU's projection carries a second output dim (c_out_N): the stand-in's input is rows x c_in, not rows x
    c_in x N (which asked an H200 for 200 GiB at SD-1.5's batch 8)."""
    import torch

    from cost_models.calibrate import build_layer_op

    dims = {"n": 8, "s": 4096, "c_out": 2560, "c_in": 320, "c_out_1280": 1280}
    _, leaves, flops, _ = build_layer_op("linear", dims, {}, torch.device("meta"), torch.bfloat16)
    assert [tuple(t.shape) for t in leaves] == [(8, 4096, 320), (2560, 320)]
    assert flops == 3 * 2 * 8 * 4096 * 2560 * 320


def test_a_group_spanning_nodes_drives_one_nic_share_per_member() -> None:
    """Every GPU's group crosses the network at once, so a hop gets one GPU's share of its node's NICs; a group
    with m members on each node gets m shares (NCCL runs a channel per NIC). 2 nodes of 8 A100s with 4 HDR NICs
    (25 GB/s each, 90% achieved): one GPU per node 4 x 25 / 8 x 0.9 = 11.25 GB/s, a full-node ring 8x that,
    which is what nccl-tests measure on such nodes (85-96 GB/s bus bandwidth)."""
    cluster = parse_spec("2x8xA100-80GB-SXM+IB-HDRx4")
    rates = HardwareRates(cluster)
    share = cluster.network.gbps * 4 / 8 * cluster.network.achieved_fraction
    assert rates.collective("all_reduce", [0, 8]).busbw_gbps == pytest.approx(share)
    assert rates.collective("all_reduce", list(range(0, 16, 2))).busbw_gbps == pytest.approx(4 * share)
    assert rates.collective("all_reduce", list(range(16))).busbw_gbps == pytest.approx(8 * share)
    inside = rates.collective("all_reduce", list(range(8))).busbw_gbps  # NVLink inside one node is not capped
    assert inside > 8 * share


def test_bus_factors_and_element_sizes() -> None:
    """nccl-tests' bus factors for a group of 4, and the planner's bytes per element."""
    assert {op: factor(4) for op, factor in BUS_FACTOR.items()} == \
        {"all_reduce": 1.5, "all_gather": 0.75, "reduce_scatter": 0.75, "send_recv": 1.0}
    assert [bytes_per_element(p) for p in ("bf16", "fp16", "fp32")] == [2, 2, 4]
    assert bytes_per_element("fp32", 8) == 8 and bytes_per_element("bf16", 8) == 2
