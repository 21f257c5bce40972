"""NCCL's algorithm choice as the cost model prices it: ring against tree and NVLS by size and scale (issue 19).

Hand-computed from NCCL's tuning model (src/graph/tuning.cc, Simple protocol): every call pays an 8.4 us base;
a tree all-reduce over N nodes of p GPUs pays
2 x ((p - 1) x 4.0 + floor(log2 N) x network latency), the ring 2 (n - 1) hop latencies.
"""
from __future__ import annotations

import numpy as np
import pytest

from cost_models.cluster import parse_spec
from cost_models.layer_costs import GRADIENT_BUCKET_BYTES, CostModel
from cost_models.rates import (
    NCCL_BASE_LATENCY_US,
    NCCL_TREE_BANDWIDTH,
    NCCL_TREE_INTRA_LATENCY_US,
    HardwareRates,
)


def test_a_tree_is_offered_for_an_all_reduce_across_nodes_only() -> None:
    """128 nodes of 8 H100s: the tree's latency is 8.4 + 2 (7 x 4.0 + 7 x 14) = 260.4 us against the ring's
    ~9.7 ms; its bus bandwidth 0.92 of the ring's (in pase's 2(n-1)/n convention). One node, or an all-gather,
    has the ring alone (NCCL has no tree for them)."""
    cluster = parse_spec("128x8xH100-SXM+IB-NDR400x8")
    rates = HardwareRates(cluster)
    world = list(range(1024))
    ring, tree = rates.collective_algorithms("all_reduce", world)
    assert (ring.algorithm, tree.algorithm) == ("ring", "tree")
    network = cluster.network.latency_us
    assert tree.alpha_s == pytest.approx((NCCL_BASE_LATENCY_US + 2 * (7 * NCCL_TREE_INTRA_LATENCY_US
                                                                       + 7 * network)) * 1e-6)
    assert tree.alpha_s == pytest.approx(260.4e-6)
    assert ring.alpha_s > 30 * tree.alpha_s
    assert tree.busbw_gbps == pytest.approx(ring.busbw_gbps * NCCL_TREE_BANDWIDTH * 1023 / 1024)
    assert [r.algorithm for r in rates.collective_algorithms("all_reduce", list(range(8)))] == ["ring", "nvls"]
    assert [r.algorithm for r in rates.collective_algorithms("all_gather", world)] == ["ring"]
    assert [r.algorithm for r in rates.collective_algorithms("reduce_scatter", world)] == ["ring"]


def test_the_fastest_algorithm_wins_by_size() -> None:
    """On 2 nodes of 8 the tree's latency is lower (8.4 + 2 (7 x 4 + 1 x 14) = 92.4 us) but its bandwidth is 8%
    lower: small all-reduces go by tree, large ones by ring, as NCCL's tuner picks."""
    rates = HardwareRates(parse_spec("2x8xH100-SXM+IB-NDR400x8"))
    ranks = list(range(16))
    ring, tree = rates.collective_algorithms("all_reduce", ranks)
    assert tree.alpha_s == pytest.approx(92.4e-6) and ring.alpha_s > tree.alpha_s
    small, large = 64 * 2**10, 2 * 2**30
    pick = {size: min((ring, tree), key=lambda r: r.seconds("all_reduce", size, 16)).algorithm
            for size in (small, large)}
    assert pick == {small: "tree", large: "ring"}
    cluster = parse_spec("2x8xH100-SXM+IB-NDR400x8")
    model = CostModel(cluster, HardwareRates(cluster))
    priced = model.collective_seconds("all_reduce", np.array([small, large], dtype=float), np.array([16, 16]), 1)
    assert priced.tolist() == pytest.approx([tree.seconds("all_reduce", small, 16),
                                             ring.seconds("all_reduce", large, 16)])


def test_a_measured_figure_stands_alone() -> None:
    """A calibration's all-reduce is what NCCL chose on that machine: no other algorithm is added."""
    cluster = parse_spec("2x8xH100-SXM+IB-NDR400x8")
    profile = {"fingerprint": {"id": "t", "devices": ["H100-SXM"]}, "created": "now",
               "collectives": {"all_reduce": {"16": {"alpha_us": 50.0, "busbw_gbps": 300.0}}}}
    algorithms = HardwareRates(cluster, profile).collective_algorithms("all_reduce", list(range(16)))
    assert [(r.algorithm, r.alpha_s) for r in algorithms] == [("measured", 50e-6)]


def test_the_cost_model_prices_a_gradient_bucket_by_the_faster_algorithm() -> None:
    """The per-layer pricer takes NCCL's pick for a gradient bucket over 1024 GPUs (the tree) and charges a layer
    its share of one bucket's latency; the ring alone would cost ~24x more per bucket there."""
    cluster = parse_spec("128x8xH100-SXM+IB-NDR400x8")
    model = CostModel(cluster, HardwareRates(cluster))
    ring, tree = model.rates.collective_algorithms("all_reduce", list(range(1024)))
    bucket = np.array([float(GRADIENT_BUCKET_BYTES)])
    priced = model.collective_seconds("all_reduce", bucket, np.array([1024]), 1, bucketed=True)
    assert priced[0] == pytest.approx(tree.seconds("all_reduce", GRADIENT_BUCKET_BYTES, 1024))
    assert ring.seconds("all_reduce", GRADIENT_BUCKET_BYTES, 1024) > 20 * priced[0]
    half = model.collective_seconds("all_reduce", bucket / 2, np.array([1024]), 1, bucketed=True)
    assert half[0] == pytest.approx(tree.alpha_s / 2 + GRADIENT_BUCKET_BYTES / 2 * 2 * 1023 / 1024
                                    / (tree.busbw_gbps * 1e9))


@pytest.mark.parametrize(("spec", "channels", "speed", "inter", "busbw"),
                         [("8xH100-SXM", 8, 40.0, 60.0, 476.0), ("4xH100-SXM", 4, 60.0, 60.0, 240.0),
                          ("8xB200", 8, 80.0, 90.0, 720.0)])
def test_nvls_within_a_node_by_hand(spec: str, channels: int, speed: float, inter: float, busbw: float) -> None:
    """NVLS on one node of NVSwitch-connected Hopper/Blackwell GPUs: a channel per GPU, the fastest speed of the
    architecture's list with (channels + 1) x speed within a GPU's switch links (18 x 20.6 = 370.8 GB/s on H100,
    18 x 40.1 on B200); per channel min(2 x speed x efficiency x (channels - 1) / channels, bwInter), bwInter
    raised up the list while under twice the speed; 25 us. 8 H100s: 8 x min(59.5, 60) = 476 GB/s (nccl-tests
    report 460-480) beside the ring's 370.8; 4 H100s: 4 x min(76.5, 60) = 240; 8 B200s: 8 x min(103.6, 90) = 720,
    under the ring's 721.8."""
    rates = HardwareRates(parse_spec(spec))
    ring, nvls = rates.collective_algorithms("all_reduce", list(range(channels)))
    link = rates.cluster.path(0, 1).effective_gbps
    assert (channels + 1) * speed <= link
    efficiency = 0.85 if "H100" in spec else 0.74
    assert nvls.algorithm == "nvls" and nvls.alpha_s == pytest.approx(25e-6)
    assert nvls.busbw_gbps == pytest.approx(channels * min(2 * speed * efficiency * (channels - 1) / channels, inter))
    assert nvls.busbw_gbps == pytest.approx(busbw)
    if spec == "8xH100-SXM":
        assert ring.busbw_gbps == pytest.approx(370.8)


def test_no_nvls_without_a_switch_or_before_hopper_or_across_nodes() -> None:
    for spec, ranks in (("8xA100-80GB-SXM", range(8)), ("8xL40S", range(8)), ("2x8xH100-SXM+IB-NDR400x8", range(16)),
                        ("8xH100-SXM", range(1))):
        algorithms = [r.algorithm for r in HardwareRates(parse_spec(spec)).collective_algorithms("all_reduce",
                                                                                                list(ranks))]
        assert "nvls" not in algorithms, spec
    assert [r.algorithm for r in HardwareRates(parse_spec("8xH100-SXM")).collective_algorithms(
        "reduce_scatter", list(range(8)))] == ["ring"]


def test_nvls_or_the_ring_by_group_size() -> None:
    """On 8 H100s NVLS beats the ring at every size (25 us against the ring's 8.4 + 14 x 3.4 = 56 us, 476 GB/s
    against 370.8); on 2 the ring does (15.2 us, and NVLS's two channels give 102 GB/s)."""
    rates = HardwareRates(parse_spec("8xH100-SXM"))
    for group in (8, 2):
        ring, nvls = rates.collective_algorithms("all_reduce", list(range(group)))
        for size in (4096, 25 * 2 ** 20, 2 ** 30):
            faster = min((ring, nvls), key=lambda r: r.seconds("all_reduce", size, group))
            assert faster.algorithm == ("nvls" if group == 8 else "ring"), (group, size)
