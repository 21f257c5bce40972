"""``LayerGraph``: the model as layers (networkx MultiDiGraph) with shapes, FLOPs and bytes.

Plain data that later stages (cost model, search, what-if) read: node attributes are JSON
types, and ``to_json`` writes networkx node-link data plus a schema version, so scripts can
use the file without importing pase. Multi-edges are kept: a consumer reading two tensors of
one producer pays for both.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import networkx as nx

from pase import atomic
from pase.graph.attrs import LayerAttrs
from pase.schema import check_header

SCHEMA = "pase.layer_graph"
SCHEMA_VERSION = 1


@dataclass
class BlockSummary:
    block: str
    layers: int
    params: int
    flops_fwd: int
    flops_bwd: int
    out_bytes: int


class LayerGraph:
    """A layer graph plus the facts of its capture (model, batch, dtype, method)."""

    def __init__(self, graph: nx.MultiDiGraph) -> None:
        self.graph = graph

    # ------------------------------------------------------------------ views
    @property
    def meta(self) -> dict[str, Any]:
        return self.graph.graph

    @property
    def batch(self) -> int:
        return int(self.meta.get("batch", 1))

    def layers(self) -> Iterator[tuple[str, LayerAttrs]]:
        """Layers in capture (topological) order."""
        return iter(sorted(self.graph.nodes(data=True), key=lambda item: item[1]["index"]))

    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def __getitem__(self, layer_id: str) -> LayerAttrs:
        return cast(LayerAttrs, self.graph.nodes[layer_id])

    def total(self, attribute: str) -> int:
        return sum(int(data.get(attribute, 0)) for _, data in self.graph.nodes(data=True))

    @property
    def param_count(self) -> int:
        return self.total("param_count")

    def fingerprint(self) -> str:
        """Identifies the model structure (layer ids, ops, dimensions): a plan records it, the runtime checks it."""
        text = json.dumps([(layer_id, data["op"], data["dims"]) for layer_id, data in self.layers()], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def blocks(self) -> list[BlockSummary]:
        """Per display block (module path grouping), in order of first appearance. O(V)."""
        summary: dict[str, BlockSummary] = {}
        for _, data in self.layers():
            block = summary.setdefault(data["block"], BlockSummary(data["block"], 0, 0, 0, 0, 0))
            block.layers += 1
            block.params += data["param_count"]
            block.flops_fwd += data["flops_fwd"]
            block.flops_bwd += data["flops_bwd"]
            block.out_bytes += data["out_bytes"]
        return list(summary.values())

    def skip_edges(self) -> list[tuple[str, str, dict[str, Any]]]:
        """The U's skip connections: feature maps made before the decoder and read inside it.

        A skip edge carries a spatial tensor (rank >= 4) from a layer that precedes the
        first decoder ("up") layer, outside the middle block (whose output is the main path),
        to a decoder layer; hub tensors such as the timestep embedding are rank 2 and do not
        count. O(V + E).
        """
        nodes = self.graph.nodes
        decoder = [data["index"] for _, data in self.graph.nodes(data=True) if _stage(data["module"]) == "up"]
        first_decoder = min(decoder, default=len(self))
        return [(src, dst, data) for src, dst, data in self.graph.edges(data=True)
                if nodes[src]["index"] < first_decoder and _stage(nodes[src]["module"]) not in ("up", "mid")
                and _stage(nodes[dst]["module"]) == "up" and len(data["shape"]) >= 4]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        data = nx.node_link_data(self.graph, edges="edges")
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **data}

    def to_json(self, path: str | Path) -> None:
        """Write atomically (temp file + rename), so a crash never leaves half a graph."""
        atomic.write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerGraph:
        check_header(data, SCHEMA, SCHEMA_VERSION, "pase layer graph", "pase graph --json", error=ValueError)
        payload = {k: v for k, v in data.items() if k not in ("schema", "schema_version")}
        return cls(nx.node_link_graph(payload, directed=True, multigraph=True, edges="edges"))

    @classmethod
    def from_json(cls, path: str | Path) -> LayerGraph:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _stage(module: str) -> str | None:
    head = module.split(".", 1)[0]
    if head.startswith(("down", "input_blocks", "encoder")):
        return "down"
    if head.startswith(("up", "output_blocks", "decoder")):
        return "up"
    if head.startswith(("mid", "middle_block")):
        return "mid"
    return None
