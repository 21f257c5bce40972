"""``CostGraph``: the search's input as plain arrays, and the "pase-cost-graph" v1 file format.

A vertex has configurations and a cost per configuration; an edge has a cost matrix indexed
[source configuration][destination configuration]. The objective of an assignment is the sum
of the chosen vertex costs plus, for every edge, its matrix entry. Files are JSON (plain or
gzip): ``{"format": "pase-cost-graph", "version": 1, "name", "devices", "vertices": [{"id",
"op", "configs", "cost"}], "edges": [{"src", "dst", "cost"}]}``; unknown keys are ignored.
"""
from __future__ import annotations

import gzip
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from pase import atomic
from pase.errors import PaseError

FORMAT = "pase-cost-graph"
INFEASIBLE = 1e308  # written for +inf, so that JSON readers of every language can load the file
VERSION = 1


class CostGraphError(PaseError):
    """A cost graph file that breaks the format; the message names the vertex or edge."""
@dataclass
class CostGraph:
    name: str
    devices: int
    ids: list[str]
    ops: list[str]
    configs: list[list[list[int]]] | list[np.ndarray]  # per vertex, one split-factor row per configuration
    vertex_costs: list[np.ndarray]
    edges: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # (src, dst, [K_src, K_dst])

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.vertex_costs]

    def objective(self, assignment: list[int]) -> float:
        """The cost of one configuration index per vertex. O(V + E)."""
        total = sum(float(cost[choice]) for cost, choice in zip(self.vertex_costs, assignment))
        return total + sum(float(m[assignment[s], assignment[d]]) for s, d, m in self.edges)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "name": self.name, "devices": self.devices,
            "vertices": [{"id": i, "op": op, "configs": np.asarray(cfg).tolist(), "cost": _floats(cost)}
                         for i, op, cfg, cost in zip(self.ids, self.ops, self.configs, self.vertex_costs)],
            "edges": [{"src": self.ids[s], "dst": self.ids[d], "cost": [_floats(row) for row in m]}
                      for s, d, m in self.edges],
        }

    def save(self, path: str | Path) -> None:
        """Write atomically; a ``.gz`` suffix means gzip."""
        path = Path(path)
        payload = json.dumps(self.to_dict(), separators=(",", ":")).encode()
        if path.suffix == ".gz":
            payload = gzip.compress(payload, compresslevel=6)
        atomic.write_bytes(path, payload)

    @classmethod
    def load(cls, path: str | Path) -> CostGraph:
        path = Path(path)
        if not path.exists():
            raise CostGraphError(f"cost graph file {path} does not exist")
        if path.is_dir():
            raise CostGraphError(f"cost graph file {path} is a folder; give a {FORMAT} file (JSON or gzip JSON)")
        try:
            raw = path.read_bytes()
            text = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
            data = _parse_json(text)
        except (OSError, ValueError, EOFError, zlib.error, RecursionError) as exc:
            raise CostGraphError(f"{path} is not JSON or gzip JSON: {str(exc)[:200]}") from None
        return cls.from_dict(data, origin=str(path))

    @classmethod
    def from_dict(cls, data: Any, origin: str = "cost graph") -> CostGraph:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CostGraphError(f"{origin}: not a {FORMAT} file (its \"format\" is "
                                 f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r})")
        if data.get("version") != VERSION:
            raise CostGraphError(f"{origin}: {FORMAT} version {data.get('version')!r} is not supported "
                                 f"(this pase reads version {VERSION})")
        vertices = data.get("vertices")
        if not isinstance(vertices, list) or not vertices:
            raise CostGraphError(f"{origin}: \"vertices\" must be a non-empty list")
        ids, ops, configs, costs = [], [], [], []
        index: dict[str, int] = {}
        for n, vertex in enumerate(vertices):
            where = f"{origin}: vertex #{n}" + (f" ({vertex.get('id')!r})" if isinstance(vertex, dict) else "")
            if not isinstance(vertex, dict) or "id" not in vertex or "cost" not in vertex:
                raise CostGraphError(f"{where} needs \"id\" and \"cost\"")
            vid = str(vertex["id"])
            if vid in index:
                raise CostGraphError(f"{where}: duplicate vertex id")
            cost = _array(vertex["cost"], 1, where + " cost")
            if cost.size == 0:
                raise CostGraphError(f"{where}: has no configurations (empty \"cost\")")
            config = vertex.get("configs") or [[i] for i in range(cost.size)]
            if not isinstance(config, list) or len(config) != cost.size:
                raise CostGraphError(f"{where}: \"configs\" must be a list of one entry per cost ({cost.size})")
            index[vid] = n
            ids.append(vid)
            ops.append(str(vertex.get("op", "")))
            configs.append([_config(c, where) for c in config])
            costs.append(cost)
        edges = []
        listed = data.get("edges") or []
        if not isinstance(listed, list):
            raise CostGraphError(f"{origin}: \"edges\" must be a list")
        for n, edge in enumerate(listed):
            where = f"{origin}: edge #{n}"
            if not isinstance(edge, dict) or not {"src", "dst", "cost"} <= set(edge):
                raise CostGraphError(f"{where} needs \"src\", \"dst\" and \"cost\"")
            where = f"{where} ({edge['src']} -> {edge['dst']})"
            for end in ("src", "dst"):
                if str(edge[end]) not in index:
                    raise CostGraphError(f"{where}: unknown {end} vertex {edge[end]!r}")
            s, d = index[str(edge["src"])], index[str(edge["dst"])]
            if s == d:
                raise CostGraphError(f"{where}: an edge must join two different vertices")
            matrix = _array(edge["cost"], 2, where + " cost")
            if matrix.shape != (costs[s].size, costs[d].size):
                raise CostGraphError(f"{where}: cost matrix is {matrix.shape[0]}x{matrix.shape[1]}, but the vertices "
                                     f"have {costs[s].size} and {costs[d].size} configs")
            edges.append((s, d, matrix))
        devices = data.get("devices", 0)
        if not _is_int(devices) or devices < 0:
            raise CostGraphError(f"{origin}: \"devices\" must be a whole number >= 0, not {devices!r}")
        return cls(str(data.get("name", origin)), devices, ids, ops, configs, costs, edges)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config(value: Any, where: str) -> list[int]:
    """One configuration: a whole number or a list of them (its split factors)."""
    items = value if isinstance(value, list) else [value]
    if not all(_is_int(v) for v in items):
        raise CostGraphError(f"{where}: a configuration must be a whole number or a list of them, not {value!r}")
    return list(items)


def _parse_json(text: bytes) -> Any:
    """orjson (10x faster on large cost graphs); the standard library for files orjson rejects
    (Infinity and NaN literals are not standard JSON)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _array(value: Any, ndim: int, where: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CostGraphError(f"{where} must be {'a list' if ndim == 1 else 'a list of lists'} of numbers") from None
    if array.ndim != ndim:
        raise CostGraphError(f"{where} must be {'a list' if ndim == 1 else 'a list of equal-length lists'} of numbers")
    if np.isnan(array).any():
        raise CostGraphError(f"{where} contains NaN")
    if (array == -np.inf).any():
        raise CostGraphError(f"{where} contains -inf")
    array[array >= INFEASIBLE] = np.inf  # the file's spelling of an infeasible choice
    return array


def _floats(array: np.ndarray) -> list[float]:
    """Finite floats for JSON readers of every language: an infeasible (inf) cost is written as 1e308."""
    return [x if math.isfinite(x) else INFEASIBLE for x in array.tolist()]
