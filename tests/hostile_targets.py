"""Property-based hostile inputs (hypothesis) shared by tests/test_hostile_inputs.py (a few dozen cases per target,
in the default suite) and tools/hostile_inputs.py (thousands, with counts): every case must end in a clean error
(a ``PaseError``: one line on the command line, exit 2) or succeed when the input happens to be valid; any other
exception is a traceback a user would see, and fails the case.

Targets: plan files (mutated from a real plan of unet-tiny on 2 devices, then checked against the model as
``pase train --plan`` does before any process group starts), cost-graph files (``pase search``), calibration
profiles, NVML recordings, safetensors files (``--init``, checkpoints) and command-line options of every command
(values drawn from what people mistype: nan, inf, negatives, huge numbers, text, paths to folders).
"""
from __future__ import annotations

import copy
import gzip
import json
import math
import struct
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from typer.testing import CliRunner

from pase.errors import PaseError

FIXTURES = Path(__file__).parent / "fixtures"
PROFILE = FIXTURES / "calibration" / "cpu_gloo_2.json"
RECORDING = FIXTURES / "nvml" / "a100_pcie_8x_nvlink_pairs.json"

# ------------------------------------------------------------------ values people (or files) get wrong
NUMBERS = st.one_of(st.sampled_from([0, -1, 1, 2, 3, 7, -8, 2**31, 2**63, 10**20, -(10**20)]),
                    st.floats(allow_nan=True, allow_infinity=True), st.integers())
JSON_SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3)), max_leaves=6)


@dataclass
class Tally:
    """Outcomes per target: ``ok`` (valid input, accepted) and ``clean`` (one-line error)."""
    counts: Counter = field(default_factory=Counter)

    def record(self, target: str, outcome: str) -> None:
        self.counts[(target, outcome)] += 1


TALLY = Tally()


def classify(target: str, run: Callable[[], Any]) -> str:
    """Run one case: "ok" or "clean"; any exception other than a PaseError propagates (the case fails)."""
    try:
        run()
    except PaseError:
        TALLY.record(target, "clean")
        return "clean"
    TALLY.record(target, "ok")
    return "ok"


# ------------------------------------------------------------------ JSON documents, mutated
def paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into ``document`` (keys and list indices), the root excluded."""
    found = []
    if isinstance(document, dict):
        items = list(document.items())
    elif isinstance(document, list):
        items = list(enumerate(document[:4])) + ([(len(document) - 1, document[-1])] if len(document) > 4 else [])
    else:
        return found
    for key, value in items:
        found.append((*prefix, key))
        found.extend(paths(value, (*prefix, key)))
    return found


def _parent(document: Any, path: tuple) -> Any:
    for key in path[:-1]:
        document = document[key]
    return document


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> bytes:
    """``base`` (a JSON document) with one to three edits (replace a value, drop a key or item, duplicate an item,
    add a key), serialized; sometimes truncated, gzipped or replaced by bytes that are not JSON."""
    document = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        where = paths(document)
        if not where:
            break
        path = draw(st.sampled_from(where))
        parent = _parent(document, path)
        action = draw(st.sampled_from(["replace", "drop", "duplicate", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif action == "drop":
            del parent[path[-1]]
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
    text = json.dumps(document, allow_nan=True).encode()
    form = draw(st.sampled_from(["json", "json", "json", "truncated", "gzip", "bytes"]))
    if form == "truncated":
        return text[:draw(st.integers(0, max(0, len(text) - 1)))]
    if form == "gzip":
        return gzip.compress(text)[:draw(st.integers(0, len(text) + 40))]
    if form == "bytes":
        return draw(st.binary(max_size=64))
    return text


def _written(data: bytes, suffix: str = ".json") -> Path:
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
        handle.write(data)
    return Path(handle.name)


# ------------------------------------------------------------------ plan files
@cache
def plan_base() -> tuple[dict, Any]:
    """A real plan (unet-tiny, 2 local devices, batch 8, `pase plan --json`) as JSON, and the model's layer graph."""
    from pase.cli import app
    from pase.graph import extract_model

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plan.json"
        result = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--cluster", "local", "--devices", "2",
                                          "--batch", "8", "--profile", str(PROFILE), "--json", str(path)])
        assert result.exit_code == 0, result.output
        base = json.loads(path.read_text())
    return base, extract_model("unet-tiny", 8, use_cache=True)


def plan_case(data: bytes) -> str:
    """Load a plan file and check it against the world (2) and the model, as `pase train --plan` does first."""
    from pase.planning.plan import Plan
    from pase.runtime.checks import check_model, check_world

    _, graph = plan_base()
    path = _written(data)

    def run() -> None:
        plan = Plan.load(path)
        check_world(plan, 2)
        check_model(plan, graph)

    try:
        return classify("plan file", run)
    finally:
        path.unlink()


# ------------------------------------------------------------------ cost graphs
def cost_graph_base() -> dict:
    return {"format": "pase-cost-graph", "version": 1, "name": "tiny", "devices": 2,
            "vertices": [{"id": "a", "op": "conv", "configs": [[1], [2]], "cost": [1.0, 2.0]},
                         {"id": "b", "op": "conv", "configs": [[1], [2]], "cost": [3.0, 1.0]},
                         {"id": "c", "op": "linear", "configs": [[1]], "cost": [0.5]}],
            "edges": [{"src": "a", "dst": "b", "cost": [[0.0, 1.0], [1.0, 0.0]]},
                      {"src": "b", "dst": "c", "cost": [[0.0], [0.25]]}]}


def cost_graph_case(data: bytes) -> str:
    """Load a cost graph and solve it, as `pase search --cost-graph` does."""
    from pase.search import CostGraph, solve

    path = _written(data, ".json.gz" if data[:2] == b"\x1f\x8b" else ".json")
    try:
        return classify("cost graph", lambda: solve(CostGraph.load(path)))
    finally:
        path.unlink()


# ------------------------------------------------------------------ calibration profiles, NVML recordings
def profile_case(data: bytes) -> str:
    """Load a profile and price a local plan's rates with it (`pase plan --profile`)."""
    from cost_models.calibrate import load_profile
    from cost_models.local import cpu_cluster
    from cost_models.rates import HardwareRates

    path = _written(data)

    def run() -> None:
        profile = load_profile(path)
        rates = HardwareRates(cpu_cluster(2, profile), profile, "fp32")
        for kind in ("conv", "linear", "attention"):
            rates.compute(kind)
        rates.memory()
        rates.collective("all_reduce", [0, 1])

    try:
        return classify("calibration profile", run)
    finally:
        path.unlink()


def recording_case(data: bytes) -> str:
    """Replay an NVML recording through the probe (`pase hw probe --replay`)."""
    from cost_models.nvml_replay import ReplayNVML
    from cost_models.probe import probe

    path = _written(data)
    try:
        return classify("NVML recording", lambda: probe(ReplayNVML.from_file(path)))
    finally:
        path.unlink()


# ------------------------------------------------------------------ safetensors
DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "Q4", "", "f32"])


@st.composite
def safetensors_bytes(draw: st.DrawFn) -> bytes:
    """A safetensors-like file: an 8-byte header length (right or not), a JSON header of tensors with drawn
    dtypes, shapes and offsets (consistent or not), and data bytes."""
    header: dict[str, Any] = {}
    offset = 0
    for index in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(st.one_of(st.integers(0, 4), st.sampled_from([-1, 2**40])), max_size=3))
        size = draw(st.one_of(st.just(4 * math.prod(max(d, 0) for d in shape) if shape else 4),
                              st.integers(0, 64)))
        start = draw(st.one_of(st.just(offset), st.integers(-4, 80)))
        header[f"t{index}"] = {"dtype": draw(DTYPES), "shape": shape, "data_offsets": [start, start + size]}
        offset = start + size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5),
                                                                max_size=2), JSON_VALUES))
    if draw(st.booleans()):
        header = draw(JSON_VALUES)  # type: ignore[assignment]
    text = json.dumps(header).encode()
    length = draw(st.one_of(st.just(len(text)), st.integers(0, 2**64 - 1)))
    data = draw(st.binary(min_size=0, max_size=max(0, min(offset, 256)) + 8))
    return struct.pack("<Q", length) + text + data


def safetensors_case(data: bytes) -> str:
    """Read every tensor of the file (`--init`, checkpoints, TuneQDM scales)."""
    from pase.weights import read_safetensors

    path = _written(data, ".safetensors")

    def run() -> None:
        _, tensors = read_safetensors(path)
        for _name, _tensor in tensors:
            pass

    try:
        return classify("safetensors file", run)
    finally:
        path.unlink()


# ------------------------------------------------------------------ command-line options
BAD_NUMBERS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "-0.5", "1e400", "99999999999999999999", "abc", "",
                               "1,2", "0x10", "½", "NaN", "--"])
BAD_TEXT = st.one_of(st.sampled_from(["", " ", "../..", "/", "nan", "∞", "a" * 300, "x:y:z", "-", "--help-me",
                                      "~nosuchuser/x", "x\x00y", "/dev/null", "/etc", "pkg.mod:factory"]),
                     st.text(max_size=20))
# (command, option, kind): options whose bad values must be refused before any work starts
OPTIONS = [
    ("train", "--steps", "count"), ("train", "--batch", "count"), ("train", "--lr", "real"),
    ("train", "--weight-decay", "real"), ("train", "--ema", "real"), ("train", "--image-size", "count"),
    ("train", "--seed", "count"), ("train", "--grad-accum", "count"), ("train", "--lr-warmup-steps", "count"),
    ("train", "--max-grad-norm", "real"), ("train", "--snr-gamma", "real"), ("train", "--noise-offset", "real"),
    ("train", "--workers", "count"), ("train", "--validation-every", "count"), ("train", "--data-count", "count"),
    ("train", "--lr-scheduler", "text"), ("train", "--prediction-type", "text"), ("train", "--report-to", "text"),
    ("train", "--precision", "text"), ("train", "--loss-scale", "real"),
    ("train", "--model", "text"), ("train", "--data", "text"),
    ("finetune", "--strategy", "text"), ("finetune", "--merge-weights", "text"), ("finetune", "--bits", "count"),
    ("finetune", "--ranges", "count"), ("finetune", "--p-global", "real"), ("finetune", "--merge-grid", "text"),
    ("finetune", "--experts", "count"), ("finetune", "--consistency", "real"),
    ("sample", "--steps", "count"), ("sample", "--tol", "real"), ("sample", "--window", "count"),
    ("sample", "--samples", "count"), ("sample", "--size", "count"), ("sample", "--guidance-scale", "real"),
    ("sample", "--blocks", "count"), ("sample", "--sampler", "text"), ("sample", "--scheduler", "text"),
    ("sample", "--threads", "count"), ("sample", "--seed", "count"),
    ("sample-plan", "--margin", "real"), ("sample-plan", "--devices", "count"), ("sample-plan", "--steps", "count"),
    ("sample-plan", "--samples", "count"), ("sample-plan", "--objective", "text"), ("sample-plan", "--tol", "real"),
    ("plan", "--batch", "count"), ("plan", "--devices", "count"), ("plan", "--memory-fraction", "real"),
    ("plan", "--gap", "real"), ("plan", "--only", "text"), ("plan", "--space", "text"), ("plan", "--force", "text"),
    ("plan", "--min-chunk", "text"),
    ("plan", "--cluster", "text"), ("plan", "--precision", "text"), ("plan", "--max-stages", "count"),
    ("plan", "--schedule", "text"), ("plan", "--input-shape", "text"), ("plan", "--model", "text"),
    ("whatif", "--batch", "count"), ("whatif", "--samples", "real"), ("whatif", "--memory-fraction", "real"),
    ("whatif", "--clusters", "text"), ("whatif", "--gpu", "text"), ("whatif", "--price", "text"),
    ("whatif", "--interconnect", "text"), ("graph", "--batch", "count"), ("graph", "--capture", "text"),
    ("graph", "--dtype", "text"), ("verify", "--steps", "count"), ("verify", "--warmup", "count"),
    ("hw show", "--precision", "text"), ("hw calibrate", "--sizes", "text"), ("hw calibrate", "--nproc", "count"),
    ("hw calibrate", "--backend", "text"), ("cache", "--batch", "count"),
]
# What comes before the fuzzed option: small settings, and one input that is refused right after option parsing (a
# missing data folder, an unknown model or cluster), so that a value the pools hold that happens to be valid for
# its option ends in that one-line error instead of starting minutes of work.
NOWHERE = "/nonexistent/pase-fuzz"
BASE = {"train": ["--steps", "1", "--batch", "2", "--image-size", "8", "--data", NOWHERE],
        "finetune": ["--steps", "1", "--batch", "2", "--image-size", "8", "--data", NOWHERE],
        "sample": ["--steps", "2", "--size", "8", "--model", "nosuch-model"],
        "sample-plan": ["--model", "nosuch-model"],
        "plan": ["--model", "unet-tiny", "--cluster", "nosuchgpu-spec"], "whatif": ["--model", "nosuch-model"],
        "graph": ["--model", "nosuch-model"], "verify": ["--plan", "/nonexistent/plan.json"],
        "hw show": ["NOSUCH-GPU"], "hw calibrate": ["--model", "/nonexistent/graph.json"],
        "cache": ["--model", "unet-tiny", "--data", "/nonexistent", "--out", "/nonexistent/out"]}


@st.composite
def cli_case(draw: st.DrawFn) -> list[str]:
    command, option, kind = draw(st.sampled_from(OPTIONS))
    value = draw(BAD_NUMBERS if kind in ("count", "real") else BAD_TEXT)
    return [*command.split(), *BASE[command], option, value]


def run_cli(args: list[str]) -> str:
    """The command in-process: a usage error (exit 2, typer) or a PaseError is clean; 0 is ok (a command that
    finished, e.g. a fuzzed value that is valid where the command fails later on purpose is still a PaseError);
    anything else is a traceback and fails the case."""
    from pase.cli import app

    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, (PaseError, SystemExit)):
        raise AssertionError(f"pase {' '.join(args)!r} raised {type(result.exception).__name__}: "
                             f"{result.exception}") from result.exception
    outcome = "ok" if result.exit_code == 0 else "clean"
    if outcome == "clean" and result.exit_code not in (1, 2):
        raise AssertionError(f"pase {' '.join(args)!r} exited {result.exit_code}")
    TALLY.record("command line", outcome)
    return outcome


__all__ = ["TALLY", "cli_case", "cost_graph_base", "cost_graph_case", "mutated", "plan_base", "plan_case",
           "profile_case", "recording_case", "run_cli", "safetensors_bytes", "safetensors_case"]
