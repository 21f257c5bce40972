"""Exact search over per-layer parallel configurations: cost graphs and variable elimination."""
from pase.search.cost_graph import CostGraph, CostGraphError
from pase.search.elimination import Solution, brute_force, solve

__all__ = ["CostGraph", "CostGraphError", "Solution", "brute_force", "solve"]
