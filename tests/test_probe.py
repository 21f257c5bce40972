"""The NVML probe, replaying recorded NVML answers through its own parsing code."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cost_models.nvml_replay import ReplayNVML, record_nvml
from cost_models.probe import NoNvidiaDriver, normalize_bus_id, probe

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"


def replay(name: str) -> ReplayNVML:
    return ReplayNVML.from_file(FIXTURES / f"{name}.json")


def test_bus_ids_are_normalised() -> None:
    assert normalize_bus_id("00000000:18:00.0") == normalize_bus_id("0000:18:00.0") == "0000:18:00.0"
    assert normalize_bus_id("00000000:AB:00.0") == normalize_bus_id("0000:ab:00.0")


def test_dgx_h100_nvswitch() -> None:
    result = probe(replay("dgx_h100"))
    assert len(result.gpus) == 8 and not result.warnings
    assert all(len(gpu.nvlinks) == 18 and gpu.nvlinks[0].generation == "4" for gpu in result.gpus)
    cluster = result.to_cluster()
    assert cluster.gpu.id == "H100-SXM" and cluster.source == "probe"
    # switch bus ids come in two formats; after normalising they are one NVSwitch fabric
    assert [v for v, d in cluster.fabric.nodes(data=True) if d["kind"] == "nvswitch"] == ["nvswitch"]
    for i in range(8):
        for j in range(8):
            if i != j:
                path = cluster.path(i, j)
                assert path.label == "NV18" and path.effective_gbps == pytest.approx(18 * 20.6)
    assert result.gpus[0].memory_bw_gbps == pytest.approx(3352, rel=0.01)


def test_recorded_h200_in_a_vm() -> None:
    """Recorded with `pase hw probe --record` on a one-GPU H200 virtual machine (2026-12-04, driver 580.159.04):
    NVLink answers NotSupported there, which is no NVLink rather than a degraded GPU."""
    result = probe(replay("h200_1x_vm_recorded"))
    assert len(result.gpus) == 1 and not result.gpus[0].nvlinks
    cluster = result.to_cluster()
    assert cluster.gpu.id == "H200-SXM" and cluster.world_size == 1
    # 6016-bit HBM3e at 3201 MHz, double data rate: the datasheet's 4.8 TB/s
    assert result.gpus[0].memory_bw_gbps == pytest.approx(4800, rel=0.01)


def test_l40s_two_pcie_switches_and_a_degraded_field() -> None:
    result = probe(replay("l40s_4x_pcie"))
    assert all(not gpu.nvlinks for gpu in result.gpus)
    assert result.gpus[3].memory_bus_bits is None and "memory_bus_width" in result.gpus[3].degraded
    assert result.gpus[3].memory_bytes is not None  # the rest of that GPU was still read
    assert any("memory_bus_width" in w for w in result.warnings)
    cluster = result.to_cluster()
    labels = [[p.label for p in row] for row in cluster.topology_matrix()]
    assert labels[0][1] == labels[2][3] == "PIX"
    assert labels[0][2] == labels[1][3] == "PHB"
    assert cluster.path(0, 1).effective_gbps == pytest.approx(24.0)  # Gen4 x16, NCCL's model


def test_a100_pcie_nvlink_pairs() -> None:
    result = probe(replay("a100_pcie_8x_nvlink_pairs"))
    assert all(gpu.pcie_gen == 4 and gpu.pcie_gen_current == 1 for gpu in result.gpus)  # max, not idle current
    assert any("power_limit" in w and "all GPUs" in w for w in result.warnings)
    cluster = result.to_cluster()
    assert cluster.gpu.id == "A100-80GB-PCIe"
    assert cluster.path(0, 1).label == "NV12" and cluster.path(6, 7).label == "NV12"
    assert cluster.path(0, 1).effective_gbps == pytest.approx(12 * 20)
    assert cluster.path(0, 2).label == "NODE" and cluster.path(0, 4).label == "SYS"
    assert cluster.path(0, 1).effective_gbps > cluster.path(0, 2).effective_gbps >= cluster.path(0, 4).effective_gbps


def test_missing_function_degrades_one_field() -> None:
    recording = json.loads((FIXTURES / "l40s_4x_pcie.json").read_text())
    del recording["devices"][1]["nvmlDeviceGetCudaComputeCapability"]  # an old driver: FunctionNotFound
    result = probe(ReplayNVML(recording))
    assert result.gpus[1].compute_capability is None
    assert result.gpus[1].degraded["compute_capability"] == "FunctionNotFound"
    assert result.gpus[0].compute_capability == (8, 9)


def test_p2p_blocked_pairs_stage_through_host() -> None:
    recording = json.loads((FIXTURES / "l40s_4x_pcie.json").read_text())
    table = recording["pairs"]["nvmlDeviceGetP2PStatus"]["0"]
    table[0][1] = table[1][0] = 5  # NVML_P2P_STATUS_NOT_SUPPORTED
    cluster = probe(ReplayNVML(recording)).to_cluster()
    assert cluster.path(0, 1).effective_gbps == pytest.approx(cluster.path(2, 3).effective_gbps / 2)


def test_recorder_round_trip() -> None:
    """record_nvml writes what ReplayNVML reads: recording a replay reproduces the probe."""
    original = probe(replay("a100_pcie_8x_nvlink_pairs"))
    rerecorded = record_nvml(replay("a100_pcie_8x_nvlink_pairs"))
    again = probe(ReplayNVML(rerecorded))
    assert [(g.name, g.bus_id, len(g.nvlinks), g.degraded) for g in again.gpus] == \
        [(g.name, g.bus_id, len(g.nvlinks), g.degraded) for g in original.gpus]
    assert again.ancestor == original.ancestor


def test_no_driver_here_is_one_clear_error() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(NoNvidiaDriver, match="--cluster"):
        probe()
    result = subprocess.run([sys.executable, "-m", "pase", "hw", "probe"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "no NVIDIA driver" in result.stdout and "--cluster" in result.stdout


def test_cli_probe_replay_prints_topology(tmp_path) -> None:
    saved = tmp_path / "probed.json"
    result = subprocess.run([sys.executable, "-m", "pase", "hw", "probe", "--replay",
                             str(FIXTURES / "dgx_h100.json"), "--save", str(saved)],
                            capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", **_env()})
    assert result.returncode == 0, result.stderr
    assert "NV18" in result.stdout and "NVIDIA H100 80GB HBM3" in result.stdout
    assert json.loads(saved.read_text())["source"] == "probe"


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
