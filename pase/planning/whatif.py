"""What-if analysis for hardware purchases: the best plan on each candidate cluster, and what it costs.

For every cluster the same planner as ``pase plan`` finds the fastest plan that fits; when none
fits at the global batch, gradient accumulation splits the step into k micro-steps (k doubling)
and the row says so. From the plan: step time, samples/s (total and per GPU), model FLOPs
utilisation, memory headroom, $ per hour (catalog price, or the user's), hours, $ and energy
(TDP x time) for N samples. Around the requested clusters: a scaling curve from 1 GPU up for each
GPU type, and the same GPUs with NVLink removed (PCIe only), so the value of the interconnect is
priced by the plan it enables, not by a bandwidth ratio.

Every plan here is searched exactly (``search_gap=0``): comparisons between clusters must not be
blurred by the search's own tolerance. Where memory binds, the memory price is refined three times
(not eight as in ``pase plan``): a report of many clusters trades that last refinement for speed.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypedDict

from cost_models.catalog import Catalog
from cost_models.cluster import Cluster, catalog_fabric, load_cluster
from pase.errors import PaseError
from pase.graph import LayerGraph
from pase.planning.micro_steps import accumulated, micro_step_counts, plan_micro_steps
from pase.planning.micro_steps import divisors_of as divisors_of  # re-exported: what-if callers used it here
from pase.planning.per_layer import PlanDoesNotFit, PlanOptions, size_text
from pase.planning.pipeline import plan_with_pipeline
from pase.planning.plan import Plan, summarize_blocks

COMMUNICATION_BOUND_SHARE = 0.5  # a point whose step is at least this much communication is marked


@dataclass
class ClusterResult:
    cluster: str
    gpu: str
    devices: int
    fits: bool
    interconnect: str = ""
    step_seconds: float | None = None
    samples_per_second: float | None = None
    samples_per_second_per_gpu: float | None = None
    mfu: float | None = None
    memory_bytes_per_device: float | None = None
    memory_headroom_bytes: float | None = None
    accumulation: int = 1
    communication_share: float | None = None
    communication_bound: bool = False
    dollars_per_hour: float | None = None
    price_source: str = ""
    hours_for_samples: float | None = None
    dollars_for_samples: float | None = None
    energy_kwh_for_samples: float | None = None
    main_split: str = ""
    note: str = ""

    @property
    def throughput(self) -> float:
        """Samples/s of a row that fits (``evaluate`` sets them together)."""
        assert self.samples_per_second is not None, f"{self.cluster} has no samples/s: it does not fit"
        return self.samples_per_second


def pareto_front(results: list[ClusterResult]) -> list[ClusterResult]:
    """The clusters no other beats on both time and dollars for the same samples (fitting, priced), fastest first:
    the choices a purchase should be made among."""
    priced = sorted((r for r in results if r.fits and r.hours_for_samples is not None
                     and r.dollars_for_samples is not None),
                    key=lambda r: (r.hours_for_samples, r.dollars_for_samples))
    front: list[ClusterResult] = []
    cheapest = float("inf")
    for result in priced:  # by time: on the front when cheaper than every faster one
        if float(result.dollars_for_samples or 0.0) < cheapest:
            front.append(result)
            cheapest = float(result.dollars_for_samples or 0.0)
    return front


class InterconnectPair(TypedDict):
    """One cluster with NVLink against its PCIe-only twin (a speed-up only where both fit)."""

    cluster: str
    nvlink_step_seconds: float | None
    pcie_step_seconds: float | None
    nvlink_speedup: float | None


@dataclass
class WhatIfReport:
    model: str
    batch: int
    precision: str
    samples: float
    clusters: list[ClusterResult]
    scaling: dict[str, list[ClusterResult]] = field(default_factory=dict)  # GPU id -> points by device count
    interconnect: list[InterconnectPair] = field(default_factory=list)  # NVLink vs PCIe-only pairs
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "batch": self.batch, "precision": self.precision, "samples": self.samples,
                "clusters": [asdict(r) for r in self.clusters],
                "scaling": {gpu: [asdict(r) for r in rows] for gpu, rows in self.scaling.items()},
                "interconnect": self.interconnect, "summary": self.summary}


def evaluate(graph_at: Callable[[int], LayerGraph], cluster: Cluster, batch: int, samples: float,
             options: PlanOptions, pipeline: bool = False) -> ClusterResult:
    """The best plan on ``cluster`` for global ``batch`` (accumulating micro-steps if it must);
    with ``pipeline``, pipeline stages x data parallelism are searched too and win when faster."""
    price = cluster.price.typical if cluster.price else None
    row = ClusterResult(cluster=cluster.spec, gpu=cluster.gpu.id, devices=cluster.world_size, fits=False,
                        interconnect=_interconnect(cluster), dollars_per_hour=price * cluster.world_size
                        if price is not None else None,
                        price_source=(cluster.price.source or cluster.price.as_of) if cluster.price else "")
    # micro-steps per step: the per-layer planner's own joint search (pase.planning.micro_steps), in the runnable
    # space leaving every device an equal chunk of each micro-step
    chunks = cluster.world_size if options.space == "runnable" else 1
    steps = micro_step_counts(batch, chunks)
    if not steps:
        row.note = (f"the global batch {batch} does not divide into equal chunks over {cluster.world_size} devices, "
                    "which the runtime needs")
        return row
    plan: Plan | None = None
    try:
        plan = plan_micro_steps(graph_at(batch), cluster, options=options)[0]
        accumulation = plan.micro_steps
    except PlanDoesNotFit as exc:
        if not pipeline:
            row.note = (f"does not fit even one sample per micro-step: the leanest plan needs "
                        f"{size_text(exc.least_bytes)} per device of the {size_text(exc.limit_bytes)} "
                        "allowed (--pipeline also tries pipeline stages, which hold fewer weights)")
            return row
        accumulation = steps[-1]
    if pipeline and cluster.world_size > 1:
        # stages hold a part of the weights: a pipeline may fit with fewer micro-steps, or be faster at as many
        smaller = [k for k in steps if k < accumulation]
        candidates = {accumulation, *smaller[-1:]}
        for k in sorted(candidates):
            staged = _pipelined(graph_at(batch // k), cluster, options)
            if staged is not None and (plan is None or _step(staged, k) < _step(plan, accumulation)):
                plan, accumulation = staged, k
    if plan is None:
        row.note = "does not fit even one sample per micro-step, with or without pipeline stages"
        return row
    micro = batch // accumulation
    graph = graph_at(micro)
    step = _step(plan, accumulation)
    flops = float(graph.meta.get("flops_fwd", 0) + graph.meta.get("flops_bwd", 0)) * accumulation
    peak = cluster.gpu.peak_tflops(options.precision) * 1e12 * cluster.world_size
    limit = cluster.gpu.memory_bytes * options.memory_fraction
    row.fits = True
    row.accumulation = accumulation
    row.step_seconds = step
    row.samples_per_second = batch / step
    row.samples_per_second_per_gpu = row.samples_per_second / cluster.world_size
    row.mfu = flops / step / peak if peak else None
    row.memory_bytes_per_device = plan.predicted.memory_bytes_per_device
    row.memory_headroom_bytes = limit - plan.predicted.memory_bytes_per_device
    row.communication_share = plan.predicted.communication_seconds / plan.predicted.step_seconds
    row.communication_bound = row.communication_share >= COMMUNICATION_BOUND_SHARE
    row.main_split = _main_split(plan)
    if plan.stages:
        row.main_split = (f"{len(plan.stages)} stages x {plan.pipeline_replicas} replicas, "
                          f"{plan.microbatches} microbatches ({plan.schedule})")
    row.hours_for_samples = samples / row.samples_per_second / 3600
    row.energy_kwh_for_samples = cluster.gpu.tdp_w * cluster.world_size * row.hours_for_samples / 1000
    if row.dollars_per_hour is not None:
        row.dollars_for_samples = row.dollars_per_hour * row.hours_for_samples
    if accumulation > 1:
        row.note = f"{accumulation} micro-steps of {batch // accumulation} per step (gradient accumulation)"
    return row


def run_whatif(graph_at: Callable[[int], LayerGraph], clusters: list[Cluster], batch: int, samples: float,
               options: PlanOptions, catalog: Catalog, *, scaling: bool = True, interconnect: bool = True,
               pipeline: bool = False, progress: Callable[[str], None] | None = None) -> WhatIfReport:
    """Every cluster, the scaling curves and the NVLink/PCIe pairs; ``progress`` hears each step.

    ``pipeline`` adds pipeline stages to the requested clusters and their PCIe-only twins; the
    scaling curves compare per-layer plans only, so every point is planned the same way."""
    check_inputs(batch, samples)
    options = replace(options, search_gap=0.0, memory_price_steps=3, baselines=False)
    tasks: list[tuple[str, Cluster, bool]] = [("cluster", c, pipeline) for c in clusters]
    if scaling:
        for gpu_id, largest in _largest_per_gpu(clusters).items():
            tasks += [(f"scaling:{gpu_id}", c, False) for c in _scaling_clusters(largest, catalog)]
    if interconnect:
        tasks += [("pcie", _without_nvlink(c, catalog), pipeline) for c in clusters if c.gpu.nvlink_generation]
    results: dict[tuple[str, bool], ClusterResult] = {}
    for done, (_, cluster, pipelined) in enumerate(tasks):
        key = (_identity(cluster), pipelined)
        if key not in results:
            if progress:
                progress(f"[{done + 1}/{len(tasks)}] planning on {cluster.spec}"
                         + (" (with pipeline stages)" if pipelined else ""))
            results[key] = evaluate(graph_at, cluster, batch, samples, options, pipelined)
    report = WhatIfReport(model=str(graph_at(batch).meta.get("model")), batch=batch, precision=options.precision,
                          samples=samples, clusters=[results[(_identity(c), pipeline)] for c in clusters])
    for kind, cluster, pipelined in tasks:
        if kind.startswith("scaling:"):  # copies: scaling marks go on the curve, not on the main table's row
            report.scaling.setdefault(kind.split(":", 1)[1], []).append(
                copy.copy(results[(_identity(cluster), pipelined)]))
    for points in report.scaling.values():
        _mark_scaling(points)
    if interconnect:
        for cluster in clusters:
            if cluster.gpu.nvlink_generation:
                nvlink = results[(_identity(cluster), pipeline)]
                pcie = results[(_identity(_without_nvlink(cluster, catalog)), pipeline)]
                report.interconnect.append({
                    "cluster": cluster.spec, "nvlink_step_seconds": nvlink.step_seconds,
                    "pcie_step_seconds": pcie.step_seconds,
                    "nvlink_speedup": pcie.step_seconds / nvlink.step_seconds
                    if nvlink.step_seconds and pcie.step_seconds else None})
    report.summary = summarize(report.clusters)
    return report


def _pipelined(graph: LayerGraph, cluster: Cluster, options: PlanOptions) -> Plan | None:
    """The best plan with pipeline stages considered (None when nothing fits)."""
    try:
        return plan_with_pipeline(graph, cluster, options=options)[0]
    except PlanDoesNotFit:
        return None


def check_inputs(batch: int, samples: float) -> None:
    """Refuse a batch or sample count no report can be made for (before any capture or search)."""
    if not 0 < samples < math.inf:
        raise PaseError(f"--samples must be a positive, finite number of training samples, not {samples:g}")
    if batch < 1:
        raise PaseError(f"--batch must be at least 1, not {batch}")


def summarize(rows: list[ClusterResult]) -> str:
    """One sentence: the fastest and the cheapest cluster, each with its margin over the runner-up."""
    fitting = [r for r in rows if r.fits]
    if not fitting:
        return "The model fits on none of these clusters in any plan: add GPUs or memory, or lower the batch."
    by_speed = sorted(fitting, key=lambda r: -r.throughput)
    sentence = f"Fastest: {by_speed[0].cluster} at {by_speed[0].throughput:,.0f} samples/s"
    if len(by_speed) > 1:
        sentence += f", {by_speed[0].throughput / by_speed[1].throughput:.2f}x {by_speed[1].cluster}"
    # (dollars, row) for every priced row, cheapest first (ties keep the rows' order)
    priced = sorted([(r.dollars_for_samples, r) for r in fitting if r.dollars_for_samples is not None],
                    key=lambda pair: pair[0])
    if priced:
        (dollars, cheapest), *others = priced
        sentence += f"; cheapest: {cheapest.cluster} at ${dollars:,.2f} for the samples"
        if others:
            runner_up_dollars, runner_up = others[0]
            saving = 1 - dollars / runner_up_dollars
            sentence += f", {saving:.0%} less than {runner_up.cluster}"
    else:
        sentence += "; no cluster has a price (give one with --price GPU=DOLLARS_PER_GPU_HOUR)"
    return sentence + "."


def _interconnect(cluster: Cluster) -> str:
    inside = f"NVLink {cluster.gpu.nvlink_generation}" if cluster.gpu.nvlink_generation else \
        f"PCIe {cluster.gpu.pcie_gen}" + ("" if cluster.gpu.p2p_over_pcie else " (no P2P)")
    return inside + (f" + {cluster.network.id}x{cluster.nics_per_node}" if cluster.network and cluster.nodes > 1
                     else "")


def _main_split(plan: Plan) -> str:
    counts: dict[str, float] = {}
    for block in summarize_blocks(plan):
        for split, count in block.splits.items():
            counts[split] = counts.get(split, 0.0) + count
    return max(counts, key=counts.__getitem__) if counts else ""


def seconds_text(seconds: float | None) -> str:
    """Step seconds for a table: three significant digits, whole seconds (never 1.23e+03) from 100 s."""
    if seconds is None:
        return ""
    return f"{seconds:.3g}" if seconds < 100 else f"{seconds:,.0f}"


def _step(plan: Plan, micro_steps: int) -> float:
    """A step of ``micro_steps`` micro-steps: they accumulate gradients locally (DDP's no_sync), so the
    exposed gradient collectives run once per step, not once per micro-step. A per-layer plan that chose its
    micro-steps already predicts the whole step."""
    if plan.micro_steps > 1:
        return plan.predicted.step_seconds
    return accumulated(plan.predicted, micro_steps, plan.batch * micro_steps).step_seconds


def _identity(cluster: Cluster) -> str:
    """Everything that prices a cluster (two system files may share a name but not their figures)."""
    return json.dumps({**cluster.to_dict(), "gpu": asdict(cluster.gpu)}, sort_keys=True, default=str)


def _largest_per_gpu(clusters: list[Cluster]) -> dict[str, Cluster]:
    largest: dict[str, Cluster] = {}
    for cluster in clusters:
        if cluster.gpu.id not in largest or cluster.world_size > largest[cluster.gpu.id].world_size:
            largest[cluster.gpu.id] = cluster
    return largest


def _scaling_clusters(largest: Cluster, catalog: Catalog) -> list[Cluster]:
    """1, 2, 4, ... GPUs of ``largest``'s kind up to its size, on its kind of node and network."""
    counts = sorted({2 ** k for k in range(int(math.log2(largest.world_size)) + 1)} | {largest.world_size})
    clusters = []
    for n in counts:
        if n <= largest.gpus_per_node:
            spec = f"{n}x{largest.gpu.id}"
        elif n % largest.gpus_per_node == 0 and largest.network is not None:
            spec = f"{n // largest.gpus_per_node}x{largest.gpus_per_node}x{largest.gpu.id}+{largest.network.id}" \
                   f"x{largest.nics_per_node}"
        else:
            continue
        if n == largest.world_size:
            clusters.append(largest)
            continue
        # the same GPU (its figures and price, the user's included) and efficiencies as the largest; a
        # system file's own fabric is cut down to the GPUs in use
        smaller = load_cluster(spec, catalog)
        fabric = smaller.fabric
        if largest.source != "catalog":  # a node's fabric: whole for whole nodes, cut down below one node
            fabric = largest.fabric.copy() if n >= largest.gpus_per_node else largest.fabric.subgraph(
                v for v in largest.fabric.nodes if not (v.startswith("gpu") and v[3:].isdigit() and int(v[3:]) >= n)
            ).copy()
        clusters.append(replace(smaller, gpu=largest.gpu, efficiency=dict(largest.efficiency), source=largest.source,
                                fabric=fabric))
    return clusters


def _without_nvlink(cluster: Cluster, catalog: Catalog) -> Cluster:
    """The same GPUs and nodes with NVLink removed: GPU-to-GPU traffic over the node's PCIe tree."""
    gpu = replace(cluster.gpu, nvlink_generation=None, nvlink_links=0, nvlink_topology=None)
    return replace(cluster, spec=f"{cluster.spec} (PCIe only)", gpu=gpu,
                   fabric=catalog_fabric(gpu, cluster.gpus_per_node, catalog), notes=list(cluster.notes))


def _mark_scaling(points: list[ClusterResult]) -> None:
    """Mark a point that predicts fewer samples/s than a smaller one: communication-bound when its
    communication share grew, otherwise an unexplained drop, said in its note."""
    best: ClusterResult | None = None
    for point in points:
        if not point.fits:
            continue
        if best is not None and point.throughput < best.throughput:
            grew = (point.communication_share or 0.0) > (best.communication_share or 0.0)
            point.communication_bound = point.communication_bound or grew
            why = "communication grows faster than compute shrinks" if grew else "not explained by communication"
            point.note = (point.note + "; " if point.note else "") + f"fewer samples/s than {best.devices} GPUs ({why})"
        if best is None or point.throughput > best.throughput:
            best = point


