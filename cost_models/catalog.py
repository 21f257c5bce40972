"""The hardware catalog: GPUs, NVLink/PCIe generations, networks and default efficiencies.

The figures are data (``data/catalog.json``, with sources and dates), not code. Users add
GPUs or override any figure (price, TFLOPS, efficiency) with their own JSON/YAML file, whose
entries are merged over the shipped ones. Lookups forgive case and punctuation
(``h100 sxm`` = ``H100-SXM``) and suggest close matches for unknown names.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pase.errors import PaseError


class UnknownHardwareError(PaseError):
    """A GPU or network name the catalog does not know."""
@dataclass(frozen=True)
class Price:
    low: float
    typical: float
    high: float
    as_of: str = ""
    source: str = ""


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model. Tensor TFLOPS are dense; bandwidths are GB/s (per direction for links)."""
    id: str
    name: str
    vendor: str
    arch: str
    compute_capability: str
    bf16_tflops: float
    fp16_tflops: float
    fp32_tflops: float
    memory_gb: float
    memory_bw_gbps: float
    pcie_gen: int
    tdp_w: float
    bf16_supported: bool = True
    pcie_lanes: int = 16
    p2p_over_pcie: bool = True
    max_gpus_per_node: int = 8
    nvlink_generation: str | None = None
    nvlink_links: int = 0
    nvlink_topology: str | None = None  # switch | pairs | mesh | cube-mesh
    price: Price | None = None
    nvml_names: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    notes: str = ""
    sm_count: int = 0  # streaming multiprocessors (AMD: compute units); 0 = unknown, no wave quantisation
    kernel_floor_us: float = 0.0  # GPU time per kernel no work hides (the catalog's "kernels" section, by arch)
    # GPU time per kernel of a forward that runs every layer-graph operator as its own kernel ("kernels" section)
    unfused_kernel_floor_us: float = 0.0
    # measured maximum achievable bf16 matmul rate (0: not measured), and the factor it puts on the op kinds'
    # efficiencies: its share of peak over the reference GPU's (Catalog.gpu; 1.0 without a measurement)
    matmul_achievable_tflops: float = 0.0
    achievable_scale: float = 1.0
    # host time per operator an eager PyTorch stack dispatches to this GPU (the catalog's "kernels" section)
    host_us_per_op: float = 0.0
    # host time torch.nn.DataParallel takes to copy one module for one replica on every call (the "kernels" section)
    replicate_us_per_module: float = 0.0

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    def efficiency_scale(self, precision: str) -> float:
        """The factor on the op kinds' efficiencies at ``precision``: ``achievable_scale`` on the tensor cores
        (bf16, fp16), where the matmul ceiling was measured; 1.0 for fp32."""
        return self.achievable_scale if precision in ("bf16", "fp16") else 1.0

    def peak_tflops(self, precision: str) -> float:
        """Dense peak for ``bf16``/``fp16``/``fp32``; bf16 on a part without BF16 falls back to fp16."""
        if precision == "fp32":
            return self.fp32_tflops
        if precision == "fp16" or not self.bf16_supported:
            return self.fp16_tflops
        return self.bf16_tflops

    @classmethod
    def from_entry(cls, gpu_id: str, entry: dict[str, Any]) -> GPUSpec:
        required = ("bf16_tflops", "fp32_tflops", "memory_gb", "memory_bw_gbps")
        missing = [k for k in required if k not in entry]
        if missing:
            raise PaseError(f"GPU {gpu_id!r} in the catalog lacks {', '.join(missing)}; every GPU needs "
                            f"{', '.join(required)} (see `pase hw list --json` for a complete entry to copy)")
        for key in (*required, "fp16_tflops"):
            if key in entry and not is_positive_number(entry[key]):
                raise PaseError(f"GPU {gpu_id!r}: {key} must be a positive number, not {entry[key]!r}")
        if "tdp_w" in entry and not (is_positive_number(entry["tdp_w"]) or entry["tdp_w"] == 0):
            raise PaseError(f"GPU {gpu_id!r}: tdp_w must be a number >= 0, not {entry['tdp_w']!r}")
        nvlink = entry.get("nvlink") or {}
        price = entry.get("price_usd_per_gpu_hour")
        if isinstance(price, dict):
            for key in ("low", "typical", "high"):
                if key in price and not is_positive_number(price[key]):
                    raise PaseError(f"GPU {gpu_id!r}: its price ({key}) must be a positive $ per GPU-hour, not "
                                    f"{price[key]!r}")
            if "typical" not in price:
                raise PaseError(f"GPU {gpu_id!r}: its price needs a typical $ per GPU-hour (low and high are "
                                "optional and default to it)")
            price = {"low": price["typical"], "high": price["typical"], **price}
        return cls(
            id=gpu_id, name=entry.get("name", gpu_id), vendor=entry.get("vendor", "nvidia"),
            arch=entry.get("arch", "unknown"), compute_capability=str(entry.get("compute_capability", "")),
            bf16_tflops=float(entry["bf16_tflops"]), fp16_tflops=float(entry.get("fp16_tflops", entry["bf16_tflops"])),
            fp32_tflops=float(entry["fp32_tflops"]), memory_gb=float(entry["memory_gb"]),
            memory_bw_gbps=float(entry["memory_bw_gbps"]), pcie_gen=int(entry.get("pcie_gen", 4)),
            tdp_w=float(entry.get("tdp_w", 0)), bf16_supported=bool(entry.get("bf16_supported", True)),
            pcie_lanes=int(entry.get("pcie_lanes", 16)), p2p_over_pcie=bool(entry.get("p2p_over_pcie", True)),
            max_gpus_per_node=int(entry.get("max_gpus_per_node", 8)),
            nvlink_generation=str(nvlink["generation"]) if nvlink else None, nvlink_links=int(nvlink.get("links", 0)),
            nvlink_topology=nvlink.get("topology") if nvlink else None,
            price=Price(**{k: price[k] for k in ("low", "typical", "high", "as_of", "source") if k in price})
            if price else None,
            nvml_names=tuple(entry.get("nvml_names", ())), aliases=tuple(entry.get("aliases", ())),
            sources=tuple(entry.get("sources", ())), notes=entry.get("notes", ""),
            sm_count=int(entry.get("sm_count", 0)), kernel_floor_us=float(entry.get("kernel_floor_us", 0.0)),
            unfused_kernel_floor_us=float(entry.get("unfused_kernel_floor_us", 0.0)),
            matmul_achievable_tflops=float(entry.get("matmul_achievable_tflops", 0.0)),
            achievable_scale=float(entry.get("achievable_scale", 1.0)),
            host_us_per_op=float(entry.get("host_us_per_op", 0.0)),
            replicate_us_per_module=float(entry.get("replicate_us_per_module", 0.0)),
        )


@dataclass(frozen=True)
class NetworkSpec:
    """An inter-node network port type: per-NIC bandwidth per direction and latency."""
    id: str
    line_gbit: float
    gbps: float
    achieved_fraction: float
    latency_us: float


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass
class Catalog:
    data: dict[str, Any]
    origins: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, extra_files: Sequence[str | Path] | None = None) -> Catalog:
        """The shipped catalog, with each extra file's entries merged over it in order."""
        text = resources.files("cost_models").joinpath("data/catalog.json").read_text()
        catalog = cls(json.loads(text), ["built-in"])
        for path in extra_files or []:
            catalog.merge(read_data_file(path), origin=str(path))
        return catalog

    def merge(self, extra: dict[str, Any], origin: str) -> None:
        """Deep-merge a user's entries (new GPUs, or figures that override shipped ones)."""
        sections = {"gpus", "networks", "nvlink", "pcie", "host", "efficiency", "kernels", "format", "version", "about"}
        unknown = set(extra) - sections
        if unknown:
            raise PaseError(f"{origin}: unknown catalog section(s) {sorted(unknown)}; use gpus, networks, "
                            "nvlink, pcie, host, efficiency or kernels")
        _deep_merge(self.data, copy.deepcopy(extra))
        self.origins.append(origin)

    # ------------------------------------------------------------------ GPUs
    def gpu_ids(self) -> list[str]:
        return list(self.data["gpus"])

    def gpu(self, name: str) -> GPUSpec:
        """Look a GPU up by id, alias or NVML name; unknown names get close matches."""
        gpu_id = self.resolve_gpu_id(name)
        if gpu_id is None:
            raise UnknownHardwareError(_unknown("GPU", name, self._gpu_names(), "pase hw list",
                                                "add your own with --gpu-file FILE (a catalog 'gpus' section)"))
        entry = self.data["gpus"][gpu_id]
        kernels = self.data.get("kernels", {})
        defaults = {"achievable_scale": self.achievable_scale(entry),
                    "kernel_floor_us": kernels.get("floor_us", {}).get(entry.get("arch"), 0.0),
                    "unfused_kernel_floor_us": kernels.get("unfused_floor_us", 0.0),
                    "host_us_per_op": kernels.get("host_us_per_op", 0.0),
                    "replicate_us_per_module": kernels.get("replicate_us_per_module", 0.0)}
        return GPUSpec.from_entry(gpu_id, {**defaults, **entry})

    def achievable_scale(self, entry: dict[str, Any]) -> float:
        """The factor on the op kinds' efficiencies for the GPU of catalog ``entry``: its measured achievable bf16
        matmul rate's share of its peak over the reference GPU's (the efficiency section's
        ``_achievable_reference``); 1.0 where either is not measured."""
        reference = self.data["gpus"].get(self.data.get("efficiency", {}).get("_achievable_reference", ""), {})
        mine, theirs = entry.get("matmul_achievable_tflops", 0), reference.get("matmul_achievable_tflops", 0)
        if not (is_positive_number(mine) and is_positive_number(theirs)):
            return 1.0
        return (float(mine) / float(entry["bf16_tflops"])) / (float(theirs) / float(reference["bf16_tflops"]))

    def resolve_gpu_id(self, name: str) -> str | None:
        wanted = _key(name)
        for gpu_id, entry in self.data["gpus"].items():
            names = [gpu_id, *entry.get("aliases", ()), *entry.get("nvml_names", ()), entry.get("name", "")]
            if wanted in {_key(n) for n in names if n}:
                return gpu_id
        return None

    def _gpu_names(self) -> list[str]:
        return [n for gpu_id, e in self.data["gpus"].items() for n in (gpu_id, *e.get("aliases", ()))]

    # ------------------------------------------------------------------ links and networks
    def network(self, name: str) -> NetworkSpec:
        wanted = _key(name)
        for net_id, entry in self.data["networks"].items():
            if net_id.startswith("_"):
                continue
            if wanted in {_key(n) for n in (net_id, *entry.get("aliases", ()))}:
                return NetworkSpec(net_id, float(entry["line_gbit"]), float(entry["gbps"]),
                                   float(entry.get("achieved_fraction", 0.9)), float(entry.get("latency_us", 14.0)))
        names = [n for k, e in self.data["networks"].items() if not k.startswith("_")
                 for n in (k, *e.get("aliases", ()))]
        raise UnknownHardwareError(_unknown("network", name, names, "pase hw list",
                                            "or add a 'networks' entry with --gpu-file FILE"))

    def network_ids(self) -> list[str]:
        return [k for k in self.data["networks"] if not k.startswith("_")]

    def nvlink(self, generation: str) -> dict[str, float]:
        return self._link("nvlink", "NVLink generation", generation)

    def pcie(self, generation: int) -> dict[str, float]:
        return self._link("pcie", "PCIe generation", generation)

    def _link(self, section: str, kind: str, generation: Any) -> dict[str, float]:
        known = [k for k in self.data[section] if not k.startswith("_")]
        if str(generation) not in known:
            raise UnknownHardwareError(f"unknown {kind} {generation!r} (a GPU entry's {section}_gen or "
                                       f"nvlink_generation); known: {', '.join(known)}")
        return self.data[section][str(generation)]

    @property
    def host(self) -> dict[str, float]:
        return self.data["host"]

    @property
    def kernels(self) -> dict[str, Any]:
        return self.data.get("kernels", {})

    @property
    def efficiency(self) -> dict[str, float]:
        return {k: v for k, v in self.data["efficiency"].items() if not k.startswith("_")}


def is_positive_number(value: Any) -> bool:
    """A finite number above zero (strings of numbers included, as YAML and --gpu give them)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number > 0


def _unknown(kind: str, name: str, known: list[str], listing: str, extra: str) -> str:
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.4) or difflib.get_close_matches(
        _key(name), [_key(k) for k in known], n=4, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} See `{listing}` for all; {extra}."


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def read_data_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML file (by extension), with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise PaseError(f"file {path} does not exist")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise PaseError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise PaseError(f"{path} must hold a mapping (JSON object / YAML mapping) at the top level")
    return data
