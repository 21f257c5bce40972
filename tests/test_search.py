"""The exact search: brute-force equality, the cost-graph file format and `pase search`."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from pase.search import CostGraph, CostGraphError, brute_force, solve


def random_graph(rng: np.random.Generator, max_vertices: int = 8, max_configs: int = 4) -> CostGraph:
    n = int(rng.integers(1, max_vertices + 1))
    sizes = [int(rng.integers(1, max_configs + 1)) for _ in range(n)]
    edges = []
    for _ in range(int(rng.integers(0, 2 * n + 1)) if n > 1 else 0):
        s, d = (int(x) for x in rng.choice(n, 2, replace=False))
        edges.append((s, d, np.round(rng.random((sizes[s], sizes[d])) * 10, 2)))
    if n > 1 and rng.random() < 0.5:  # a multi-edge: the same pair twice, once reversed
        s, d = edges[0][:2] if edges else (0, 1)
        edges.append((d, s, np.round(rng.random((sizes[d], sizes[s])) * 10, 2)))
    costs = [np.round(rng.random(k) * 10, 2) for k in sizes]
    return CostGraph("random", 4, [f"v{i}" for i in range(n)], ["op"] * n,
                     [[[c] for c in range(k)] for k in sizes], costs, edges)


@pytest.mark.parametrize("seed", range(4))
def test_elimination_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):  # 160 random graphs in all, up to 8 vertices, with multi-edges
        graph = random_graph(rng)
        exact = brute_force(graph)
        for prune in (True, False):
            found = solve(graph, prune=prune)
            assert found.optimum == pytest.approx(exact.optimum, abs=1e-9)
            assert graph.objective(found.assignment) == pytest.approx(found.optimum, abs=1e-9)


def test_multi_edges_are_all_paid() -> None:
    one = np.array([[0.0, 5.0], [5.0, 0.0]])
    graph = CostGraph("pair", 2, ["a", "b"], ["x", "x"], [[[1], [2]], [[1], [2]]],
                      [np.array([0.0, 1.0]), np.array([1.0, 0.0])], [(0, 1, one), (0, 1, one), (1, 0, one.T)])
    solution = solve(graph)
    assert solution.optimum == pytest.approx(1.0)  # disagreeing would pay 3 x 5
    assert graph.objective([0, 1]) == pytest.approx(15.0)


def test_infeasible_configurations_are_avoided() -> None:
    inf = np.inf
    graph = CostGraph("inf", 2, ["a", "b"], ["x", "x"], [[[1], [2]], [[1], [2]]],
                      [np.array([0.0, inf]), np.array([0.0, 0.0])], [(0, 1, np.array([[inf, 2.0], [0.0, 0.0]]))])
    solution = solve(graph)
    assert solution.assignment == [0, 1] and solution.optimum == pytest.approx(2.0)


def test_infeasible_costs_survive_a_file_round_trip(tmp_path) -> None:
    graph = CostGraph("inf", 2, ["a"], ["x"], [[[1], [2]]], [np.array([np.inf, np.inf])], [])
    path = tmp_path / "inf.json"
    graph.save(path)
    assert np.isinf(CostGraph.load(path).vertex_costs[0]).all()
    with pytest.raises(Exception, match="infeasible"):
        solve(CostGraph.load(path))


def test_file_round_trip(tmp_path) -> None:
    graph = random_graph(np.random.default_rng(7), max_vertices=6)
    for name in ("g.json", "g.json.gz"):
        path = tmp_path / name
        graph.save(path)
        loaded = CostGraph.load(path)
        assert loaded.ids == graph.ids and loaded.sizes == graph.sizes
        assert solve(loaded).optimum == pytest.approx(solve(graph).optimum)


def _file(tmp_path, data) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


GOOD = {"format": "pase-cost-graph", "version": 1, "name": "g", "devices": 2,
        "vertices": [{"id": "a", "op": "conv", "configs": [[1], [2]], "cost": [1, 2]},
                     {"id": "b", "op": "conv", "configs": [[1], [2]], "cost": [3, 4]}],
        "edges": [{"src": "a", "dst": "b", "cost": [[0, 1], [1, 0]]}], "extra": "ignored"}


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(format="other"), "not a pase-cost-graph"),
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d["vertices"][1].update(cost=[3, 4, 5]),
     "vertex #1 ('b'): \"configs\" must be a list of one entry per cost (3)"),
    (lambda d: d["edges"][0].update(dst="zz"), "unknown dst vertex 'zz'"),
    (lambda d: d["edges"][0].update(cost=[[0, 1]]), "edge #0 (a -> b): cost matrix is 1x2"),
    (lambda d: d["vertices"][0].update(cost=["x", 1]), "vertex #0 ('a') cost must be a list of numbers"),
    (lambda d: d["vertices"].append({"id": "a", "cost": [1]}), "duplicate vertex id"),
    (lambda d: d["edges"].append({"src": "a", "dst": "a", "cost": [[0, 0], [0, 0]]}), "two different vertices"),
])
def test_invalid_files_name_the_problem(tmp_path, mutate, needle: str) -> None:
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    with pytest.raises(CostGraphError) as info:
        CostGraph.load(_file(tmp_path, data))
    assert needle in str(info.value)


def test_cli_search_json(tmp_path) -> None:
    path = tmp_path / "g.json.gz"
    path.write_bytes(gzip.compress(json.dumps(GOOD).encode()))
    result = subprocess.run([sys.executable, "-m", "pase", "search", "--cost-graph", str(path), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["optimum"] == pytest.approx(4.0) and answer["assignment"] == {"a": 0, "b": 0}
    assert answer["seconds"] >= 0
    bad = subprocess.run([sys.executable, "-m", "pase", "search", "--cost-graph", str(tmp_path / "none.json")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("seed", range(2))
def test_conditioning_on_hubs_is_exact(seed: int) -> None:
    """A star-shaped hub (like the timestep embedding) conditioned outside the elimination."""
    rng = np.random.default_rng(100 + seed)
    conditioned = 0
    for _ in range(40):
        n = int(rng.integers(3, 9))
        sizes = [int(rng.integers(2, 4)) for _ in range(n)]
        edges = [(0, v, np.round(rng.random((sizes[0], sizes[v])) * 5, 2)) for v in range(1, n)]
        for _ in range(int(rng.integers(0, n))):
            s, d = (int(x) for x in rng.choice(n, 2, replace=False))
            edges.append((s, d, np.round(rng.random((sizes[s], sizes[d])) * 5, 2)))
        graph = CostGraph("star", 4, [f"v{i}" for i in range(n)], ["op"] * n,
                          [[[c] for c in range(k)] for k in sizes], [np.round(rng.random(k) * 5, 2) for k in sizes],
                          edges)
        exact = brute_force(graph)
        found = solve(graph, hub_degree=2)
        conditioned += bool(found.stats.conditioned_on)
        assert found.optimum == pytest.approx(exact.optimum, abs=1e-9)
    assert conditioned > 0


def _hub_graph(rng: np.random.Generator, hubs: int = 2) -> CostGraph:
    """Random graphs where the first ``hubs`` vertices feed every other vertex (timestep embedding, context)."""
    n = int(rng.integers(hubs + 2, 9))
    sizes = [int(rng.integers(2, 4)) for _ in range(n)]
    edges = [(h, v, np.round(rng.random((sizes[h], sizes[v])) * 5, 2)) for h in range(hubs) for v in range(hubs, n)]
    if hubs > 1:
        edges.append((0, 1, np.round(rng.random((sizes[0], sizes[1])) * 5, 2)))
    for _ in range(int(rng.integers(0, n))):
        s, d = (int(x) for x in rng.choice(n, 2, replace=False))
        edges.append((s, d, np.round(rng.random((sizes[s], sizes[d])) * 5, 2)))
    return CostGraph("hubs", 4, [f"v{i}" for i in range(n)], ["op"] * n, [[[c] for c in range(k)] for k in sizes],
                     [np.round(rng.random(k) * 5, 2) for k in sizes], edges)


@pytest.mark.parametrize("hubs", [1, 2])
def test_hub_bounds_keep_their_promise(hubs: int) -> None:
    """With gap ~0 the bounded hub search is exact; with a gap it is never worse than promised."""
    rng = np.random.default_rng(300 + hubs)
    bounded = 0
    for _ in range(60):
        graph = _hub_graph(rng, hubs)
        exact = brute_force(graph).optimum
        tight = solve(graph, hub_degree=3, gap=1e-12)
        assert tight.optimum == pytest.approx(exact, abs=1e-9)
        loose = solve(graph, hub_degree=3, gap=0.2)
        assert loose.optimum <= exact * (1 + loose.stats.proved_gap) + 1e-9  # the certificate holds
        assert loose.stats.proved_gap <= 0.2 + 1e-12 and loose.optimum <= exact * 1.2 + 1e-9
        bounded += bool(tight.stats.conditioned_on)
    assert bounded > 10


def test_tables_combined_in_parallel_slices_give_the_same_optimum(monkeypatch) -> None:
    """The threaded path (big tables cut into slices, one per core) is exact, whatever the core count."""
    from pase.search import elimination

    monkeypatch.setattr(elimination, "PARALLEL_ELEMENTS", 1)
    monkeypatch.setattr(elimination, "_workers", lambda: 3)
    rng = np.random.default_rng(23)
    for _ in range(30):
        graph = random_graph(rng)
        assert solve(graph).optimum == pytest.approx(brute_force(graph).optimum, abs=1e-9)


def test_hub_free_messages_are_shared_between_combinations() -> None:
    """Chains that never touch a hub are eliminated once and reused by every hub combination, exactly."""
    rng = np.random.default_rng(17)
    reused = 0
    for _ in range(30):
        base = _hub_graph(rng, hubs=1)
        n = len(base.sizes)
        tail = [int(rng.integers(2, 4)) for _ in range(3)]  # a hub-free chain hanging off the last vertex
        sizes = [*base.sizes, *tail]
        chain = [(v - 1 if v > n else n - 1, v, np.round(rng.random((sizes[v - 1 if v > n else n - 1], sizes[v])), 2))
                 for v in range(n, n + 3)]
        graph = CostGraph("tail", 4, [f"v{i}" for i in range(n + 3)], ["op"] * (n + 3),
                          [[[c] for c in range(k)] for k in sizes],
                          [*base.vertex_costs, *(np.round(rng.random(k), 2) for k in tail)], [*base.edges, *chain])
        exact = brute_force(graph).optimum
        for gap in (0.0, 1e-12):
            found = solve(graph, hub_degree=3, gap=gap)
            assert found.optimum == pytest.approx(exact, abs=1e-9)
            reused += found.stats.messages_reused
    assert reused > 0


def test_messages_on_one_hub_are_shared_by_combinations_that_fix_it_alike() -> None:
    """Two hubs with separate followers: a message that depends on one hub only is reused whenever that hub
    keeps its configuration, and the result stays exact."""
    rng = np.random.default_rng(29)
    shared = 0
    for _ in range(25):
        n = int(rng.integers(7, 10))
        sizes = [int(rng.integers(2, 4)) for _ in range(n)]
        edges = [(0, 1, np.round(rng.random((sizes[0], sizes[1])) * 5, 2))]
        for v in range(2, n):
            hub = v % 2  # followers of hub 0 and of hub 1 never meet
            edges.append((hub, v, np.round(rng.random((sizes[hub], sizes[v])) * 5, 2)))
            if v >= 4:
                edges.append((v - 2, v, np.round(rng.random((sizes[v - 2], sizes[v])) * 5, 2)))
        graph = CostGraph("two hubs", 4, [f"v{i}" for i in range(n)], ["op"] * n,
                          [[[c] for c in range(k)] for k in sizes], [np.round(rng.random(k) * 5, 2) for k in sizes],
                          edges)
        exact = brute_force(graph).optimum
        found = solve(graph, hub_degree=3, gap=1e-12)
        assert found.optimum == pytest.approx(exact, abs=1e-9)
        shared += found.stats.messages_reused
    assert shared > 0


def test_the_gap_bounds_the_cost_from_above() -> None:
    """A hub whose cheap configuration the relaxation cannot see: gap 0.3 may stop early, but never above 1.3x."""
    flip = np.array([[0.0, 5.0], [5.0, 0.0]])
    graph = CostGraph("gap", 1, ["hub", "a", "b"], ["op"] * 3, [[[0], [1]]] * 3,
                      [np.array([1.0, 0.71]), np.zeros(2), np.zeros(2)], [(0, 1, flip), (0, 2, flip)])
    exact = brute_force(graph).optimum
    for gap in (0.3, 0.5, 1e-9):
        found = solve(graph, hub_degree=2, gap=gap)
        assert found.optimum <= exact * (1 + gap) + 1e-12
        assert found.optimum <= exact * (1 + found.stats.proved_gap) + 1e-12


def test_an_incumbent_only_removes_configurations_that_cannot_win() -> None:
    rng = np.random.default_rng(11)
    for _ in range(60):
        graph = random_graph(rng)
        exact = brute_force(graph)
        for incumbent in (exact.optimum, exact.optimum + 1.0, graph.objective([0] * len(graph.sizes))):
            assert solve(graph, incumbent=incumbent).optimum == pytest.approx(exact.optimum, abs=1e-9)


def test_tied_hub_bounds_search_the_likely_winner_first() -> None:
    """A hub with no cost of its own (like the text context) gives every combination the same lower bound;
    the combination whose relaxed assignment already does best is searched first, and once its exact
    optimum is within the gap no other is searched.

    Hub configurations 0 and 1 favour one leaf configuration each, 2 a cheap one for all; the relaxation
    mixes them (bound 41.2), the exact optima are 44, 44 and 42.4, within 5% of the bound only for 2.
    """
    leaf_costs = [np.array([10.0, 11.0]), np.array([11.0, 10.0])] * 2
    hub_edge = np.array([[0.5, 10.0], [10.0, 0.5], [0.1, 5.0]])
    graph = CostGraph("tied hub", 4, ["hub", "a", "b", "c", "d"], ["op"] * 5, [[[0], [1], [2]]] + [[[0], [1]]] * 4,
                      [np.zeros(3), *leaf_costs], [(0, v, hub_edge) for v in range(1, 5)])
    found = solve(graph, hub_degree=3, gap=0.05)
    assert found.stats.conditioned_on == ["hub"]
    assert found.optimum == pytest.approx(brute_force(graph).optimum) == pytest.approx(42.4)
    assert found.stats.hub_combos_solved == 1
    assert found.stats.proved_gap == pytest.approx(42.4 / 41.2 - 1)
