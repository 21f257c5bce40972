"""``pase sample-plan``: predicted latency and throughput of each sampler, and the pick.

The cost of a sampler is the sum over its sequential passes of (time of one network call on the
rows a device holds) + (all-gather of the pass's outputs), plus the per-pass update arithmetic.
Three inputs, each carrying a ``source`` so the report says what was measured and what assumed:

- ``EvalTime``: seconds of one call as a function of the batch on one device. For a GPU cluster
  spec, a roofline over the LayerGraph's layers (FLOPs at the catalog/calibrated rate per op kind,
  bytes at memory bandwidth, plus a launch overhead per layer); for this machine (``--devices N``),
  measured by timing the model at a few batches.
- ``GatherTime``: alpha + bytes x (n-1)/n / bandwidth, from the cluster's topology or a calibration
  profile (``pase hw calibrate``), else a stated gloo default.
- ``Convergence``: ParaDiGMS steps accepted per pass and SRDS iterations, from a short measured
  probe (the real samplers on the seeded model) or stated defaults.

SRDS passes come from a dry run of the real SRDS schedule (zero-size states), so the pipelined and
plain schedules are priced exactly as they run. The pick is the fastest (or highest-throughput)
candidate; a time-parallel sampler is picked only when predicted faster than the best baseline
(sequential on one device, or batch-parallel) by ``margin``, so it is never picked where it loses.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from cost_models.conventions import bytes_per_element
from cost_models.kernels import (
    KernelModel,
    host_ops_per_step,
    kernels_per_step,
    layer_utilization,
    queued_seconds,
)
from cost_models.layer_costs import COMPUTE_KINDS
from cost_models.rates import HardwareRates
from pase.errors import PaseError
from pase.models.zoo import resolve_model
from pase.sampling.core import build_core, check_steps
from pase.sampling.distributed import Evaluator
from pase.sampling.paradigms import paradigms
from pase.sampling.paradigms_schedule import begins_at_window, begins_from_counts, evenly_spaced, rows_of
from pase.sampling.runner import build_denoiser
from pase.sampling.srds import SrdsPassCounter, srds
from strategies import parallel_sampling

GLOO_DEFAULT = {"alpha_s": 150e-6, "busbw_gbps": 1.0}  # loopback gloo all_gather on a small CPU box (assumed)
CPU_MEMORY_GBPS = 5.0  # update arithmetic on CPU (assumed)
# default steps accepted per pass: 1 + a * (window - 1) ** b, exact at window 1 (sequential); fits 76 passes
# at window 2 (measured: unet-tiny DDPM-100, tol 0.1) and 24 at window 16 (N=100). Above 16 it is capped by the
# earlier, more cautious 1.1 * sqrt(window): nothing was measured there.
PARADIGMS_ADVANCE = (0.316, 0.851)
PARADIGMS_CAP = (1.1, 0.5)  # c * window ** d
SRDS_ITERATIONS = {"ddim": 3, "ddpm": 4}  # default iterations to tolerance (SD-v2 ~3 per the SRDS paper)
PRIORITY = {"sequential": 0, "batch": 1, "paradigms": 2, "srds": 3, "srds-pipelined": 4}


@dataclass
class EvalTime:
    """Seconds of one network call at a batch of rows on one device (piecewise linear in the batch)."""
    batches: list[int]
    seconds: list[float]
    source: str

    def __call__(self, rows: float) -> float:
        if rows <= 0:
            return 0.0
        b, s = np.asarray(self.batches, float), np.asarray(self.seconds, float)
        if rows <= b[-1] or len(b) == 1:
            return float(np.interp(rows, b, s)) if len(b) > 1 else float(s[0] * rows / b[0])
        slope = (s[-1] - s[-2]) / (b[-1] - b[-2])
        return float(s[-1] + slope * (rows - b[-1]))


@dataclass
class GatherTime:
    alpha_s: float
    busbw_gbps: float
    source: str

    def __call__(self, nbytes: float, world: int) -> float:
        if world <= 1:
            return 0.0
        return self.alpha_s + nbytes * (world - 1) / world / (self.busbw_gbps * 1e9)


@dataclass
class DataParallelCall:
    """One call of ``torch.nn.DataParallel`` over the GPUs: the one-process runtime the ParaDiGMS reference code
    samples with (pase's sampler runs a process per device and is priced without it). Every call replicates the
    module tree on the host (``modules`` x replicas x ``replicate_s``) and broadcasts the weights to the replicas;
    scatters the batch in chunks of ceil(batch / devices) (``Tensor.chunk``, so fewer replicas for a small batch);
    runs each replica's forward on its own thread, the threads dispatching operators under one interpreter lock,
    so each operator's host time is paid once per replica (``eval_by_replicas[n]``); and gathers the outputs onto
    the first GPU. The reference code calls the bare network on one GPU when a window holds at most
    ``direct_max_rows`` steps (``net = wrapped_unet if parallel_len > 3 else unet``)."""
    eval_by_replicas: dict[int, EvalTime]  # replicas -> forward seconds per chunk batch, host paid per replica
    modules: int
    replicate_s: float  # host seconds to copy one module for one replica
    weight_bytes: float
    link: GatherTime  # the weights' broadcast: its alpha and bus bandwidth
    direct_max_rows: int = 3

    def seconds(self, rows: int, evals_per_row: int, devices: int, gather: GatherTime, row_bytes: float) -> float:
        """A pass over ``rows`` state rows (``evals_per_row`` network rows each) on ``devices`` GPUs, without
        the update arithmetic."""
        batch = rows * evals_per_row
        if rows <= self.direct_max_rows or devices <= 1:
            return self.eval_by_replicas[1](batch)
        chunk = math.ceil(batch / devices)
        replicas = math.ceil(batch / chunk)
        replicate = replicas * self.modules * self.replicate_s
        broadcast = self.link.alpha_s + self.weight_bytes / (self.link.busbw_gbps * 1e9)
        return replicate + broadcast + self.eval_by_replicas[replicas](chunk) + gather(rows * row_bytes, replicas)


@dataclass
class Convergence:
    """Expected convergence: ParaDiGMS passes per window, SRDS iterations per block count."""
    paradigms_passes: dict[int, int] = field(default_factory=dict)  # measured: window -> passes
    srds_iterations: dict[int, int] = field(default_factory=dict)  # measured: blocks -> iterations
    source: str = (f"stated defaults: ParaDiGMS accepts min(1 + {PARADIGMS_ADVANCE[0]} (window - 1)^"
                   f"{PARADIGMS_ADVANCE[1]}, {PARADIGMS_CAP[0]} window^{PARADIGMS_CAP[1]}) steps per pass; SRDS "
                   f"converges in {SRDS_ITERATIONS['ddim']} (DDIM) / {SRDS_ITERATIONS['ddpm']} (DDPM) iterations")
    paradigms_evaluations: dict[int, int] = field(default_factory=dict)  # measured: window -> evaluations

    def paradigms_rows(self, window: int, steps: int) -> list[int]:
        """Rows of each ParaDiGMS pass at ``window`` (``pase.sampling.paradigms_schedule``): a window measured
        with its evaluations is laid out from its counts; one measured by passes alone as evenly spaced passes
        at its advance; any other from the nearest window measured with evaluations (its tail kept, its body's
        advance carried by the law's shape); else evenly spaced at ``advance``."""
        with_evaluations = [w for w in self.paradigms_evaluations if w in self.paradigms_passes and w > 1]
        if window in with_evaluations:
            begins = begins_from_counts(steps, window, self.paradigms_passes[window],
                                        self.paradigms_evaluations[window])
        elif with_evaluations and window not in self.paradigms_passes:
            nearest = min(with_evaluations, key=lambda w: (abs(math.log(window / w)), w))
            measured = begins_from_counts(steps, nearest, self.paradigms_passes[nearest],
                                          self.paradigms_evaluations[nearest])
            begins = begins_at_window(measured, nearest, window, steps, PARADIGMS_ADVANCE[1])
        else:
            begins = evenly_spaced(max(1.0, self.advance(window, steps)), steps)
        return rows_of(begins, window, steps)

    def advance(self, window: int, steps: int) -> float:
        """Steps accepted per pass at this window, never more than the window (a pass evaluates only ``window``
        steps): measured where given; between measured windows interpolated in log(window); outside them the
        default law's shape, 1 + a (window - 1)^b, scaled through the nearest measured window (so one measured
        window does not make smaller ones accept nearly every step); else the default law."""
        if window in self.paradigms_passes:
            return min(window, steps / self.paradigms_passes[window])
        (a, b), (c, d) = PARADIGMS_ADVANCE, PARADIGMS_CAP
        known = sorted(w for w in self.paradigms_passes if w > 1)
        if not known:
            return min(window, 1.0 + a * (window - 1) ** b, max(1.0, c * window ** d))
        measured = [steps / self.paradigms_passes[w] for w in known]
        if known[0] < window < known[-1]:
            return min(window, float(np.interp(math.log(window), [math.log(w) for w in known], measured)))
        nearest = 0 if window < known[0] else -1
        scale = (measured[nearest] - 1.0) / (known[nearest] - 1) ** b
        return min(float(window), 1.0 + scale * (window - 1) ** b)

    def iterations(self, blocks: int, kind: str) -> int:
        if blocks in self.srds_iterations:
            return self.srds_iterations[blocks]
        return min(blocks, SRDS_ITERATIONS[kind])


@dataclass
class Candidate:
    sampler: str
    setting: str
    devices: int
    passes: int
    evals: float  # network evaluations per sample
    seconds: float  # predicted latency for the request's samples
    samples: int
    window: int | None = None
    blocks: int | None = None

    @property
    def throughput(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class SamplePlan:
    model: str
    scheduler: str
    steps: int
    devices: int
    samples: int
    objective: str
    candidates: list[Candidate]
    chosen: Candidate
    sources: dict[str, str]
    margin: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for item in [data["chosen"], *data["candidates"]]:
            item["throughput"] = item["samples"] / item["seconds"] if item["seconds"] > 0 else None
        return data


# ---------------------------------------------------------------------------------------------- eval time
def roofline_eval_time(graph: Any, rates: Any, precision: str = "bf16",
                       batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
                       stack: str = "eager", host_threads: int = 1) -> EvalTime:
    """Forward time of ``graph`` (captured at batch 1) per batch on one device of ``rates``, with the training
    cost model's kernel physics (``cost_models.kernels``): per layer, max(FLOPs / (rate x wave utilisation at
    that batch), bytes / memory rate) plus the floor of each kernel it launches, every operator its own kernel
    (``KernelModel.for_unfused_forward``); weights are read once per call, activations scale with the batch. On
    an ``eager`` stack (pase's sampler, diffusers' pipelines) the host dispatches every operator and runs ahead
    of the GPU through CUDA's queue (``cost_models.kernels.queued_seconds``); a ``graphed`` one replays from
    CUDA graphs. ``host_threads`` threads dispatching a forward each under one interpreter lock pay that many
    times the host time per operator (``DataParallelCall``). O(layers * batches)."""
    scale = bytes_per_element(precision) / 4  # the graph was captured in fp32
    memory_rate = rates.memory().value
    gpu = rates.cluster.gpu
    kernels = KernelModel.for_unfused_forward(gpu, stack)
    if kernels is not None and host_threads > 1:
        kernels = replace(kernels, host_s=kernels.host_s * host_threads)
    layers = [data for _, data in graph.layers() if data["op"] not in ("input", "output")]
    sizes = np.array(batches, dtype=np.float64)
    gpu_seconds: list[np.ndarray] = []
    host_seconds: list[float] = []
    for data in layers:
        act = (2 * data["out_bytes"] + 4 * data.get("pointwise_elems", 0)) * scale * sizes
        seconds = (act + data.get("param_bytes", 0) * scale) / memory_rate
        if data["op"] in COMPUTE_KINDS and data["flops_fwd"]:
            util = np.ones(len(batches))
            if kernels is not None:
                local = {d: np.full(len(batches), float(e)) * (sizes if data["roles"][d] == "batch" else 1.0)
                         for d, e in data["dims"].items()}
                util = layer_utilization(kernels, data, local)
            seconds = np.maximum(data["flops_fwd"] * sizes / (rates.compute(data["op"]).value * util), seconds)
        host = 0.0
        if kernels is not None:
            fused = len(data.get("fused_ops", ()))
            seconds = seconds + kernels_per_step(data["op"], fused, training=False) * kernels.floor_s
            host = host_ops_per_step(data["op"], fused, training=False) * kernels.host_s
        gpu_seconds.append(seconds)
        host_seconds.append(host)
    total = queued_seconds(gpu_seconds, host_seconds) if layers else np.zeros(len(batches))
    floor = f"; {kernels.floor_s * 1e6:g} us per kernel, waves over {gpu.sm_count} SMs" if kernels else ""
    if kernels is not None and kernels.host_s:
        floor += f"; eager: {gpu.host_us_per_op:g} us of host per operator, queued ahead of the GPU"
        if host_threads > 1:
            floor += f", dispatched by {host_threads} threads under one interpreter lock"
    source = (f"roofline over {len(layers)} layers of the LayerGraph on {rates.cluster.gpu.id} {precision} "
              f"({rates.compute('conv').source}{floor})")
    return EvalTime(list(batches), [float(t) for t in total], source)


def data_parallel_call(model: str, graph: Any, rates: Any, precision: str, devices: int) -> DataParallelCall:
    """``DataParallelCall`` for ``model`` over ``devices`` GPUs of ``rates``: the forward per replica count from the
    roofline, the module count from the model built on the meta device, the per-module replication time from the
    catalog (``replicate_us_per_module``), and the broadcast over the GPUs' all-gather link."""
    with torch.device("meta"):
        modules = sum(1 for _ in resolve_model(model).build().modules())
    weights = sum(data.get("param_bytes", 0) for _, data in graph.layers()) * bytes_per_element(precision) / 4
    link = rates.collective("all_gather", list(range(devices)))
    return DataParallelCall({n: roofline_eval_time(graph, rates, precision, host_threads=n)
                             for n in range(1, devices + 1)},
                            modules, rates.cluster.gpu.replicate_us_per_module * 1e-6, weights,
                            GatherTime(link.alpha_s, link.busbw_gbps, link.source))


def measure_eval_time(model: str, size: int | None, batches: tuple[int, ...] = (1, 2, 4, 8, 16),
                      threads: int = 1, repeats: int = 3, seed: int = 0) -> EvalTime:
    """Time the seeded model on this CPU at each batch (median of ``repeats`` after one warm-up),
    with ``threads`` torch threads, as each rank of ``--devices N`` would run. The batch counts network
    rows, unguided: ``Pricing`` doubles the rows under classifier-free guidance."""
    denoiser, (channels, height, width) = build_denoiser(model, seed)
    if size is not None:
        height = width = size
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    seconds = []
    try:
        for batch in batches:
            x = torch.randn(batch, channels, height, width)
            t = torch.full((batch,), 500, dtype=torch.long)
            denoiser(x, t)
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                denoiser(x, t)
                runs.append(time.perf_counter() - started)
            seconds.append(statistics.median(runs))
    finally:
        torch.set_num_threads(previous)
    return EvalTime(list(batches), seconds, f"measured on this CPU ({threads} thread(s), {height}x{width}, median of "
                                            f"{repeats} per batch {list(batches)})")


def gather_time(cluster: Any = None, profile: dict[str, Any] | None = None, world: int = 1) -> GatherTime:
    """All-gather cost over ``world`` ranks: calibration profile, else cluster topology, else gloo default."""
    measured = (profile or {}).get("collectives", {}).get("all_gather", {}).get(str(world))
    if measured:
        return GatherTime(measured["alpha_us"] / 1e6, measured["busbw_gbps"],
                          f"measured: calibration {profile['fingerprint']['id']}")
    if cluster is not None:
        rate = HardwareRates(cluster, profile).collective("all_gather", list(range(world)))
        return GatherTime(rate.alpha_s, rate.busbw_gbps, rate.source)
    alpha, bandwidth = GLOO_DEFAULT["alpha_s"], GLOO_DEFAULT["busbw_gbps"]
    return GatherTime(alpha, bandwidth, f"stated gloo default: {alpha * 1e6:g} us + {bandwidth:g} GB/s "
                      "(calibrate with `pase hw calibrate` and pass --profile to measure)")


# ---------------------------------------------------------------------------------------------- convergence
def probe_convergence(model: str, scheduler: str, steps: int, windows: list[int], blocks: list[int],
                      tol_paradigms: float, tol_srds: float, size: int | None = None, seed: int = 0,
                      guidance_scale: float = 1.0) -> Convergence:
    """Run ParaDiGMS at each window and SRDS at each block count on the seeded model (one sample, this
    CPU) and record passes and iterations. Seeded random weights converge faster than trained ones."""
    denoiser, (channels, height, width) = build_denoiser(model, seed, guidance_scale)
    if size is not None:
        height = width = size
    core = build_core(scheduler, steps, clip_sample=False)
    x_t, noise = core.initial_and_noise((1, channels, height, width), seed)
    evaluator = Evaluator(denoiser, split=False)
    runs = {w: paradigms(core, evaluator, x_t, noise, w, tol_paradigms) for w in windows}
    iterations = {b: srds(core, evaluator, x_t, noise, b, tol_srds).iterations or 1 for b in blocks}
    return Convergence({w: r.passes for w, r in runs.items()}, iterations,
                       f"measured probe on {model} ({height}x{width}, seeded weights, tol {tol_paradigms:g} / "
                       f"{tol_srds:g})", {w: int(r.evals) for w, r in runs.items()})


# ---------------------------------------------------------------------------------------------- prediction
@dataclass
class Pricing:
    eval_time: EvalTime
    gather: GatherTime
    convergence: Convergence
    elems: int  # elements of one state (C x H x W)
    memory_gbps: float  # for the per-pass update arithmetic
    evals_per_row: int = 1  # 2 under classifier-free guidance
    data_parallel: DataParallelCall | None = None  # passes run by torch.nn.DataParallel (not pase's runtime)

    def pass_seconds(self, rows: int, devices: int, update: bool = True) -> float:
        """One batched call of ``rows`` state-rows split over ``devices`` (replicated when rows < devices)."""
        if self.data_parallel is not None:
            seconds = self.data_parallel.seconds(rows, self.evals_per_row, devices, self.gather, self.elems * 4)
        else:
            split = devices > 1 and rows >= devices
            local = math.ceil(rows / devices) if split else rows
            seconds = self.eval_time(local * self.evals_per_row)
            if split:
                seconds += self.gather(rows * self.elems * 4, devices)
        if update:
            seconds += 8 * rows * self.elems * 4 / (self.memory_gbps * 1e9)
        return seconds


def predict_sequential(p: Pricing, steps: int, samples: int) -> Candidate:
    return Candidate("sequential", "1 device", 1, steps, float(steps),
                     steps * p.pass_seconds(samples, 1), samples)


def predict_batch(p: Pricing, steps: int, samples: int, devices: int) -> Candidate:
    local = math.ceil(samples / devices)
    seconds = steps * p.pass_seconds(local, 1) + p.gather(samples * p.elems * 4, min(devices, samples))
    return Candidate("batch", f"{min(devices, samples)} x {local} samples", devices, steps, float(steps),
                     seconds, samples)


def predict_paradigms(p: Pricing, steps: int, samples: int, devices: int, window: int) -> Candidate:
    """Slide the window as the convergence lays it out (``Convergence.paradigms_rows``) until the end."""
    rows = p.convergence.paradigms_rows(window, steps)
    seconds = sum(p.pass_seconds(r * samples, devices) for r in rows)
    return Candidate("paradigms", f"window {window}", devices, len(rows), float(sum(rows)), seconds, samples,
                     window=window)


def predict_srds(p: Pricing, steps: int, samples: int, devices: int, blocks: int, pipelined: bool,
                 iterations: int) -> Candidate:
    """Price the real SRDS schedule's passes (its rules run without tensors), stopped after ``iterations``."""
    rows = SrdsPassCounter(steps, blocks, iterations, pipelined).rows_per_pass()
    seconds = sum(p.pass_seconds(r * samples, devices) for r in rows)
    name = "srds-pipelined" if pipelined else "srds"
    return Candidate(name, f"{blocks} blocks, {iterations} iterations", devices, len(rows), float(sum(rows)),
                     seconds, samples, blocks=blocks)


def plan_sampling(model: str, scheduler: str, steps: int, devices: int, samples: int, pricing: Pricing,
                  objective: str = "latency", margin: float = 0.05, sources: dict[str, str] | None = None
                  ) -> SamplePlan:
    """All candidates priced, and the pick (see the module docstring)."""
    if objective not in ("latency", "throughput"):
        raise PaseError(f"unknown --objective {objective!r}; choose latency or throughput")
    if devices < 1:
        raise PaseError(f"--devices must be >= 1, not {devices}")
    check_steps(scheduler, steps)
    candidates = []
    srds_configs = []
    for config in parallel_sampling.candidates(steps, devices):
        if config.sampler == "sequential":
            candidates.append(predict_sequential(pricing, steps, samples))
        elif config.sampler == "batch":
            candidates.append(predict_batch(pricing, steps, samples, devices))
        elif config.sampler == "paradigms":
            candidates.append(predict_paradigms(pricing, steps, samples, devices, config.window))
        else:
            srds_configs.append(config)
    searched = {c.window for c in candidates if c.sampler == "paradigms"}
    for window in sorted(set(pricing.convergence.paradigms_passes) - searched):  # a measured window is priced too
        if 2 <= window <= steps:
            candidates.append(predict_paradigms(pricing, steps, samples, devices, window))
    # SRDS: block counts near sqrt(N) first; a count whose lower bound cannot beat the best of its schedule found
    # so far is not dry-run (iteration 0's coarse sweep is B passes in a row, and each iteration's fine solves N / B
    # in a row; no pass is faster than the fastest one of at most one row per device)
    fastest_pass = min(pricing.pass_seconds(r * samples, devices) for r in range(1, devices + 1))
    best_srds: dict[str, float] = {}
    skipped = 0
    for config in sorted(srds_configs, key=lambda c: (abs(math.log(c.blocks / math.sqrt(steps))), c.blocks)):
        iterations = pricing.convergence.iterations(config.blocks, scheduler)
        bound = fastest_pass * max(config.blocks, iterations * steps // config.blocks)
        if bound >= best_srds.get(config.sampler, math.inf):
            skipped += 1
            continue
        candidate = predict_srds(pricing, steps, samples, devices, config.blocks,
                                 config.sampler == "srds-pipelined", iterations)
        best_srds[config.sampler] = min(best_srds.get(config.sampler, math.inf), candidate.seconds)
        candidates.append(candidate)

    def key(c: Candidate) -> tuple[float, int]:
        value = c.seconds if objective == "latency" else -c.throughput
        return value, PRIORITY[c.sampler]

    baselines = [c for c in candidates if c.sampler in ("sequential", "batch")]
    best_base = min(baselines, key=key)
    best = min(candidates, key=key)
    if best.sampler not in ("sequential", "batch"):
        gain = best_base.seconds / best.seconds if objective == "latency" else best.throughput / best_base.throughput
        if gain < 1 + margin:
            best = best_base
    all_sources = {"eval time": pricing.eval_time.source, "gather": pricing.gather.source,
                   "convergence": pricing.convergence.source, **(sources or {})}
    if skipped:
        all_sources["srds search"] = (f"{skipped} SRDS settings not dry-run: their lower bound (B coarse passes, "
                                      "iterations x N / B fine passes, each at least the fastest pass) was no "
                                      "better than a setting already priced")
    return SamplePlan(model, scheduler, steps, devices, samples, objective, candidates, best, all_sources, margin)


def best_of_each(plan: SamplePlan) -> list[Candidate]:
    """The chosen candidate and the best setting of each sampler, for the printed table."""
    best: dict[str, Candidate] = {}
    for c in plan.candidates:
        value = c.seconds if plan.objective == "latency" else -c.throughput
        if c.sampler not in best or value < (best[c.sampler].seconds if plan.objective == "latency"
                                             else -best[c.sampler].throughput):
            best[c.sampler] = c
    return sorted(best.values(), key=lambda c: PRIORITY[c.sampler])
