"""Achieved rates the cost model prices with, and where each figure came from.

A measured calibration profile wins; without one, a rate is the catalog peak times the
efficiency for that op kind (or the link's NCCL-effective bandwidth for collectives). Every
``Rate`` carries a ``source`` string, so reports can say which figures were measured.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from cost_models.cluster import Cluster
from cost_models.conventions import BUS_FACTOR


@dataclass(frozen=True)
class Rate:
    value: float  # FLOP/s, bytes/s, or GB/s for collectives (stated by the caller)
    source: str


# NCCL's own cost model (src/graph/tuning.cc, Simple protocol: the one large gradient buckets use): every call pays
# a base latency; a tree all-reduce pays 2 x ((ranks per node - 1) intra-node hops + floor(log2 nodes) network hops)
# at these hop latencies instead of the ring's 2 (n - 1) hops, and moves data at 0.92 of the ring's bus bandwidth
# (its bus-to-algorithm bandwidth ratio is 1/2 against the ring's n / 2(n - 1)). NCCL times every algorithm for
# each call's size and runs the fastest, so the model does too.
NCCL_BASE_LATENCY_US = 8.4  # baseLat[TREE|RING][SIMPLE]
NCCL_TREE_INTRA_LATENCY_US = 4.0  # hwLat[NVLINK|PCI][TREE][SIMPLE]
NCCL_TREE_BANDWIDTH = 0.92  # "busBw*.92" for the tree
# NVLS (NVLink SHARP: the NVSwitch reduces) for an all-reduce within one node, as NCCL prices it. Its graph search
# (src/graph/search.cc) gives one channel per GPU (at most 32), each GPU's switch link carrying every channel once
# and its own twice, at the fastest speed of the architecture's list that fits; the tuner (tuning.cc) takes
# nvlsEfficiency of it over (channels - 1) / channels, doubled for an all-reduce's two pipelined halves, at most the
# channel's bwInter (the search's second pass raises it up the list while under twice the speed), and adds
# hwLat[NVLINK][NVLS][SIMPLE] with no base latency. Needs NVSwitch and compute capability 9.0 or later. Across nodes
# NVLS runs as NVLS-tree, which also depends on the NICs' channels: not priced.
NCCL_NVLS_EFFICIENCY = {"hopper": 0.85, "blackwell": 0.74}  # nvlsEfficiency[Hopper, Blackwell]
NCCL_NVLS_SPEEDS = {"hopper": (60.0, 50.0, 40.0, 30.0, 24.0, 20.0, 15.0, 12.0, 11.0, 6.0, 3.0),  # sm90SpeedArrayIntra
                    "blackwell": (90.0, 80.0, 70.0, 60.0, 50.0, 45.0, 40.0, 30.0, 24.0, 20.0, 19.0, 18.0)}  # sm100
NCCL_NVLS_LATENCY_US = 25.0  # hwLat[NVLINK][NVLS][SIMPLE]
NCCL_MAX_NVLS_ARITY = 32


@dataclass(frozen=True)
class CollectiveRate:
    alpha_s: float  # per-call latency
    busbw_gbps: float
    source: str
    algorithm: str = "ring"  # NCCL's algorithm this rate prices ("measured" for a calibration's figure)

    def seconds(self, op: str, nbytes: float, group: int) -> float:
        """nccl-tests convention: time = alpha + bytes x bus factor / busbw."""
        if group <= 1:
            return 0.0
        return self.alpha_s + nbytes * BUS_FACTOR[op](group) / (self.busbw_gbps * 1e9)


def profile_mismatch(cluster: Cluster, profile: dict[str, Any]) -> str | None:
    """Why ``profile`` cannot price ``cluster`` (measured on other devices), or None when it can."""
    devices = profile.get("fingerprint", {}).get("devices", [])
    names = {cluster.gpu.id, cluster.gpu.name, *cluster.gpu.nvml_names}
    if devices and all(device in names for device in devices):
        return None
    return (f"calibration profile {profile.get('fingerprint', {}).get('id')} was measured on {sorted(set(devices))}, "
            f"not on {cluster.gpu.id}; calibrate on that hardware (`pase hw calibrate`) or leave --profile out to "
            "price with catalog figures")


class HardwareRates:
    """Rates for one cluster, from ``profile`` (a calibration JSON) when given."""

    def __init__(self, cluster: Cluster, profile: dict[str, Any] | None = None, precision: str = "bf16") -> None:
        self.cluster = cluster
        self.profile = profile
        self.precision = precision
        self.profile_name = f"calibration {profile['fingerprint']['id']} ({profile['created']})" if profile else None

    def compute(self, kind: str) -> Rate:
        """FLOP/s for matmul-like kinds; memory-bound kinds are priced by ``memory(kind)``."""
        measured = (self.profile or {}).get("compute", {}).get(kind, {})
        if "flops_per_second" in measured:
            return Rate(measured["flops_per_second"], f"measured: {self.profile_name}")
        peak = self.cluster.gpu.peak_tflops(self.precision)
        efficiency = self.cluster.efficiency.get(kind, self.cluster.efficiency.get("matmul", 0.5))
        gpu = self.cluster.gpu
        scale = gpu.efficiency_scale(self.precision)
        source = f"catalog: {gpu.id} {self.precision} peak {peak:g} TFLOPS x efficiency {efficiency:g}"
        if scale != 1.0:
            source += (f" x {scale:.3f} (its measured {gpu.matmul_achievable_tflops:g} TFLOPS matmul ceiling's "
                       "share of peak over the reference GPU's)")
        return Rate(peak * 1e12 * efficiency * scale, source)

    def memory(self, kind: str = "elementwise") -> Rate:
        measured = (self.profile or {}).get("compute", {}).get(kind, {})
        if "bytes_per_second" in measured:
            return Rate(measured["bytes_per_second"], f"measured: {self.profile_name}")
        efficiency = self.cluster.efficiency.get(kind if kind == "optimizer" else "memory_bound",
                                                 self.cluster.efficiency.get("memory_bound", 0.7))
        peak = self.cluster.gpu.memory_bw_gbps
        return Rate(peak * 1e9 * efficiency, f"catalog: {self.cluster.gpu.id} memory {peak:g} GB/s x {efficiency:g}")

    def collective_algorithms(self, op: str, ranks: list[int]) -> tuple[CollectiveRate, ...]:
        """Every algorithm NCCL chooses among for ``op`` over these ranks: the ring, and for an all-reduce across
        nodes the tree; a calibration's measured figure alone where there is one. The cost model takes the quickest for
        each call's size, as NCCL's tuner does (``CostModel.collective_seconds``)."""
        ring = self.collective(op, ranks)
        per_node = Counter(r // self.cluster.gpus_per_node for r in ranks)
        if op != "all_reduce" or ring.algorithm == "measured" or len(ranks) < 2:
            return (ring,)
        if len(per_node) < 2:
            nvls = self.nvls_all_reduce(ranks)
            return (ring,) if nvls is None else (ring, nvls)
        network = next(self.cluster.path(a, b) for a in ranks for b in ranks
                       if a // self.cluster.gpus_per_node != b // self.cluster.gpus_per_node)
        per_node_ranks = min(per_node.values())
        hops = 2 * ((per_node_ranks - 1) * NCCL_TREE_INTRA_LATENCY_US + int(math.log2(len(per_node))) *
                    network.latency_us)
        n = len(ranks)
        # pase's convention prices an all-reduce at bytes x 2(n - 1)/n / busbw: the tree's bus bandwidth in it
        busbw = ring.busbw_gbps * NCCL_TREE_BANDWIDTH * (n - 1) / n
        tree = CollectiveRate((NCCL_BASE_LATENCY_US + hops) / 1e6, busbw,
                              f"topology: NCCL tree over {len(per_node)} nodes ({per_node_ranks} per node) at "
                              f"{busbw:g} GB/s", "tree")
        return ring, tree

    def nvls_all_reduce(self, ranks: list[int]) -> CollectiveRate | None:
        """NCCL's NVLS all-reduce over these GPUs of one node (see ``NCCL_NVLS_EFFICIENCY``), or None where the
        node has no NVSwitch, the architecture no NVLS, or no speed fits."""
        gpu, group = self.cluster.gpu, len(ranks)
        if gpu.arch not in NCCL_NVLS_EFFICIENCY or gpu.nvlink_topology != "switch" or group < 2:
            return None
        path = self.cluster.path(ranks[0], ranks[1])
        if not path.label.startswith("NV"):  # NVLink through the switch, not PCIe or the network
            return None
        link = path.effective_gbps  # a GPU's links to the switch (NCCL's per-link figure x links)
        channels = min(NCCL_MAX_NVLS_ARITY, group)
        speeds = NCCL_NVLS_SPEEDS[gpu.arch]
        index = next((i for i, s in enumerate(speeds) if s * (channels + 1) <= link), None)
        if index is None:
            return None
        speed = inter = speeds[index]
        while index > 0 and inter < 2 * speed:  # the search's second pass raises bwInter up the list
            index -= 1
            inter = speeds[index]
        # per channel min(2 x efficiency x (channels - 1) / channels x bwIntra, bwInter), times the channels
        busbw = channels * min(2 * speed * NCCL_NVLS_EFFICIENCY[gpu.arch] * (channels - 1) / channels, inter)
        return CollectiveRate(NCCL_NVLS_LATENCY_US / 1e6, busbw,
                              f"topology: NCCL NVLS over the NVSwitch, {channels} channels at {speed:g} GB/s x "
                              f"{NCCL_NVLS_EFFICIENCY[gpu.arch]:g} ({gpu.arch}) = {busbw:g} GB/s", "nvls")

    def collective(self, op: str, ranks: list[int]) -> CollectiveRate:
        """Latency and bus bandwidth of ``op`` over these global ranks as a ring (its slowest hop), or the
        calibration's measured figure; ``collective_algorithms`` adds NCCL's other choices."""
        measured = (self.profile or {}).get("collectives", {}).get(op, {}).get(str(len(ranks)))
        if measured:
            return CollectiveRate(measured["alpha_us"] / 1e6, measured["busbw_gbps"], f"measured: {self.profile_name}",
                                  "measured")
        if len(ranks) <= 1:
            return CollectiveRate(0.0, float("inf"), "no communication")
        hops = [self.cluster.path(a, b) for a, b in zip(ranks, ranks[1:] + ranks[:1])]
        per_node = Counter(r // self.cluster.gpus_per_node for r in ranks)
        if len(per_node) > 1:
            # A network hop is priced at one GPU's share of its node's NICs (every GPU's group crosses at
            # once). A group with m members on each node owns m such shares, which NCCL drives as m
            # channels (one per NIC): its ring crosses nodes at m times the share.
            members = min(per_node.values())
            hops = [replace(h, bandwidth_gbps=h.bandwidth_gbps * members, effective_gbps=h.effective_gbps * members)
                    if h.label == "NET" else h for h in hops]
        slowest = min(hops, key=lambda h: h.effective_gbps)
        # a ring pass crosses every hop once; all-reduce makes two passes (reduce-scatter, all-gather),
        # so latency adds up hop by hop: NVLink hops cost little, the few network hops dominate
        passes = 2 if op == "all_reduce" else 1
        latency = NCCL_BASE_LATENCY_US + passes * sum(h.latency_us for h in hops) * (len(ranks) - 1) / len(ranks)
        if op == "send_recv":  # one hop, no collective kernel's base
            latency = hops[0].latency_us
        return CollectiveRate(latency / 1e6, slowest.effective_gbps,
                              f"topology: ring over {slowest.label} links at {slowest.effective_gbps:g} GB/s effective")
