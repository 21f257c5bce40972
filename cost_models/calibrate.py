"""``pase hw calibrate``: measure what this machine achieves, and save it as a calibration profile.

Collectives (all-reduce, all-gather, reduce-scatter, send/recv) are swept over message sizes and
group sizes (2, 4, ... up to the world) with torch.distributed — NCCL on GPUs, gloo on CPU — and
reported as nccl-tests does (algbw = bytes / time; busbw = algbw x 2(n-1)/n for all-reduce,
x (n-1)/n for all-gather and reduce-scatter, x 1 for send/recv), then fitted to latency +
bytes / bandwidth. Compute is
timed on the layer kinds and shapes of a LayerGraph (forward + backward; CUDA events on GPU,
``perf_counter`` on CPU) and reported as achieved FLOP/s per op kind; norm/elementwise kinds
as achieved bytes/s. The profile is JSON keyed by a hardware fingerprint.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import Progress
from torch.multiprocessing.spawn import ProcessException

from cost_models.conventions import BUS_FACTOR
from pase import atomic
from pase.errors import PaseError
from pase.graph import LayerGraph, extract_model
from pase.process_group import Launch, free_port, pick_backend, process_group, spawn
from pase.schema import read_json, schema_error

PROFILE_FORMAT = "pase-calibration"
COMPUTE_KINDS = ("conv", "linear", "matmul", "attention")
MEMORY_KINDS = ("group_norm", "layer_norm", "elementwise", "upsample")


@dataclass
class CalibrationConfig:
    nproc: int = 2
    backend: str | None = None  # None: nccl when CUDA is available, else gloo
    sizes: list[int] = field(default_factory=list)  # message bytes; empty: a default sweep per backend
    iterations: int = 5
    warmup: int = 2
    model: str = "unet-tiny"  # the LayerGraph whose layer kinds and shapes are timed
    batch: int = 2
    layers_per_kind: int = 3
    precision: str = "fp32"  # fp32 on CPU; bf16 is what GPU training uses
    timeout_s: float = 600.0

    def resolved_backend(self) -> str:
        return self.backend or pick_backend()

    def resolved_sizes(self) -> list[int]:
        if self.sizes:
            return sorted(self.sizes)
        top = 30 if self.resolved_backend() == "nccl" else 24  # 1 GiB on GPUs, 16 MiB on CPU
        return [2 ** k for k in range(12, top + 1, 2)]


# ---------------------------------------------------------------------- fingerprint

def hardware_fingerprint(backend: str, world_size: int) -> dict[str, Any]:
    """What the measurements depend on: device models and count, driver, CPU model, host."""
    info: dict[str, Any] = {"backend": backend, "world_size": world_size, "host": socket.gethostname(),
                            "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "torch": torch.__version__}
    if backend == "nccl" and torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(min(world_size, torch.cuda.device_count()))]
        info["cuda"] = torch.version.cuda
    else:
        info["devices"] = ["cpu"] * world_size
    key = json.dumps({k: v for k, v in info.items() if k != "host"}, sort_keys=True)
    info["id"] = hashlib.sha256(key.encode()).hexdigest()[:12]
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_profile_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pase" / "calibration"


# ---------------------------------------------------------------------- driver

def run_calibration(config: CalibrationConfig, progress: bool = True) -> dict[str, Any]:
    """Spawn ``config.nproc`` workers, measure, and return the profile (rank 0's merged view)."""
    if config.nproc < 1:
        raise PaseError("--nproc must be 1 or more (1 measures compute and memory only, no collectives)")
    backend = config.resolved_backend()
    if backend == "nccl" and torch.cuda.device_count() < config.nproc:
        raise PaseError(f"--nproc {config.nproc} needs {config.nproc} GPUs for NCCL, but CUDA sees "
                        f"{torch.cuda.device_count()}; lower --nproc or use --backend gloo")
    graph = _layer_graph_for(config)
    with tempfile.TemporaryDirectory(prefix="pase-calibrate-") as tmp:
        out = Path(tmp) / "profile.json"
        try:
            spawn(_worker, (config.nproc, backend, free_port(), config, graph, str(out), progress), config.nproc,
                  config.timeout_s)
        except TimeoutError as exc:
            raise PaseError(f"calibration did not finish within {config.timeout_s:.0f} s; "
                            "try fewer --sizes or --iterations") from exc
        except ProcessException as exc:
            raise PaseError(f"a calibration worker failed: {str(exc).strip().splitlines()[-1]}") from exc
        return json.loads(out.read_text())


def _layer_graph_for(config: CalibrationConfig) -> dict[str, Any]:
    path = Path(config.model)
    if path.suffix != ".json":
        return sample_layers(extract_model(config.model, config.batch), config.layers_per_kind)
    fix = "write one with `pase graph --model MODEL --json FILE`"
    data = read_json(path, "layer graph", fix)
    try:
        graph = LayerGraph.from_dict(data)
        return sample_layers(graph, config.layers_per_kind)
    except (ValueError, KeyError, TypeError, AttributeError, nx.NetworkXError) as exc:
        raise PaseError(f"layer graph {path} is not one pase wrote ({type(exc).__name__}: {str(exc)[:200]}); "
                        f"{fix}") from None


def sample_layers(graph: Any, per_kind: int) -> dict[str, Any]:
    """The distinct layer shapes to time: the ``per_kind`` largest (by FLOPs or elements) of each kind."""
    chosen: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[str, str]] = set()
    def size(item: tuple[str, dict[str, Any]]) -> int:
        return -(item[1]["flops_fwd"] or item[1]["pointwise_elems"])

    for layer_id, data in sorted(graph.layers(), key=size):
        kind = data["op"]
        if kind not in COMPUTE_KINDS + MEMORY_KINDS:
            continue
        key = (kind, json.dumps(data["dims"], sort_keys=True) + json.dumps(data.get("attrs", {}), sort_keys=True))
        if key in seen or len(chosen.get(kind, [])) >= per_kind:
            continue
        seen.add(key)
        chosen.setdefault(kind, []).append({"layer": layer_id, "dims": data["dims"], "attrs": data.get("attrs", {}),
                                            "params": data.get("params", {})})
    return {"model": graph.meta.get("model"), "batch": graph.batch, "layers": chosen}


def _worker(rank: int, world: int, backend: str, port: int, config: CalibrationConfig, graph: dict[str, Any],
            out: str, progress: bool) -> None:
    torch.set_num_threads(1)
    with process_group(Launch.local(rank, world, port), backend, timeout_s=config.timeout_s) as device:
        sizes = config.resolved_sizes()
        groups = group_sizes(world)
        measured_ops = [(g, op) for g in groups for op in BUS_FACTOR if op != "send_recv" or g == 2]
        steps = len(measured_ops) * len(sizes) + sum(len(v) for v in graph["layers"].values()) + 1
        bar = _Progress(steps, enabled=progress and rank == 0)
        collectives: dict[str, dict[str, Any]] = {op: {} for op in BUS_FACTOR}
        for size in groups:  # every rank creates every group; ranks outside one wait at the barrier
            group = dist.new_group(list(range(size))) if size < world else None
            if rank < size:
                for g, op in measured_ops:
                    if g == size:
                        collectives[op][str(size)] = measure_collective(op, sizes, device, config, bar, group, size)
            dist.barrier()
        compute = measure_compute(graph, device, config, bar)
        memory = measure_memory_bandwidth(device, config)
        bar.advance("memory bandwidth")
        bar.close()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"compute": compute, "memory": memory})
        if rank == 0:
            profile = _assemble(config, backend, world, collectives, gathered)
            Path(out).write_text(json.dumps(profile))


class _Progress:
    """A rich progress bar on rank 0 only (other ranks stay silent)."""
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            self.bar = Progress(transient=True)
            self.task = self.bar.add_task("calibrating", total=total)
            self.bar.start()

    def advance(self, what: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"calibrating: {what}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------- collectives

def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: Any = None) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp, group=group)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: Any = None) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, inp, group=group)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def group_sizes(world: int) -> list[int]:
    """Group sizes to measure: powers of two up to the world, and the world itself (e.g. 2, 4, 6); none for
    one process, which has no collective to time (a one-GPU machine still calibrates compute and memory)."""
    if world < 2:
        return []
    return sorted({2 ** k for k in range(1, world.bit_length()) if 2 ** k <= world} | {world})


def _collective_call(op: str, data: torch.Tensor, chunk: torch.Tensor, rank: int,
                     group: Any = None) -> Callable[[], None]:
    """One call of ``op`` on ``data`` (the full buffer) and ``chunk`` (one rank's share) within ``group``."""
    def call() -> None:
        if op == "all_reduce":
            dist.all_reduce(data, group=group)
        elif op == "all_gather":
            _all_gather(data, chunk, group)
        elif op == "reduce_scatter":
            _reduce_scatter(chunk, data, group)
        elif rank == 0:  # send/recv ping-pong between ranks 0 and 1: one-way time is half the round trip
            dist.send(data, 1)
            dist.recv(data, 1)
        elif rank == 1:
            dist.recv(data, 0)
            dist.send(data, 0)

    return call


def measure_collective(op: str, sizes: list[int], device: torch.device, config: CalibrationConfig,
                       bar: _Progress, group: Any = None, world: int | None = None) -> dict[str, Any]:
    """Time ``op`` at each size within ``group`` (ranks 0..world-1); seconds per call is the slowest
    rank's mean, as nccl-tests reports."""
    world, rank = world or dist.get_world_size(), dist.get_rank()
    points = []
    for size in sizes:
        elements = max(world, size // 4 // world * world)  # fp32, divisible by the group size
        nbytes = elements * 4
        call = _collective_call(op, torch.ones(elements, device=device),
                                torch.empty(elements // world, device=device), rank, group)
        for _ in range(config.warmup):
            call()
        _sync(device)
        dist.barrier(group=group)
        started = time.perf_counter()
        for _ in range(config.iterations):
            call()
        _sync(device)
        seconds = (time.perf_counter() - started) / config.iterations
        if op == "send_recv":
            seconds /= 2
        slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        seconds = float(slowest.item())
        algbw = nbytes / seconds / 1e9
        points.append({"bytes": nbytes, "seconds": seconds, "algbw_gbps": algbw,
                       "busbw_gbps": algbw * BUS_FACTOR[op](world)})
        bar.advance(f"{op} {nbytes / 2**20:.2f} MiB")
    return {"group_size": world, "points": points, **fit_alpha_beta(points, BUS_FACTOR[op](world))}


def fit_alpha_beta(points: list[dict[str, Any]], bus_factor: float) -> dict[str, float]:
    """Least-squares ``seconds = alpha + bytes / algbw``; a noisy negative fit falls back to the best point."""
    sizes = np.array([p["bytes"] for p in points], dtype=float)
    seconds = np.array([p["seconds"] for p in points], dtype=float)
    (alpha, slope), *_ = np.linalg.lstsq(np.stack([np.ones_like(sizes), sizes], axis=1), seconds, rcond=None)
    best = max(p["algbw_gbps"] for p in points)
    algbw = 1 / slope / 1e9 if slope > 0 else best
    alpha = alpha if alpha > 0 else min(seconds)
    return {"alpha_us": float(alpha * 1e6), "algbw_gbps": float(algbw), "busbw_gbps": float(algbw * bus_factor),
            "peak_busbw_gbps": float(max(p["busbw_gbps"] for p in points))}


# ---------------------------------------------------------------------- compute

def _dtype(config: CalibrationConfig, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]


def build_layer_op(kind: str, dims: dict[str, int], attrs: dict[str, Any], device: torch.device,
                   dtype: torch.dtype) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor], int, int]:
    """A runnable stand-in for one layer: (forward, leaf tensors, fwd+bwd FLOPs, bytes moved)."""
    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    n = dims.get("n", 1)
    if kind == "conv":
        stride = attrs.get("stride", 1)
        stride = stride[0] if isinstance(stride, (list, tuple)) else int(stride)
        kh, kw = dims.get("kh", 1), dims.get("kw", 1)
        x = leaf(n, dims["c_in"], dims["h"] * stride, dims["w"] * stride)
        weight = leaf(dims["c_out"], dims["c_in"], kh, kw)
        flops = 2 * n * dims["c_out"] * dims["h"] * dims["w"] * dims["c_in"] * kh * kw
        return (lambda: F.conv2d(x, weight, stride=stride, padding=(kh // 2, kw // 2))), [x, weight], 3 * flops, 0
    if kind == "linear":
        # rows only: channel dims, including a second output dim of a chunked projection (GEGLU's c_out_N), are not
        lead = [d for name, d in dims.items() if not name.startswith("c_")]
        x, weight = leaf(*lead, dims["c_in"]), leaf(dims["c_out"], dims["c_in"])
        flops = 2 * int(np.prod(lead)) * dims["c_out"] * dims["c_in"]
        return (lambda: F.linear(x, weight)), [x, weight], 3 * flops, 0
    if kind in ("matmul", "attention"):
        heads = dims.get("heads", 1)
        sq, skv, d = dims.get("q", dims.get("m", 1)), dims.get("kv", dims.get("o", 1)), dims.get("d", dims.get("k", 1))
        q, k, v = leaf(n, heads, sq, d), leaf(n, heads, skv, d), leaf(n, heads, skv, d)
        if kind == "matmul":
            flops = 2 * n * heads * sq * skv * d
            return (lambda: torch.matmul(q, k.transpose(-1, -2))), [q, k], 3 * flops, 0
        flops = 4 * n * heads * sq * skv * d
        return (lambda: F.scaled_dot_product_attention(q, k, v)), [q, k, v], 3 * flops, 0
    shape = list(dims.values())
    if kind == "upsample" and len(shape) == 4:  # dims are the output's: the input is half as tall and wide
        x = leaf(shape[0], shape[1], max(1, shape[2] // 2), max(1, shape[3] // 2))
        moved = 3 * (x.numel() + 4 * x.numel()) * x.element_size()
        return (lambda: F.interpolate(x, scale_factor=2.0, mode="nearest")), [x], 0, moved
    x = leaf(*shape)
    groups = int(attrs.get("groups", 1)) if kind == "group_norm" else 1
    if kind == "group_norm" and len(shape) >= 2 and shape[1] % groups == 0:
        fn = lambda: F.group_norm(x, groups)  # noqa: E731
    elif kind == "layer_norm":
        fn = lambda: F.layer_norm(x, shape[-1:])  # noqa: E731
    else:
        fn = lambda: F.silu(x)  # noqa: E731
    return fn, [x], 0, 3 * x.numel() * x.element_size() * 2  # fwd read+write, bwd about twice


def measure_compute(graph: dict[str, Any], device: torch.device, config: CalibrationConfig,
                    bar: _Progress) -> dict[str, Any]:
    """Achieved FLOP/s (compute kinds) and bytes/s (memory-bound kinds) for forward + backward."""
    dtype = _dtype(config, device)
    results: dict[str, Any] = {}
    for kind, layers in graph["layers"].items():
        samples = []
        for layer in layers:
            forward, leaves, flops, nbytes = build_layer_op(kind, layer["dims"], layer["attrs"], device, dtype)
            seconds = _time_step(forward, leaves, device, config)
            samples.append({"layer": layer["layer"], "seconds": seconds, "flops": flops, "bytes": nbytes})
            bar.advance(f"{kind} {layer['layer']}")
        total_time = sum(s["seconds"] for s in samples)
        entry: dict[str, Any] = {"samples": samples}
        if kind in COMPUTE_KINDS:
            entry["flops_per_second"] = sum(s["flops"] for s in samples) / total_time
        else:
            entry["bytes_per_second"] = sum(s["bytes"] for s in samples) / total_time
        results[kind] = entry
    return results


def _time_step(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], device: torch.device,
               config: CalibrationConfig) -> float:
    def step() -> None:
        out = forward()
        out.backward(torch.ones_like(out))
        for tensor in leaves:
            tensor.grad = None

    for _ in range(config.warmup):
        step()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(config.iterations):
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(config.iterations):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_memory_bandwidth(device: torch.device, config: CalibrationConfig) -> dict[str, float]:
    """A device-to-device copy: bytes read + written per second."""
    elements = (256 if device.type == "cuda" else 16) * 2**20 // 4
    src = torch.ones(elements, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(config.warmup + config.iterations):
        _sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= config.warmup:
            times.append(time.perf_counter() - started)
    return {"bytes_per_second": 2 * src.numel() * src.element_size() / statistics.median(times)}


def _assemble(config: CalibrationConfig, backend: str, world: int, collectives: dict[str, Any],
              per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Collectives as measured; compute and memory as the median over ranks (all ran at once)."""
    compute: dict[str, Any] = {}
    for kind, entry in per_rank[0]["compute"].items():
        merged = dict(entry)
        for key in ("flops_per_second", "bytes_per_second"):
            if key in entry:
                merged[key] = statistics.median(r["compute"][kind][key] for r in per_rank)
        compute[kind] = merged
    memory = statistics.median(r["memory"]["bytes_per_second"] for r in per_rank)
    return {
        "format": PROFILE_FORMAT, "version": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": hardware_fingerprint(backend, world), "backend": backend, "world_size": world,
        "device": "cuda" if backend == "nccl" else "cpu", "precision": config.precision,
        "config": {k: v for k, v in asdict(config).items() if k != "timeout_s"},
        "layer_graph": {"model": config.model, "batch": config.batch},
        "collectives": collectives, "compute": compute, "memory_bandwidth": {"bytes_per_second": memory},
    }


def save_profile(profile: dict[str, Any], path: str | Path | None = None) -> Path:
    """Write atomically to ``path`` or to the per-user cache under the fingerprint id."""
    target = Path(path) if path else default_profile_dir() / f"{profile['fingerprint']['id']}.json"
    return atomic.write_text(target, json.dumps(profile, indent=1))


_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_RATE = {"type": "object", "properties": {"flops_per_second": _POSITIVE, "bytes_per_second": _POSITIVE}}
# What pricing, `pase hw show` and `--update-profile` read from a profile: declared once, checked on load.
PROFILE_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "created", "fingerprint", "backend", "world_size", "device", "collectives", "compute",
                 "memory_bandwidth", "layer_graph"],
    "properties": {
        "format": {"const": PROFILE_FORMAT},
        "created": {"type": "string"},
        "fingerprint": {"type": "object", "required": ["id"], "properties": {
            "id": {"type": "string"}, "devices": {"type": "array", "items": {"type": "string"}}}},
        "backend": {"type": "string"},
        "world_size": {"type": "integer", "minimum": 1},
        "device": {"type": "string"},
        "collectives": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["alpha_us", "busbw_gbps"],
            "properties": {"alpha_us": {"type": "number", "minimum": 0}, "busbw_gbps": _POSITIVE}}}},
        "compute": {"type": "object", "additionalProperties": _RATE},
        "memory_bandwidth": {"type": "object", "required": ["bytes_per_second"],
                             "properties": {"bytes_per_second": _POSITIVE}},
        "layer_graph": {"type": "object", "required": ["model"], "properties": {"model": {"type": "string"}}},
        "verify": {"type": "array"},
    },
}


def load_profile(path: str | Path) -> dict[str, Any]:
    """The calibration profile in ``path``, checked against ``PROFILE_JSON_SCHEMA``; one ``PaseError`` line naming
    the file and the first field that is wrong otherwise."""
    fix = "write one with `pase hw calibrate --out FILE`"
    data = read_json(path, "calibration profile", fix)
    problem = schema_error(data, PROFILE_JSON_SCHEMA)
    if problem is not None:
        raise PaseError(f"calibration profile {path}: {problem[:300]}; {fix}")
    return data
