"""Achieved rates the cost model prices with, and where each figure came from.

A measured calibration profile wins; without one, a rate is the catalog peak times the
efficiency for that op kind (or the link's NCCL-effective bandwidth for collectives). Every
``Rate`` carries a ``source`` string, so reports can say which figures were measured.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from cost_models.cluster import Cluster
from cost_models.conventions import BUS_FACTOR


@dataclass(frozen=True)
class Rate:
    value: float  # FLOP/s, bytes/s, or GB/s for collectives (stated by the caller)
    source: str


@dataclass(frozen=True)
class CollectiveRate:
    alpha_s: float  # per-call latency
    busbw_gbps: float
    source: str

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
        return Rate(peak * 1e12 * efficiency,
                    f"catalog: {self.cluster.gpu.id} {self.precision} peak {peak:g} TFLOPS x efficiency {efficiency:g}")

    def memory(self, kind: str = "elementwise") -> Rate:
        measured = (self.profile or {}).get("compute", {}).get(kind, {})
        if "bytes_per_second" in measured:
            return Rate(measured["bytes_per_second"], f"measured: {self.profile_name}")
        efficiency = self.cluster.efficiency.get(kind if kind == "optimizer" else "memory_bound",
                                                 self.cluster.efficiency.get("memory_bound", 0.7))
        peak = self.cluster.gpu.memory_bw_gbps
        return Rate(peak * 1e9 * efficiency, f"catalog: {self.cluster.gpu.id} memory {peak:g} GB/s x {efficiency:g}")

    def collective(self, op: str, ranks: list[int]) -> CollectiveRate:
        """Latency and bus bandwidth of ``op`` over these global ranks (a ring: its slowest hop)."""
        measured = (self.profile or {}).get("collectives", {}).get(op, {}).get(str(len(ranks)))
        if measured:
            return CollectiveRate(measured["alpha_us"] / 1e6, measured["busbw_gbps"], f"measured: {self.profile_name}")
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
        per_pass = sum(h.latency_us for h in hops) * (len(ranks) - 1) / len(ranks)
        if op == "send_recv":
            passes, per_pass = 1, hops[0].latency_us
        return CollectiveRate(passes * per_pass / 1e6, slowest.effective_gbps,
                              f"topology: ring over {slowest.label} links at {slowest.effective_gbps:g} GB/s effective")
