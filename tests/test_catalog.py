"""The hardware catalog and Cluster descriptions: specs, files, overrides, topology."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cost_models.catalog import Catalog, UnknownHardwareError
from cost_models.cluster import ClusterSpecError, load_cluster, parse_spec
from pase.errors import PaseError

REFERENCE_GPUS = ("V100-SXM2", "V100-PCIe", "A100-40GB-SXM", "A100-80GB-SXM", "A100-40GB-PCIe", "A100-80GB-PCIe",
                  "H100-SXM", "H100-PCIe", "H100-NVL", "H200-SXM", "H200-NVL", "B200", "GB200", "L4", "L40S", "A10",
                  "RTX3090", "RTXA6000", "RTX6000-Ada", "RTX4090", "RTX5090", "MI300X")


def test_catalog_has_every_reference_gpu_with_its_figures() -> None:
    catalog = Catalog.load()
    for gpu_id in REFERENCE_GPUS:
        gpu = catalog.gpu(gpu_id)
        assert gpu.bf16_tflops > 0 and gpu.fp32_tflops > 0 and gpu.memory_gb > 0 and gpu.memory_bw_gbps > 0
        assert gpu.tdp_w > 0 and gpu.pcie_gen in (3, 4, 5)
        assert gpu.price is not None and gpu.price.low <= gpu.price.typical <= gpu.price.high
        assert gpu.price.as_of and gpu.price.source and gpu.sources
    for network in ("IB-HDR", "IB-NDR400", "IB-XDR", "RoCE-100", "RoCE-200", "RoCE-400"):
        assert catalog.network(network).gbps > 0
    for generation in ("2", "3", "4", "5"):
        assert catalog.nvlink(generation)["per_link_gbps"] > 0
    for generation in (3, 4, 5, 6):
        assert catalog.pcie(generation)["x16_gbps"] > 0


def test_geforce_rates_are_fp32_accumulate_and_v100_has_no_bf16() -> None:
    catalog = Catalog.load()
    assert catalog.gpu("RTX4090").peak_tflops("bf16") == pytest.approx(165.2)
    for geforce in ("RTX3090", "RTX4090", "RTX5090"):  # AMP's fp16 also accumulates in fp32: the same rate
        assert catalog.gpu(geforce).peak_tflops("fp16") == catalog.gpu(geforce).peak_tflops("bf16")
    assert catalog.gpu("V100-SXM2").peak_tflops("bf16") == catalog.gpu("V100-SXM2").fp16_tflops


@pytest.mark.parametrize("spec,nodes,gpus,gpu_id,network", [
    ("8xH100-SXM", 1, 8, "H100-SXM", None),
    ("4xL40S-PCIe", 1, 4, "L40S", None),
    ("2x8xA100-80GB-SXM+IB-NDR400x4", 2, 8, "A100-80GB-SXM", "IB-NDR400"),
    ("16xRTX4090", 1, 16, "RTX4090", None),
    ("6xH100-SXM", 1, 6, "H100-SXM", None),
    ("12xRTX4090", 1, 12, "RTX4090", None),
])
def test_spec_strings(spec: str, nodes: int, gpus: int, gpu_id: str, network: str | None) -> None:
    cluster = parse_spec(spec)
    assert (cluster.nodes, cluster.gpus_per_node, cluster.gpu.id) == (nodes, gpus, gpu_id)
    assert cluster.world_size == nodes * gpus
    assert (cluster.network.id if cluster.network else None) == network
    matrix = cluster.topology_matrix()
    assert len(matrix) == gpus and all(len(row) == gpus for row in matrix)
    assert all(matrix[i][j].effective_gbps > 0 for i in range(gpus) for j in range(gpus))


def test_network_nics_per_node() -> None:
    cluster = parse_spec("2x8xA100-80GB-SXM+IB-NDR400x4")
    assert cluster.nics_per_node == 4
    cross = cluster.path(0, 8)
    assert cross.label == "NET" and cross.bandwidth_gbps == pytest.approx(50 * 4 / 8)
    assert cluster.path(0, 1).label.startswith("NV")


@pytest.mark.parametrize("spec,needle", [
    ("8xH100-SMX", "Did you mean H100-SXM"),
    ("eight H100s", "Grammar: [NODESx]GPUSxGPU"),
    ("0xH100-SXM", "zero GPUs"),
    ("0x8xH100-SXM+IB-HDR", "zero nodes"),
    ("2x8xH100-SXM", "names no network"),
    ("16xH100-SXM", "at most 8 GPUs"),
    ("2x8xH100-SXM+IB-NDR800", "unknown network"),
])
def test_bad_specs_say_what_to_do(spec: str, needle: str) -> None:
    with pytest.raises((ClusterSpecError, UnknownHardwareError)) as info:
        parse_spec(spec)
    assert needle in str(info.value)


@pytest.mark.parametrize("system,needle", [
    ({"gpu": "H100-SXM", "gpus_per_node": "eight"}, "gpus_per_node must be a whole number"),
    ({"gpu": "H100-SXM", "gpus_per_node": float("inf")}, "gpus_per_node must be a whole number"),
    ({"gpu": {"id": "Odd", "bf16_tflops": 100, "fp32_tflops": 10, "memory_gb": 16, "memory_bw_gbps": 500,
              "price_usd_per_gpu_hour": {"typical": -1}}, "gpus_per_node": 2}, "price (typical) must be a positive"),
    ({"gpu": "H100-SXM", "gpus_per_node": 8, "nodes": 2, "network": {"nics_per_node": 8}}, "network needs a type"),
    ({"gpu": "H100-SXM", "gpus_per_node": 8, "nodes": 2.5, "network": "IB-NDR400"}, "nodes must be a whole number"),
    ({"gpu": {"id": "Odd", "bf16_tflops": 100, "fp32_tflops": 10, "memory_gb": 16, "memory_bw_gbps": -5},
      "gpus_per_node": 2}, "memory_bw_gbps must be a positive number"),
    ({"gpu": {"id": "Odd", "bf16_tflops": "nan", "fp32_tflops": 10, "memory_gb": 16, "memory_bw_gbps": 500},
      "gpus_per_node": 2}, "bf16_tflops must be a positive number"),
    ({"gpu": {"id": "Odd", "bf16_tflops": 100, "fp32_tflops": 10, "memory_gb": 16, "memory_bw_gbps": 500,
              "pcie_gen": 7}, "gpus_per_node": 2}, "unknown PCIe generation 7"),
    ({"gpu": {"id": "Odd", "bf16_tflops": 100, "fp32_tflops": 10, "memory_gb": 16, "memory_bw_gbps": 500,
              "nvlink": {"generation": 9, "links": 4, "topology": "switch"}}, "gpus_per_node": 2},
     "unknown NVLink generation '9'"),
    ({"gpu": "H100-SXM", "gpus_per_node": 8, "efficiency": {"Conv": 0.3}}, "unknown op kind 'Conv'"),
    (["not", "a", "mapping"], "must hold a mapping"),
])
def test_bad_system_files_say_what_is_wrong(tmp_path, system, needle: str) -> None:
    from pase.errors import PaseError

    path = tmp_path / "system.json"
    path.write_text(json.dumps(system))
    with pytest.raises(PaseError) as info:
        load_cluster(str(path))
    assert needle in str(info.value)


def test_an_empty_spec_or_a_folder_is_a_spec_error(tmp_path) -> None:
    for description in ("", str(tmp_path)):
        with pytest.raises(ClusterSpecError, match="Grammar"):
            load_cluster(description)


def test_a_mesh_pair_keeps_its_links_however_few_gpus_are_used() -> None:
    """MI300X: 7 links per GPU wired as a full 8-GPU mesh, one per peer, whether 2 or 8 GPUs are in use."""
    pair = {n: parse_spec(f"{n}xMI300X").path(0, 1).bandwidth_gbps for n in (2, 4, 8)}
    assert pair[2] == pair[4] == pair[8]


def test_links_are_ordered_as_hardware_is() -> None:
    a100_pcie = parse_spec("8xA100-80GB-PCIe")
    bridged, same_socket, cross_socket = a100_pcie.path(0, 1), a100_pcie.path(0, 2), a100_pcie.path(0, 5)
    assert bridged.label == "NV12" and bridged.effective_gbps > same_socket.effective_gbps
    assert same_socket.effective_gbps >= cross_socket.effective_gbps and cross_socket.label == "SYS"
    sxm = parse_spec("8xH100-SXM").path(0, 7)
    assert sxm.label == "NV18" and sxm.effective_gbps == pytest.approx(18 * 20.6)
    # GeForce has no peer-to-peer: the same PCIe path carries half as much
    assert parse_spec("2xRTX4090").path(0, 1).effective_gbps == pytest.approx(parse_spec("2xL40S").path(0, 1)
                                                                             .effective_gbps / 2)


def test_system_files_json_and_yaml(tmp_path) -> None:
    yaml_file = tmp_path / "box.yaml"
    yaml_file.write_text(
        "name: lab-box\nnodes: 2\ngpus_per_node: 4\n"
        "gpu: {id: MyGPU-1, bf16_tflops: 100, fp32_tflops: 20, memory_gb: 32, memory_bw_gbps: 900, pcie_gen: 5}\n"
        "network: {type: RoCE-200, nics_per_node: 2}\nprice_usd_per_gpu_hour: 0.9\nefficiency: {conv: 0.4}\n")
    cluster = load_cluster(str(yaml_file))
    assert cluster.spec == "lab-box" and cluster.world_size == 8 and cluster.gpu.id == "MyGPU-1"
    assert cluster.price.typical == 0.9 and cluster.efficiency["conv"] == 0.4
    assert cluster.path(0, 4).label == "NET"
    json_file = tmp_path / "box.json"
    json_file.write_text(json.dumps(parse_spec("4xL40S").to_dict()))
    again = load_cluster(str(json_file))
    assert [[p.label for p in row] for row in again.topology_matrix()] == \
        [[p.label for p in row] for row in parse_spec("4xL40S").topology_matrix()]


def test_user_overrides_and_gpu_files(tmp_path) -> None:
    extra = tmp_path / "mine.json"
    extra.write_text(json.dumps({"gpus": {"H100-SXM": {"price_usd_per_gpu_hour": {"low": 1, "typical": 1.5,
                                                                                   "high": 2, "as_of": "2026-11",
                                                                                   "source": "our contract"}}}}))
    catalog = Catalog.load([extra])
    assert catalog.gpu("H100-SXM").price.typical == 1.5
    assert catalog.gpu("H100-SXM").bf16_tflops == pytest.approx(989.4)  # other figures kept
    cluster = parse_spec("8xH100-SXM").with_overrides(price=2.25, efficiency={"attention": 0.3})
    assert cluster.price.typical == 2.25 and cluster.efficiency["attention"] == 0.3
    with pytest.raises(Exception, match="efficiency"):
        parse_spec("8xH100-SXM").with_overrides(efficiency={"conv": 1.5})


def _pase(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pase", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_cli_errors_print_the_spec_grammar_whole() -> None:
    """Square brackets in messages are text, not rich markup."""
    result = subprocess.run([sys.executable, "-m", "pase", "hw", "show", "abc"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 2 and "[+NETWORK[xNICS_PER_NODE]]" in result.stderr


@pytest.mark.slow  # 8 s of CLI listing
def test_cli_hw_list_and_show(tmp_path) -> None:
    listing = _pase("hw", "list")
    assert listing.returncode == 0, listing.stderr
    for gpu_id in ("H100-SXM", "MI300X", "RTX4090", "IB-NDR400"):
        assert gpu_id in listing.stdout
    extra = tmp_path / "gpus.yaml"
    extra.write_text("gpus:\n  MyGPU: {bf16_tflops: 50, fp32_tflops: 10, memory_gb: 16, memory_bw_gbps: 500}\n")
    shown = _pase("hw", "show", "2xMyGPU", "--gpu-file", str(extra), "--price", "0.5")
    assert shown.returncode == 0, shown.stderr
    assert "MyGPU" in shown.stdout and "$0.5" in shown.stdout and "GPU1" in shown.stdout
    bad = _pase("hw", "show", "8xH100-SMX")
    assert bad.returncode == 2 and "Did you mean H100-SXM" in bad.stderr and "Traceback" not in bad.stderr


def test_a_price_with_only_a_typical_figure_is_enough(tmp_path) -> None:
    extra = tmp_path / "gpus.yaml"
    extra.write_text("gpus:\n  MyGPU: {bf16_tflops: 50, fp32_tflops: 10, memory_gb: 16, memory_bw_gbps: 500,\n"
                     "          price_usd_per_gpu_hour: {typical: 1.5}}\n")
    price = Catalog.load([extra]).gpu("MyGPU").price
    assert price is not None and (price.low, price.typical, price.high) == (1.5, 1.5, 1.5)
    shown = _pase("hw", "show", "2xMyGPU", "--gpu-file", str(extra))
    assert shown.returncode == 0, shown.stderr
    assert "typical $1.5)" in shown.stdout and "; ," not in shown.stdout
    extra.write_text("gpus:\n  MyGPU: {bf16_tflops: 50, fp32_tflops: 10, memory_gb: 16, memory_bw_gbps: 500,\n"
                     "          price_usd_per_gpu_hour: {low: 1.0}}\n")
    with pytest.raises(PaseError, match="typical"):
        Catalog.load([extra]).gpu("MyGPU")


def test_the_cli_prints_bus_ids_as_written() -> None:
    """rich would turn ':ab:' in a PCI bus id into an emoji."""
    from pase.cli.console import console

    with console.capture() as captured:
        console.print("0000:ab:00.0")
    assert captured.get().strip() == "0000:ab:00.0"


def test_measured_matmul_ceilings_scale_each_architecture_against_the_reference(tmp_path) -> None:
    """A GPU with a measured achievable bf16 matmul rate runs its compute kinds at the catalog efficiencies times
    its achievable share of peak over the reference GPU's (H100-SXM); unmeasured GPUs and fp32 are not scaled."""
    from cost_models.rates import HardwareRates

    catalog = Catalog.load()
    assert catalog.data["efficiency"]["_achievable_reference"] == "H100-SXM"
    h100, a100, mi300x = (catalog.gpu(g) for g in ("H100-SXM", "A100-80GB-SXM", "MI300X"))
    assert h100.achievable_scale == 1.0 and catalog.gpu("RTX4090").achievable_scale == 1.0
    assert a100.achievable_scale == pytest.approx((271.2 / 312) / (794.5 / 989.4))
    assert mi300x.achievable_scale == pytest.approx((668.4 / 1307.4) / (794.5 / 989.4))  # 0.64: far below peak
    for gpu_id in ("A100-80GB-SXM", "H100-SXM", "H200-SXM", "B200", "GB200", "MI300X"):
        entry = catalog.data["gpus"][gpu_id]
        assert 0 < entry["matmul_achievable_tflops"] < entry["bf16_tflops"], gpu_id
        assert "Maximum Achievable Matmul FLOPS" in entry["matmul_achievable_source"], gpu_id
    cluster = parse_spec("8xA100-80GB-SXM")
    bf16, fp32 = HardwareRates(cluster), HardwareRates(cluster, None, "fp32")
    assert bf16.compute("conv").value == pytest.approx(312e12 * 0.5 * a100.achievable_scale)
    assert "271.2 TFLOPS matmul ceiling" in bf16.compute("conv").source
    assert fp32.compute("conv").value == pytest.approx(19.5e12 * 0.5)
    # a user's GPU file may bring its own measurement
    extra = tmp_path / "gpus.yaml"
    extra.write_text("gpus:\n  MyGPU: {bf16_tflops: 100, fp32_tflops: 10, memory_gb: 16, memory_bw_gbps: 500,\n"
                     "          matmul_achievable_tflops: 40}\n")
    assert Catalog.load([extra]).gpu("MyGPU").achievable_scale == pytest.approx(0.4 / (794.5 / 989.4))
