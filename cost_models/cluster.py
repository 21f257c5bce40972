"""``Cluster``: nodes x GPUs, the intra-node fabric as a graph of links, and the network.

Built from a spec string (``8xH100-SXM``, ``2x8xA100-80GB-SXM+IB-NDR400x4``), from a JSON/YAML
system file, or from the live pynvml probe (``cost_models.probe``). All nodes are alike: the
fabric graph describes one node (vertices ``gpu0..``, NVSwitch, PCIe switches, CPU sockets;
edges carry per-direction bandwidth, NCCL-style effective bandwidth and latency), and the
network says how nodes connect (NICs per node x per-NIC bandwidth, rail-optimised).
Every bandwidth is GB/s per direction.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import networkx as nx

from cost_models.catalog import Catalog, GPUSpec, NetworkSpec, Price, is_positive_number, read_data_file
from pase import paths
from pase.errors import PaseError

SPEC_GRAMMAR = (
    "[NODESx]GPUSxGPU[+NETWORK[xNICS_PER_NODE]], e.g. 8xH100-SXM, 4xL40S-PCIe, "
    "2x8xA100-80GB-SXM+IB-NDR400x4, 16xRTX4090 (GPU and NETWORK names: `pase hw list`)"
)
_SPEC = re.compile(
    r"^\s*(?:(?P<nodes>\d+)\s*x\s*)?(?P<gpus>\d+)\s*x\s*(?P<gpu>[A-Za-z][\w.\-]*?)"
    r"\s*(?:\+\s*(?P<net>[A-Za-z][\w.\-]*?)(?:\s*x\s*(?P<nics>\d+))?)?\s*$",
    re.IGNORECASE,
)
CLUSTER_FORMAT = "pase-cluster"


class ClusterSpecError(PaseError):
    """A malformed or impossible cluster description."""


@dataclass(frozen=True)
class PathInfo:
    """How two GPUs talk: bandwidth (per direction), NCCL-style effective bandwidth, latency, label."""

    bandwidth_gbps: float
    effective_gbps: float
    latency_us: float
    label: str  # NV<k>, PIX, PXB, PHB, NODE, SYS (as nvidia-smi topo -m), NET across nodes, X for self


@dataclass
class Cluster:
    spec: str
    nodes: int
    gpus_per_node: int
    gpu: GPUSpec
    fabric: nx.Graph
    network: NetworkSpec | None = None
    nics_per_node: int = 0
    source: str = "catalog"
    efficiency: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def price(self) -> Price | None:
        return self.gpu.price

    def with_overrides(self, price: float | None = None, efficiency: dict[str, float] | None = None) -> Cluster:
        """A copy with the user's $/GPU-hour and per-op-kind efficiencies in place of the catalog's."""
        gpu = self.gpu
        if price is not None:
            if not is_positive_number(price):
                raise PaseError(f"--price must be a positive, finite $/GPU-hour, not {price}")
            gpu = replace(gpu, price=Price(price, price, price, "user", "user override"))
        unknown = sorted(set(efficiency or {}) - set(self.efficiency)) if self.efficiency else []
        if unknown:
            raise PaseError(f"efficiency for unknown op kind {', '.join(map(repr, unknown))}; the kinds are "
                            f"{', '.join(sorted(self.efficiency))}")
        merged = {**self.efficiency, **(efficiency or {})}
        for kind, value in merged.items():
            if not 0 < value <= 1:
                raise PaseError(f"efficiency for {kind!r} must be in (0, 1], not {value}")
        return replace(self, gpu=gpu, efficiency=merged)

    # ------------------------------------------------------------------ paths
    def path(self, a: int, b: int) -> PathInfo:
        """The link between global GPU ranks ``a`` and ``b`` (rank = node * gpus_per_node + local)."""
        node_a, local_a = divmod(a, self.gpus_per_node)
        node_b, local_b = divmod(b, self.gpus_per_node)
        if a == b:
            return PathInfo(float("inf"), float("inf"), 0.0, "X")
        if node_a != node_b:
            if self.network is None:
                raise PaseError("this cluster has several nodes but no network")
            per_gpu = self.network.gbps * self.nics_per_node / self.gpus_per_node
            return PathInfo(per_gpu, per_gpu * self.network.achieved_fraction, self.network.latency_us, "NET")
        return self.local_paths()[(local_a, local_b)]

    @cached_property
    def _local_paths(self) -> dict[tuple[int, int], PathInfo]:
        return _widest_paths(self.fabric, self.gpus_per_node)

    def local_paths(self) -> dict[tuple[int, int], PathInfo]:
        """Widest path (max-min effective bandwidth) between every pair of GPUs of one node (cached)."""
        return self._local_paths

    def topology_matrix(self) -> list[list[PathInfo]]:
        n = self.gpus_per_node
        return [[self.path(i, j) for j in range(n)] for i in range(n)]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CLUSTER_FORMAT, "version": 1, "name": self.spec, "source": self.source,
            "nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "gpu": self.gpu.id,
            "network": {"type": self.network.id, "nics_per_node": self.nics_per_node} if self.network else None,
            "price_usd_per_gpu_hour": self.gpu.price.typical if self.gpu.price else None,
            "efficiency": dict(self.efficiency), "notes": list(self.notes),
            "fabric": {"vertices": [{"id": v, **d} for v, d in self.fabric.nodes(data=True)],
                       "edges": [{"a": a, "b": b, **d} for a, b, d in self.fabric.edges(data=True)]},
        }


MAX_CLUSTER_GPUS = 1 << 20  # as a plan file's "devices" (pase.planning.plan_schema.MAX_DEVICES)

# ---------------------------------------------------------------------- building

def parse_spec(spec: str, catalog: Catalog | None = None) -> Cluster:
    """A Cluster from a spec string; see ``SPEC_GRAMMAR``."""
    catalog = catalog or Catalog.load()
    match = _SPEC.match(spec)
    if not match:
        raise ClusterSpecError(f"cannot read cluster spec {spec!r}. Grammar: {SPEC_GRAMMAR}")
    nodes = int(match["nodes"] or 1)
    gpus = int(match["gpus"])
    if nodes < 1 or gpus < 1:
        raise ClusterSpecError(f"cluster spec {spec!r} has zero {'nodes' if nodes < 1 else 'GPUs'}; "
                               f"a cluster needs at least one of each. Grammar: {SPEC_GRAMMAR}")
    if nodes * gpus > MAX_CLUSTER_GPUS:
        raise ClusterSpecError(f"cluster spec {spec!r} has {nodes * gpus} GPUs; pase plans clusters of up to "
                               f"{MAX_CLUSTER_GPUS} (the largest plan a file holds)")
    gpu = catalog.gpu(match["gpu"])
    if gpus > gpu.max_gpus_per_node:
        raise ClusterSpecError(
            f"{spec!r}: a {gpu.id} node holds at most {gpu.max_gpus_per_node} GPUs; spread them over nodes, "
            f"e.g. {-(-gpus // gpu.max_gpus_per_node)}x{gpu.max_gpus_per_node}x{gpu.id}+IB-NDR400x"
            f"{gpu.max_gpus_per_node}")
    network, nics = None, 0
    if match["net"]:
        network = catalog.network(match["net"])
        nics = int(match["nics"] or gpus)
        if nics < 1:
            raise ClusterSpecError(f"{spec!r}: a network needs at least one NIC per node")
    elif nodes > 1:
        raise ClusterSpecError(
            f"{spec!r} spans {nodes} nodes but names no network: add one, e.g. {spec}+IB-NDR400x{gpus} "
            f"(networks: {', '.join(catalog.network_ids())})")
    cluster = Cluster(spec=spec.strip(), nodes=nodes, gpus_per_node=gpus, gpu=gpu,
                      fabric=catalog_fabric(gpu, gpus, catalog), network=network, nics_per_node=nics,
                      source="catalog", efficiency=catalog.efficiency)
    if not gpu.p2p_over_pcie and gpus > 1:
        cluster.notes.append(f"{gpu.id} has no GPU peer-to-peer over PCIe: traffic stages through host memory")
    return cluster


def _link(kind: str, bandwidth: float, effective: float, latency: float, count: int = 1) -> dict[str, Any]:
    return {"kind": kind, "bandwidth_gbps": bandwidth, "effective_gbps": effective, "latency_us": latency,
            "links": count}


def catalog_fabric(gpu: GPUSpec, n: int, catalog: Catalog) -> nx.Graph:
    """One node's links as the catalog describes the GPU's usual server: a PCIe tree (two GPUs per
    PCIe switch, one or two CPU sockets) plus its NVLink topology (NVSwitch, bridged pairs, mesh)."""
    graph = nx.Graph()
    pcie = catalog.pcie(gpu.pcie_gen)
    lane_share = gpu.pcie_lanes / 16
    sockets = 2 if n > 4 else 1
    per_socket = -(-n // sockets)
    if not gpu.p2p_over_pcie:
        graph.graph.update(p2p=False, host_staged_fraction=catalog.host["host_staged_fraction"])
    for s in range(sockets):
        graph.add_node(f"cpu{s}", kind="cpu")
        if s:
            bw = catalog.host["socket_link_gbps"]
            graph.add_edge("cpu0", f"cpu{s}", **_link("socket", bw, bw, pcie["latency_us"]))
    for i in range(n):
        switch, socket = f"pcisw{i // 2}", f"cpu{min(i // per_socket, sockets - 1)}"
        graph.add_node(f"gpu{i}", kind="gpu", index=i)
        if switch not in graph:
            graph.add_node(switch, kind="pcie_switch")
            graph.add_edge(switch, socket, **_link("pcie", pcie["x16_gbps"], pcie["effective_x16_gbps"],
                                                    pcie["latency_us"]))
        graph.add_edge(f"gpu{i}", switch, **_link("pcie", pcie["x16_gbps"] * lane_share,
                                                   pcie["effective_x16_gbps"] * lane_share,
                                                   pcie["latency_us"]))
    if gpu.nvlink_generation and n > 1:
        _add_nvlink(graph, gpu, n, catalog)
    return graph


def _add_nvlink(graph: nx.Graph, gpu: GPUSpec, n: int, catalog: Catalog) -> None:
    rates = catalog.nvlink(gpu.nvlink_generation or "")

    def nv(count: int) -> dict[str, Any]:
        return _link("nvlink", count * rates["per_link_gbps"], count * rates["effective_per_link_gbps"],
                     rates["latency_us"], count)

    topology, links = gpu.nvlink_topology, gpu.nvlink_links
    if topology == "switch":  # each GPU-switch edge carries half the hop latency: GPU-switch-GPU is one hop
        graph.add_node("nvswitch", kind="nvswitch")
        for i in range(n):
            graph.add_edge(f"gpu{i}", "nvswitch", **{**nv(links), "latency_us": rates["latency_us"] / 2})
    elif topology == "pairs":
        for i in range(0, n - 1, 2):
            graph.add_edge(f"gpu{i}", f"gpu{i + 1}", **nv(links))
    elif topology == "mesh":
        for i in range(n):
            for j in range(i + 1, n):
                # the links are wired once for the full node: a pair keeps its share however few GPUs are used
                graph.add_edge(f"gpu{i}", f"gpu{j}", **nv(max(1, links // max(1, gpu.max_gpus_per_node - 1))))
    elif topology == "cube-mesh":  # DGX-1: quads fully connected, GPU i also linked to i+4 (6 links per GPU)
        for i in range(n):
            for j, count in ((i ^ 1, 2), (i ^ 2, 1), (i ^ 3, 2), (i ^ 4, 1)):
                if i < j < n:
                    graph.add_edge(f"gpu{i}", f"gpu{j}", **nv(count))


def _widest_paths(graph: nx.Graph, n: int) -> dict[tuple[int, int], PathInfo]:
    """Max-min effective bandwidth path between GPU pairs (NCCL's path rule); ties go to fewer hops.

    Only GPU endpoints may be passed through when the edge into them is NVLink (NCCL routes
    through a GPU only over NVLink). O(n * E log V).
    """
    result: dict[tuple[int, int], PathInfo] = {}
    blocked = {tuple(pair) for pair in graph.graph.get("no_p2p_pairs", ())}
    if graph.graph.get("p2p") is False:
        blocked = {(i, j) for i in range(n) for j in range(n) if i != j}
    staged = graph.graph.get("host_staged_fraction", 0.5)
    for i in range(n):
        source = f"gpu{i}"
        best: dict[str, tuple[float, int]] = {source: (float("inf"), 0)}
        parent: dict[str, str] = {}
        heap = [(-float("inf"), 0, source)]
        while heap:
            neg_bw, hops, vertex = heapq.heappop(heap)
            if (-neg_bw, hops) != best.get(vertex):
                continue
            if vertex != source and graph.nodes[vertex].get("kind") == "gpu":
                continue  # a GPU is an endpoint, not a router
            for neighbour, data in graph[vertex].items():
                candidate = (min(-neg_bw, data["effective_gbps"]), hops + 1)
                known = best.get(neighbour)
                if known is None or candidate[0] > known[0] or (candidate[0] == known[0] and candidate[1] < known[1]):
                    best[neighbour] = candidate
                    parent[neighbour] = vertex
                    heapq.heappush(heap, (-candidate[0], candidate[1], neighbour))
        for j in range(n):
            if i == j:
                result[(i, j)] = PathInfo(float("inf"), float("inf"), 0.0, "X")
                continue
            target = f"gpu{j}"
            if target not in parent:
                raise PaseError(f"GPUs {i} and {j} are not connected in the fabric description")
            path = [target]
            while path[-1] != source:
                path.append(parent[path[-1]])
            edges = [graph.edges[a, b] for a, b in zip(path, path[1:])]
            effective = min(e["effective_gbps"] for e in edges)
            if (i, j) in blocked and not all(e["kind"] == "nvlink" for e in edges):
                effective *= staged  # no peer-to-peer: the copy bounces through host memory
            result[(i, j)] = PathInfo(min(e["bandwidth_gbps"] for e in edges), effective,
                                      sum(e["latency_us"] for e in edges), _label(graph, path, edges))
    return result


def _label(graph: nx.Graph, hops: list[str], edges: list[dict[str, Any]]) -> str:
    """nvidia-smi topo -m legend for a path."""
    if all(e["kind"] == "nvlink" for e in edges):
        return f"NV{min(e.get('links', 1) for e in edges)}"
    kinds = [graph.nodes[v].get("kind") for v in hops[1:-1]]
    if kinds.count("cpu") > 1:
        return "SYS"
    if "cpu" in kinds:
        return "NODE"
    if "host_bridge" in kinds:
        return "PHB"
    return "PXB" if kinds.count("pcie_switch") > 1 else "PIX"


# ---------------------------------------------------------------------- files

def cluster_from_dict(data: dict[str, Any], catalog: Catalog | None = None, origin: str = "system file") -> Cluster:
    """A Cluster from a system description (the shape ``Cluster.to_dict`` writes; most keys optional).

    ``gpu`` is a catalog name or a full GPU entry (``{"id": ..., "bf16_tflops": ...}``) for a GPU
    the catalog lacks; ``fabric`` (vertices and edges) replaces the catalog's default links.
    """
    catalog = catalog or Catalog.load()
    if not isinstance(data, dict):
        raise ClusterSpecError(f"{origin}: a system description is a mapping with at least gpu and gpus_per_node")
    try:
        gpu_field = data["gpu"]
        gpus_per_node = _whole(data["gpus_per_node"], "gpus_per_node", origin)
    except KeyError as exc:
        raise ClusterSpecError(f"{origin}: missing required key {exc.args[0]!r} (need gpu and gpus_per_node)") from None
    nodes = _whole(data.get("nodes", 1), "nodes", origin)
    if gpus_per_node < 1 or nodes < 1:
        raise ClusterSpecError(f"{origin}: nodes and gpus_per_node must be at least 1")
    if isinstance(gpu_field, dict):
        gpu_id = gpu_field.get("id") or gpu_field.get("name") or "custom-gpu"
        catalog.merge({"gpus": {gpu_id: {k: v for k, v in gpu_field.items() if k != "id"}}}, origin)
        gpu_field = gpu_id
    gpu = catalog.gpu(str(gpu_field))
    network, nics = None, 0
    if data.get("network"):
        net = data["network"]
        if isinstance(net, dict) and "type" not in net:
            raise ClusterSpecError(f"{origin}: network needs a type (e.g. network: {{type: IB-NDR400, "
                                   f"nics_per_node: {gpus_per_node}}}); `pase hw list` shows the networks")
        network = catalog.network(net["type"] if isinstance(net, dict) else str(net))
        nics = _whole(net.get("nics_per_node", gpus_per_node), "network.nics_per_node", origin) \
            if isinstance(net, dict) else gpus_per_node
    elif nodes > 1:
        raise ClusterSpecError(f"{origin}: {nodes} nodes need a network (e.g. network: {{type: IB-NDR400, "
                               f"nics_per_node: {gpus_per_node}}})")
    fabric = _fabric_from_dict(data["fabric"], origin) if data.get("fabric") else catalog_fabric(gpu, gpus_per_node,
                                                                                               catalog)
    cluster = Cluster(spec=str(data.get("name", f"{nodes}x{gpus_per_node}x{gpu.id}")), nodes=nodes,
                      gpus_per_node=gpus_per_node, gpu=gpu, fabric=fabric, network=network, nics_per_node=nics,
                      source=str(data.get("source", "file")), efficiency=catalog.efficiency,
                      notes=list(data.get("notes", [])))
    return cluster.with_overrides(price=data.get("price_usd_per_gpu_hour"), efficiency=data.get("efficiency"))


def _whole(value: Any, key: str, origin: str) -> int:
    """``value`` as an int, or a ClusterSpecError naming ``key``."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ClusterSpecError(f"{origin}: {key} must be a whole number, not {value!r}") from None
    if number != value and not isinstance(value, str):
        raise ClusterSpecError(f"{origin}: {key} must be a whole number, not {value!r}")
    return number


def _fabric_from_dict(fabric: dict[str, Any], origin: str) -> nx.Graph:
    graph = nx.Graph()
    for vertex in fabric.get("vertices", []):
        graph.add_node(vertex["id"], **{k: v for k, v in vertex.items() if k != "id"})
    for edge in fabric.get("edges", []):
        missing = [k for k in ("a", "b", "bandwidth_gbps") if k not in edge]
        if missing:
            raise ClusterSpecError(f"{origin}: fabric edge {edge} lacks {', '.join(missing)}")
        attrs = {"kind": "pcie", "latency_us": 5.0, "links": 1, **{k: v for k, v in edge.items() if k not in "ab"}}
        attrs.setdefault("effective_gbps", attrs["bandwidth_gbps"])
        graph.add_edge(str(edge["a"]), str(edge["b"]), **attrs)
    for vertex in graph.nodes:
        if vertex.startswith("gpu") and "kind" not in graph.nodes[vertex]:
            graph.nodes[vertex]["kind"] = "gpu"
    return graph


def load_cluster(description: str, catalog: Catalog | None = None) -> Cluster:
    """A spec string, or the path of a JSON/YAML system file."""
    path = Path(description)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or (description.strip() and paths.is_file(path)):
        data = read_data_file(path)
        cluster = cluster_from_dict(data, catalog, origin=str(path))
        # an unnamed file is named by its shape and its file, so two files never read as one cluster
        return cluster if "name" in data else replace(cluster, spec=f"{cluster.spec} ({path.name})")
    return parse_spec(description, catalog)


def group_cluster(cluster: Cluster, group: int) -> Cluster:
    """A device group of ``group`` GPUs as a cluster of its own: the first GPUs of a node, or whole nodes."""
    if group == cluster.world_size:
        return cluster
    if group <= cluster.gpus_per_node:
        fabric = cluster.fabric.copy()
        fabric.remove_nodes_from([f"gpu{i}" for i in range(group, cluster.gpus_per_node)])
        return replace(cluster, spec=f"{group}x{cluster.gpu.id} (group of {cluster.spec})", nodes=1,
                       gpus_per_node=group, fabric=fabric, network=None, nics_per_node=0)
    if group % cluster.gpus_per_node:
        raise PaseError(f"a group of {group} GPUs is not whole {cluster.gpus_per_node}-GPU nodes")
    return replace(cluster, spec=f"{group // cluster.gpus_per_node} nodes of {cluster.spec}",
                   nodes=group // cluster.gpus_per_node)
