"""``pase hw probe``: read this machine's GPUs and links through NVML and build a Cluster.

The probe talks to any object with pynvml's interface: the real ``pynvml`` module, or a
``ReplayNVML`` answering from a recording. Every call is wrapped: an NVML error other than
"no driver" degrades that one field (and is listed), never the probe. The link graph follows
NCCL's rules: NVLinks counted per remote PCI bus id (bus ids normalised first), remotes that
are not GPUs are NVSwitches, and the PCIe tree is rebuilt from the pairwise common-ancestor
levels (PIX < PXB < PHB < NODE < SYS).
"""
from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import pynvml

from cost_models.catalog import Catalog, GPUSpec
from cost_models.cluster import Cluster
from cost_models.nvml_replay import CLOCK_MEM, CLOCK_SM, ERROR_NAMES, P2P_NVLINK, P2P_READ
from pase.errors import PaseError

REMOTE_SWITCH = 2
NVLINK_VERSION_GENERATION = {1: "1", 2: "2", 3: "2", 4: "3", 5: "3", 6: "4", 7: "5", 8: "6"}  # NVML enum -> gen
PCIE_GT_PER_LANE = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
PCIE_NCCL_CODE = {1: 15, 2: 30, 3: 60, 4: 120, 5: 240, 6: 480}  # NCCL: GB/s = width * code / 80
LEVEL_NAMES = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
P2P_OK = 0


class NoNvidiaDriver(PaseError):
    """NVML is not installed: there are no NVIDIA GPUs to probe on this machine."""


@dataclass
class ProbedLink:
    link: int
    generation: str | None
    remote_bus_id: str | None
    remote_is_switch: bool | None


@dataclass
class ProbedGPU:
    index: int
    name: str
    uuid: str | None
    bus_id: str | None
    memory_bytes: int | None
    compute_capability: tuple[int, int] | None
    sm_clock_mhz: int | None
    memory_clock_mhz: int | None
    memory_bus_bits: int | None
    power_limit_w: float | None
    pcie_gen: int | None  # max (what the slot and GPU can do; current drops at idle)
    pcie_width: int | None
    pcie_gen_current: int | None
    nvlinks: list[ProbedLink] = field(default_factory=list)
    degraded: dict[str, str] = field(default_factory=dict)  # field -> NVML error name

    @property
    def memory_bw_gbps(self) -> float | None:
        """The hardware.md heuristic: 2 x max memory clock x bus width."""
        if self.memory_clock_mhz and self.memory_bus_bits:
            return 2 * self.memory_clock_mhz * 1e6 * self.memory_bus_bits / 8 / 1e9
        return None


@dataclass
class ProbeResult:
    driver_version: str | None
    gpus: list[ProbedGPU]
    ancestor: list[list[int | None]]
    p2p_read: list[list[int | None]]
    p2p_nvlink: list[list[int | None]]
    warnings: list[str] = field(default_factory=list)

    def to_cluster(self, catalog: Catalog | None = None) -> Cluster:
        return build_probed_cluster(self, catalog or Catalog.load())


def normalize_bus_id(bus_id: str | None) -> str | None:
    """``00000000:18:00.0``, ``0000:18:00.0`` and ``0000:18:00.0`` in any case -> ``0000:18:00.0``."""
    if not bus_id:
        return None
    match = re.fullmatch(r"\s*(?:([0-9a-fA-F]+):)?([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-7])\s*", str(bus_id))
    if not match:
        return str(bus_id).strip().lower()
    domain, bus, device, function = match.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{function}"


def probe(nvml: Any = pynvml) -> ProbeResult:
    """Probe the GPUs NVML sees. Raises ``NoNvidiaDriver`` when there is no driver at all."""
    try:
        nvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        raise NoNvidiaDriver("no NVIDIA driver on this machine (NVML library not found), so there is nothing to "
                             "probe; describe the cluster instead with --cluster SPEC (e.g. --cluster 8xH100-SXM, "
                             "see `pase hw list`) or a JSON/YAML system file") from None
    except pynvml.NVMLError as exc:
        raise PaseError(f"NVML could not start ({exc}); describe the cluster with --cluster SPEC instead") from None
    try:
        return _probe(nvml)
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            nvml.nvmlShutdown()


def _probe(nvml: Any) -> ProbeResult:
    warnings: list[str] = []
    driver = _try(nvml.nvmlSystemGetDriverVersion, {}, "driver_version")
    count = nvml.nvmlDeviceGetCount()
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    gpus = [_probe_device(nvml, i, handle) for i, handle in enumerate(handles)]

    def matrix(function: Any, *extra: Any) -> list[list[int | None]]:
        degraded: dict[str, str] = {}
        table = [[0 if i == j else _try(function, degraded, "pair", handles[i], handles[j], *extra)
                  for j in range(count)] for i in range(count)]
        if degraded:
            warnings.append(f"{function.__name__ if hasattr(function, '__name__') else function}: "
                            f"{next(iter(degraded.values()))} for some pairs")
        return table

    ancestor = matrix(nvml.nvmlDeviceGetTopologyCommonAncestor)
    p2p_read = matrix(nvml.nvmlDeviceGetP2PStatus, P2P_READ)
    p2p_nvlink = matrix(nvml.nvmlDeviceGetP2PStatus, P2P_NVLINK)
    degraded: dict[tuple[str, str], list[int]] = {}
    for gpu in gpus:
        for name, error in gpu.degraded.items():
            degraded.setdefault((name, error), []).append(gpu.index)
    for (name, error), indices in degraded.items():
        which = "all GPUs" if len(indices) == count else "GPU " + ", ".join(map(str, indices))
        warnings.append(f"{name} unavailable on {which} ({error})")
    return ProbeResult(driver, gpus, ancestor, p2p_read, p2p_nvlink, warnings)


def _try(function: Any, degraded: dict[str, str], name: str, *args: Any) -> Any:
    """One NVML call; an NVML error marks that field degraded and yields None."""
    try:
        return function(*args)
    except pynvml.NVMLError as exc:
        degraded[name] = ERROR_NAMES.get(getattr(exc, "value", None), type(exc).__name__)
        return None


def _probe_device(nvml: Any, index: int, handle: Any) -> ProbedGPU:
    degraded: dict[str, str] = {}

    def get(name: str, function: str, *args: Any) -> Any:
        return _try(getattr(nvml, function), degraded, name, handle, *args)

    pci = get("pci_bus_id", "nvmlDeviceGetPciInfo")
    memory = get("memory", "nvmlDeviceGetMemoryInfo")
    cc = get("compute_capability", "nvmlDeviceGetCudaComputeCapability")
    power = get("power_limit", "nvmlDeviceGetPowerManagementLimit")
    gpu = ProbedGPU(
        index=index, name=str(get("name", "nvmlDeviceGetName") or f"GPU {index}"),
        uuid=get("uuid", "nvmlDeviceGetUUID"), bus_id=normalize_bus_id(getattr(pci, "busId", None)),
        memory_bytes=int(memory.total) if memory is not None else None,
        compute_capability=tuple(cc) if cc is not None else None,
        sm_clock_mhz=get("sm_clock", "nvmlDeviceGetMaxClockInfo", CLOCK_SM),
        memory_clock_mhz=get("memory_clock", "nvmlDeviceGetMaxClockInfo", CLOCK_MEM),
        memory_bus_bits=get("memory_bus_width", "nvmlDeviceGetMemoryBusWidth"),
        power_limit_w=power / 1000 if power is not None else None,
        pcie_gen=get("pcie_generation", "nvmlDeviceGetMaxPcieLinkGeneration"),
        pcie_width=get("pcie_width", "nvmlDeviceGetMaxPcieLinkWidth"),
        pcie_gen_current=get("pcie_generation_current", "nvmlDeviceGetCurrPcieLinkGeneration"),
        degraded=degraded,
    )
    gpu.nvlinks = _probe_nvlinks(nvml, handle, gpu)
    return gpu


def _probe_nvlinks(nvml: Any, handle: Any, gpu: ProbedGPU) -> list[ProbedLink]:
    links: list[ProbedLink] = []
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            state = nvml.nvmlDeviceGetNvLinkState(handle, link)
        except pynvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            # NotSupported at link 0 just means no NVLink; InvalidArgument means past the last link
            if link == 0 and code not in (pynvml.NVML_ERROR_INVALID_ARGUMENT, pynvml.NVML_ERROR_NOT_SUPPORTED):
                gpu.degraded["nvlink"] = ERROR_NAMES.get(code, type(exc).__name__)
            break  # past the last link (InvalidArgument), or no NVLink at all
        if state != pynvml.NVML_FEATURE_ENABLED:
            continue
        degraded: dict[str, str] = {}
        version = _try(nvml.nvmlDeviceGetNvLinkVersion, degraded, "nvlink_version", handle, link)
        remote = _try(nvml.nvmlDeviceGetNvLinkRemotePciInfo, degraded, "nvlink_remote", handle, link)
        remote_type = _try(nvml.nvmlDeviceGetNvLinkRemoteDeviceType, degraded, "nvlink_remote_type", handle, link)
        gpu.degraded.update(degraded)
        generation = NVLINK_VERSION_GENERATION.get(version) if version is not None else None
        links.append(ProbedLink(link, generation, normalize_bus_id(getattr(remote, "busId", None)),
                                None if remote_type is None else remote_type == REMOTE_SWITCH))
    return links


# ---------------------------------------------------------------------- Cluster

def _probed_gpu_spec(gpu: ProbedGPU, catalog: Catalog) -> tuple[GPUSpec, list[str]]:
    notes: list[str] = []
    gpu_id = catalog.resolve_gpu_id(gpu.name)
    if gpu_id is not None:
        return catalog.gpu(gpu_id), notes
    notes.append(f"{gpu.name!r} is not in the catalog: compute peaks unknown; add it with --gpu-file FILE")
    spec = GPUSpec(id=gpu.name, name=gpu.name, vendor="nvidia", arch="unknown",
                   compute_capability=".".join(map(str, gpu.compute_capability or ())), bf16_tflops=0.0,
                   fp16_tflops=0.0, fp32_tflops=0.0, memory_gb=(gpu.memory_bytes or 0) / 1e9,
                   memory_bw_gbps=gpu.memory_bw_gbps or 0.0, pcie_gen=gpu.pcie_gen or 4, tdp_w=gpu.power_limit_w or 0.0,
                   notes="probed; not in the catalog")
    return spec, notes


def pcie_bandwidth(gen: int | None, width: int | None) -> tuple[float, float]:
    """(raw, NCCL-effective) GB/s per direction of a PCIe link; unknown gen/width count as Gen4 x16."""
    gen, width = gen or 4, width or 16
    raw = width * PCIE_GT_PER_LANE.get(gen, 16.0) * (128 / 130) / 8
    return raw, width * PCIE_NCCL_CODE.get(gen, 120) / 80


def build_probed_cluster(result: ProbeResult, catalog: Catalog) -> Cluster:
    if not result.gpus:
        raise PaseError("NVML sees no GPUs on this machine; describe the cluster with --cluster SPEC instead")
    spec, notes = _probed_gpu_spec(result.gpus[0], catalog)
    names = Counter(g.name for g in result.gpus)
    if len(names) > 1:
        notes.append(f"mixed GPU models {dict(names)}: pase plans for {result.gpus[0].name} on every device")
    graph = _pcie_tree(result, catalog)
    _add_probed_nvlinks(graph, result, catalog)
    blocked = [[i, j] for i in range(len(result.gpus)) for j in range(len(result.gpus))
               if i != j and result.p2p_read[i][j] not in (None, P2P_OK)]
    if blocked:
        graph.graph["no_p2p_pairs"] = blocked
        graph.graph["host_staged_fraction"] = catalog.host["host_staged_fraction"]
        notes.append(f"{len(blocked) // 2} GPU pairs have no peer-to-peer: their traffic stages through host memory")
    cluster = Cluster(spec=f"{len(result.gpus)}x{spec.id} (probed)", nodes=1, gpus_per_node=len(result.gpus),
                      gpu=spec, fabric=graph, source="probe", efficiency=catalog.efficiency,
                      notes=notes + result.warnings)
    return cluster


def _groups(levels: list[list[int | None]], threshold: int) -> list[int]:
    """Union GPUs whose common-ancestor level is at most ``threshold``; returns a group id per GPU."""
    n = len(levels)
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from((i, j) for i in range(n) for j in range(i + 1, n)
                         if (level := levels[i][j]) is not None and level <= threshold)
    group = {}
    for k, component in enumerate(sorted(nx.connected_components(graph), key=min)):
        for i in component:
            group[i] = k
    return [group[i] for i in range(n)]


def _pcie_tree(result: ProbeResult, catalog: Catalog) -> nx.Graph:
    """GPU -> PCIe switch (PIX group) -> upper switch (PXB group) -> host bridge (PHB) -> CPU (NODE) -> SYS."""
    graph = nx.Graph()
    levels = result.ancestor
    switch, upper, bridge, cpu = (_groups(levels, t) for t in (10, 20, 30, 40))
    socket_bw = catalog.host["socket_link_gbps"]
    latency = catalog.pcie(4)["latency_us"]

    def link(a: str, b: str, raw: float, effective: float, kind: str = "pcie") -> None:
        if not graph.has_edge(a, b):
            graph.add_edge(a, b, kind=kind, bandwidth_gbps=raw, effective_gbps=effective, latency_us=latency, links=1)

    for gpu in result.gpus:
        i = gpu.index
        raw, effective = pcie_bandwidth(gpu.pcie_gen, gpu.pcie_width)
        graph.add_node(f"gpu{i}", kind="gpu", index=i, name=gpu.name, bus_id=gpu.bus_id)
        for vertex, kind in ((f"pcisw{switch[i]}", "pcie_switch"), (f"pxb{upper[i]}", "pcie_switch"),
                             (f"hostbridge{bridge[i]}", "host_bridge"), (f"cpu{cpu[i]}", "cpu")):
            graph.add_node(vertex, kind=kind)
        link(f"gpu{i}", f"pcisw{switch[i]}", raw, effective)
        link(f"pcisw{switch[i]}", f"pxb{upper[i]}", raw, effective)
        link(f"pxb{upper[i]}", f"hostbridge{bridge[i]}", raw, effective)
        link(f"hostbridge{bridge[i]}", f"cpu{cpu[i]}", raw, effective)
    for a in sorted(set(cpu)):
        for b in sorted(set(cpu)):
            if a < b:
                link(f"cpu{a}", f"cpu{b}", socket_bw, socket_bw, kind="socket")
    # collapse the pass-through levels a machine does not have (a PXB group of one switch, ...)
    for vertex in [v for v, d in graph.nodes(data=True) if d["kind"] in ("pcie_switch", "host_bridge")]:
        neighbours = list(graph[vertex])
        if vertex.startswith("pxb") and len(neighbours) == 2:
            a, b = neighbours
            data = graph.edges[vertex, a]
            graph.remove_node(vertex)
            graph.add_edge(a, b, **data)
    return graph


def _add_probed_nvlinks(graph: nx.Graph, result: ProbeResult, catalog: Catalog) -> None:
    by_bus = {gpu.bus_id: gpu.index for gpu in result.gpus if gpu.bus_id}
    for gpu in result.gpus:
        to_gpu: Counter[int] = Counter()
        to_switch = 0
        generations: Counter[str | None] = Counter()
        for link in gpu.nvlinks:
            generations[link.generation] += 1
            peer = by_bus.get(link.remote_bus_id) if link.remote_bus_id else None
            if link.remote_is_switch or peer is None:  # NCCL: a remote that is not one of our GPUs is a switch
                to_switch += 1
            else:
                to_gpu[peer] += 1
        if not gpu.nvlinks:
            continue
        generation = generations.most_common(1)[0][0] or "4"
        if generation == "3" and gpu.compute_capability and gpu.compute_capability[1] == 6:
            generation = "3-ga10x-bridge"  # GA10x bridges run NVLink3 at about half rate
        rates = catalog.nvlink(generation)
        if to_switch:  # GPU-switch-GPU is one NVLink hop: each half carries half its latency
            graph.add_node("nvswitch", kind="nvswitch")
            graph.add_edge(f"gpu{gpu.index}", "nvswitch", **_nvlink_edge(rates, generation, to_switch, half_hop=True))
        for peer, count in to_gpu.items():
            if not graph.has_edge(f"gpu{gpu.index}", f"gpu{peer}"):
                graph.add_edge(f"gpu{gpu.index}", f"gpu{peer}", **_nvlink_edge(rates, generation, count))


def _nvlink_edge(rates: dict[str, float], generation: str, count: int, half_hop: bool = False) -> dict[str, Any]:
    return {"kind": "nvlink", "bandwidth_gbps": count * rates["per_link_gbps"],
            "effective_gbps": count * rates["effective_per_link_gbps"],
            "latency_us": rates["latency_us"] / (2 if half_hop else 1), "links": count, "generation": generation}


def level_name(level: int | None) -> str:
    return LEVEL_NAMES.get(level, "?") if level is not None else "?"
