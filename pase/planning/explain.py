"""Explain a plan: the cheapest alternatives for one layer, every other layer kept as planned."""
from __future__ import annotations

from typing import Any

import numpy as np

from pase.errors import PaseError
from pase.graph import LayerGraph
from pase.planning.per_layer import PricedGraph
from pase.planning.plan import Plan


def explain(graph: LayerGraph, plan: Plan, priced: PricedGraph, layer_id: str, top: int = 5) -> list[dict[str, Any]]:
    """The cheapest alternatives for one layer with every other layer kept as planned."""
    if layer_id not in priced.ids:
        close = [i for i in priced.ids if layer_id in i][:5]
        raise PaseError(f"no layer {layer_id!r} in this model" + (f"; did you mean {', '.join(close)}?" if close
                                                                   else "; see `pase graph --layers`"))
    v = priced.ids.index(layer_id)
    chosen = [priced.spaces[i].index_of(layer.splits) for i, layer in enumerate(plan.layers)]
    price = float(plan.search.memory_price or 0.0)  # memory was priced when the limit was binding
    total = priced.compute[v] + priced.comm[v] + price * priced.memory[v]
    for s, d, m in priced.edges:
        if s == v:
            total = total + m[:, chosen[d]]
        elif d == v:
            total = total + m[chosen[s], :]
    order = np.argsort(total)[:top]
    base = float(total[chosen[v]])
    return [{"splits": priced.spaces[v].config(int(k)) or {"replicated": 1}, "seconds": float(total[k]),
             "delta_seconds": float(total[k]) - base, "memory_bytes": float(priced.memory[v][k]),
             "chosen": int(k) == chosen[v]} for k in order]


__all__ = ["explain"]
