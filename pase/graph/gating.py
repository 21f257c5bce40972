"""Gated projections: a conv or linear whose output channels a fused chunk-and-multiply halves (GEGLU).

The layer graph fuses ``h, g = proj(x).chunk(2, dim=-1); h * gelu(g)`` into the projection's layer, whose
anchor computes 2F channels (``c_out``) and whose output holds F (a dimension no operand has). Pricing and
the runtime must both know which is which: the partial sums of an in-split are the 2F channels, and an
out-split with interleaved rows splits the F output channels with them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def gated_dims(layer: Mapping[str, Any]) -> tuple[str, str] | None:
    """(projection channels, output channels) of a gated projection, or None: a conv or linear whose 2F output
    channels a fused ``chunk(2)`` and product turn into F (GEGLU: ``h, g = proj(x).chunk(2); h * gelu(g)``).
    Split ``t`` ways with interleaved rows (each rank holds its part of both halves), the projection's
    channels and the output's split together, so the output dimension takes the projection's factor."""
    if layer["op"] not in ("conv", "linear"):
        return None
    out_map = layer["tensors"]["output"]
    operand_dims = {d for m in layer["tensors"]["operands"] for d in (m or []) if d}
    regrouped = [d for d, r in layer["roles"].items() if r == "out_channel" and d not in out_map]
    derived = [d for d in out_map if d and d not in operand_dims]
    if len(regrouped) != 1 or len(derived) != 1:
        return None
    (projected,), (output,) = regrouped, derived
    return (projected, output) if layer["dims"][projected] == 2 * layer["dims"][output] else None


__all__ = ["gated_dims"]
