"""Per-layer configuration spaces: which iteration dimensions a layer kind may split, and by how much.

A configuration is one split factor per dimension of a layer. Factors divide the device count
(so configurations map onto a device mesh) and the dimension's extent, and leave at least a
minimum chunk per device; their product is at most p (fewer devices than p leaves the rest as
replicas). Kernel dimensions are never split. Each kind's splittable roles:

- every kind: batch;
- conv: out-channel, in-channel (partial sums), spatial height/width (halo exchange);
- linear / matmul / embedding: out-channel, in-channel / reduction, sequence;
- attention: heads and query sequence;
- group norm: channel (whole groups only), spatial (statistics all-reduce);
- layer norm: sequence, channel (statistics all-reduce);
- elementwise, concat, resampling: the dimensions they carry through.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

SPLITTABLE_ROLES: dict[str, tuple[str, ...]] = {
    "conv": ("batch", "out_channel", "reduction", "spatial"),
    "linear": ("batch", "sequence", "out_channel", "reduction"),
    "matmul": ("batch", "head", "sequence", "out_channel", "reduction"),
    "embedding": ("batch", "sequence", "out_channel"),
    "attention": ("batch", "head", "sequence"),
    "group_norm": ("batch", "channel", "spatial"),
    "batch_norm": ("batch", "spatial"),
    "layer_norm": ("batch", "sequence", "channel"),
    "elementwise": ("batch", "channel", "spatial", "sequence"),
    "concat": ("batch", "channel", "spatial", "sequence"),
    "upsample": ("batch", "channel", "spatial"),
    "downsample": ("batch", "channel", "spatial"),
    "input": ("batch",),
    "other": ("batch",),
}
TENSOR_EXCLUDED = ("spatial", "sequence")  # --only tensor: channel/head splits, the batch split over the other ranks
ONLY_QUERY_SEQUENCE = {"attention": ("q",)}  # splitting kv would need a distributed softmax
# Smallest shard per device, per role: below these a GPU kernel runs far from its peak, so such
# splits are never worth their communication (and they would multiply the search space).
MIN_CHUNK = {"batch": 1, "head": 1, "out_channel": 32, "reduction": 32, "channel": 32, "spatial": 16,
             "sequence": 64, "kernel": 1 << 30, "other": 1 << 30}


@dataclass(frozen=True)
class SplitSpace:
    """All configurations of one layer: ``factors[k, i]`` is configuration k's split of ``dims[i]``."""

    dims: tuple[str, ...]
    factors: np.ndarray  # int64, shape (K, len(dims))

    def __len__(self) -> int:
        return int(self.factors.shape[0])

    def config(self, k: int) -> dict[str, int]:
        return {d: int(f) for d, f in zip(self.dims, self.factors[k]) if f > 1}

    def index_of(self, splits: dict[str, int]) -> int | None:
        """The configuration with exactly ``splits`` (None when absent, a split of a dimension this space
        never splits included)."""
        if any(int(f) > 1 and d not in self.dims for d, f in splits.items()):
            return None
        target = np.array([splits.get(d, 1) for d in self.dims])
        hits = np.flatnonzero((self.factors == target).all(axis=1))
        return int(hits[0]) if hits.size else None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_space(layer: Mapping[str, Any], devices: int, min_chunk: dict[str, int] | None = None,
                only: str | None = None) -> SplitSpace:
    """The configurations of one LayerGraph node on ``devices`` devices.

    ``min_chunk`` overrides ``MIN_CHUNK`` per role. ``only`` restricts to one kind of
    parallelism: "dp" or "fsdp" (batch only) or "tensor" (channel and head splits with the batch split
    over the other devices; no spatial or sequence split); "pipeline" leaves the per-layer space whole
    (its stages come from the pipeline search).
    Complexity: O(prod of candidate counts) over the splittable dims (at most a few hundred).
    """
    kind = layer["op"]
    roles = SPLITTABLE_ROLES.get(kind, ("batch",))
    dims = layer["dims"]
    allowed_names = ONLY_QUERY_SEQUENCE.get(kind)
    candidates: list[tuple[str, list[int]]] = []
    for name, extent in dims.items():
        role = layer["roles"][name]
        if role not in roles or (allowed_names and role == "sequence" and name not in allowed_names):
            continue
        if only in ("dp", "fsdp") and role != "batch" or only == "tensor" and role in TENSOR_EXCLUDED:
            continue
        chunk = {**MIN_CHUNK, **(min_chunk or {})}.get(role, 1)
        if kind == "group_norm" and role == "channel":
            groups = int(layer.get("attrs", {}).get("groups", extent))
            options = [f for f in divisors(devices) if groups % f == 0 and extent // f >= chunk]
        else:
            options = [f for f in divisors(devices) if extent % f == 0 and extent // f >= chunk]
        if len(options) > 1:
            candidates.append((name, options))
    names = tuple(name for name, _ in candidates)
    rows = [combo for combo in itertools.product(*(opts for _, opts in candidates)) if devices % prod(combo) == 0]
    factors = np.array(rows if rows else [()], dtype=np.int64).reshape(len(rows) or 1, len(names))
    return SplitSpace(names, factors)
