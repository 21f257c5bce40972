"""On-disk cache of zoo-model LayerGraphs, so repeated plans skip the capture (about 1 s for SD-1.5, plus imports).

Keyed by everything the graph depends on: the zoo entry and its config, batch, dtype, capture
method (for "auto": the front ends it tries, in order), input-shape overrides, and the versions
of torch, diffusers, pase and the graph schema. Only zoo models are cached (a user's factory may
change without its name changing). Entries are written atomically; a corrupt or stale entry is simply captured again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pase._version import __version__
from pase.graph.capture import CAPTURE_METHODS
from pase.graph.layer_graph import SCHEMA_VERSION, LayerGraph

# bumped when captured graphs gain a field that pricing reads (2: which edges and inputs carry gradients), so
# entries written before it are captured again instead of priced without it
CACHE_REVISION = 2


def cache_dir() -> Path:
    base = os.environ.get("PASE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pase")
    return Path(base) / "graphs"


def cache_key(name: str, config: dict[str, Any], batch: int | str | None, dtype: torch.dtype, method: str,
              input_shapes: dict[str, tuple[int | str, ...]] | None) -> str:
    versions = {pkg: _version(pkg) for pkg in ("torch", "diffusers")}
    # "auto" names the front ends it tries, in order: a new first choice must not read an old one's entries
    method = "auto:" + ",".join(CAPTURE_METHODS) if method == "auto" else method
    material = json.dumps({"model": name, "config": config, "batch": batch, "dtype": str(dtype), "method": method,
                           "inputs": {k: list(v) for k, v in (input_shapes or {}).items()}, "versions": versions,
                           "pase": __version__, "schema": SCHEMA_VERSION, "revision": CACHE_REVISION},
                          sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def load(key: str) -> LayerGraph | None:
    path = cache_dir() / f"{key}.json"
    if not path.exists():
        return None
    try:
        graph = LayerGraph.from_json(path)
    except (ValueError, KeyError, OSError):
        return None
    graph.meta["cached"] = str(path)
    return graph


def store(key: str, graph: LayerGraph) -> None:
    with contextlib.suppress(OSError):  # a read-only home must not break planning; the next run captures again
        graph.to_json(cache_dir() / f"{key}.json")
