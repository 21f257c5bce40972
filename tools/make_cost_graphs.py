"""Synthetic pase-cost-graph files shaped like the PaSE reference's benchmark graphs.

    .venv/bin/python tools/make_cost_graphs.py [--out bench_results/cost_graphs]

Vertex and edge counts and configuration-count ranges follow the PaSE paper's benchmark graphs
(Inception-v3: 219 vertices, 253 edges, 6-176 configs at p=64; Transformer: 204 vertices,
256 edges, 35-146 configs at p=16 and 84-566 at p=64). Structure: Inception is a chain of
fork-join modules (four parallel branches of 1-3 layers); the Transformer is a chain of
blocks with residual edges and a q/k/v fan-out. Costs mimic a parallel cost model: each
vertex cost is compute / split + a communication term; each edge costs 0 between matching
layouts and a re-layout volume otherwise. Seeds are fixed, so files are reproducible.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pase.search.cost_graph import CostGraph


def _configs(rng: np.random.Generator, low: int, high: int, heavy: float) -> int:
    """Configuration count: mostly near ``low``, a ``heavy`` share up to ``high``."""
    if rng.random() < heavy:
        return int(rng.integers((low + high) // 2, high + 1))
    return int(rng.integers(low, max(low + 1, (low + high) // 3)))


def _build(name: str, devices: int, edges_list: list[tuple[int, int]], counts: list[int],
           rng: np.random.Generator) -> CostGraph:
    n = len(counts)
    # each configuration gets a "layout" code; matching codes re-lay out for free
    layouts = [rng.integers(0, 12, size=k) for k in counts]
    work = rng.lognormal(mean=2.0, sigma=1.0, size=n)
    vertex_costs = []
    for v, k in enumerate(counts):
        split = rng.integers(1, devices + 1, size=k)
        comm = rng.random(k) * work[v] * 0.3
        vertex_costs.append(np.round(work[v] / split + comm, 4))
    edges = []
    for s, d in edges_list:
        # re-layout cost depends only on the pair of layouts (as a real cost model's does)
        volume = float(np.round(rng.lognormal(mean=0.0, sigma=1.0), 3))
        between = np.round(volume * (0.5 + rng.random((12, 12))), 3)
        np.fill_diagonal(between, 0.0)
        edges.append((s, d, between[np.ix_(layouts[s], layouts[d])]))
    ids = [f"{name}.{v}" for v in range(n)]
    configs = [[[c] for c in range(k)] for k in counts]
    return CostGraph(f"{name}-p{devices}", devices, ids, ["layer"] * n, configs, vertex_costs, edges)


def inception_like(devices: int, seed: int = 0) -> CostGraph:
    rng = np.random.default_rng(seed + devices)
    low, high = {8: (4, 30), 16: (5, 57), 32: (6, 105), 64: (6, 176)}[devices]
    edges, counts, prev = [], [], None

    def new() -> int:
        counts.append(_configs(rng, low, high, 0.15))
        return len(counts) - 1

    stem = new()
    prev = stem
    for _ in range(6):
        prev_new = new()
        edges.append((prev, prev_new))
        prev = prev_new
    while len(counts) < 205:  # modules: fork into 4 branches, join with a concat
        tails = []
        for _branch in range(4):
            last = prev
            for _layer in range(int(rng.integers(1, 4))):
                v = new()
                edges.append((last, v))
                last = v
            tails.append(last)
        join = new()
        edges += [(t, join) for t in tails]
        prev = join
    return _build("inception-like", devices, edges, counts, rng)


def transformer_like(devices: int, seed: int = 0) -> CostGraph:
    rng = np.random.default_rng(seed + 1000 + devices)
    low, high = {8: (20, 62), 16: (35, 146), 32: (56, 302), 64: (84, 566)}[devices]
    edges, counts = [], []

    def new(heavy: float = 0.1) -> int:
        counts.append(_configs(rng, low, high, heavy))
        return len(counts) - 1

    prev = new()
    while len(counts) < 200:  # a block: norm -> q, k, v -> scores -> attn -> out -> add(residual) -> ff -> add
        norm = new()
        edges.append((prev, norm))
        q, k, v = new(), new(), new()
        edges += [(norm, q), (norm, k), (norm, v)]
        scores = new(0.5)
        edges += [(q, scores), (k, scores)]
        attn = new(0.5)
        edges += [(scores, attn), (v, attn)]
        out = new()
        edges.append((attn, out))
        add = new()
        edges += [(out, add), (prev, add)]
        ff = new()
        edges.append((add, ff))
        add2 = new()
        edges += [(ff, add2), (add, add2)]
        prev = add2
    return _build("transformer-like", devices, edges, counts, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_results/cost_graphs"))
    args = parser.parse_args()
    for devices in (8, 16, 32, 64):
        for make in (inception_like, transformer_like):
            graph = make(devices)
            path = args.out / f"{graph.name}.json.gz"
            graph.save(path)
            print(f"{path}: {len(graph.sizes)} vertices, {len(graph.edges)} edges, "
                  f"configs {min(graph.sizes)}-{max(graph.sizes)}, {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
