"""Benchmark: pase's predictions against published measurements (issue 19's validation set).

    .venv/bin/python tools/bench_fidelity.py [--points tools/data/fidelity_points.json]
                                             [--json bench_results/fidelity.json] [--only ID,ID]

Every training point of the set (published end-to-end throughputs of diffusion UNets, each with its source,
configuration and measured value: ``tools/data/fidelity_points.json``) is priced on the point's GPUs (the catalog's
entry; nodes of 8 with NVLink, and the point's network between nodes), the zoo UNet at the point's resolution and
global batch, in the configuration it ran where pase prices that configuration as it ran: a point whose source ran
plain DDP with a per-device optimizer (``"configuration": "ddp"``: MLPerf v3.1's NeMo) is priced as pase's ``ddp``
baseline. The others ran NeMo's distributed optimizer over the whole data-parallel group with NCCL on SHARP
switches, which pase's cost model does not price as it ran (no CollNet/SHARP, reduce-scatters priced as rings), so
they are compared with the plan `pase plan` would make (micro-steps, sharding per block, pipelines); that plan's
images/s is printed for every point. NVIDIA's implementation clips gradients (``gradient_clip_val: 1.0``) and runs no
EMA, and so are the points priced. Sampling points
(ParaDiGMS, SRDS) are priced by `sample-plan`'s model. Inference points (published denoising steps/s of diffusers'
SD-1.5 and SDXL pipelines on one GPU: the diffusers docs' at several batches, fal.ai's on a stated A100 80G SXM)
price that model's network call alone, on four GPUs of three architectures: what the call costs apart from any
sampler's pass count. Each point is priced on the stack it ran:
MLPerf's implementation replays whole iterations from CUDA graphs ("graphed"); the sampling papers and the
inference points ran diffusers eagerly. The same cost model and catalog price every row: there is no per-row
factor. The run ends with the mean absolute error and the worst row.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

POINTS = Path(__file__).parent / "data" / "fidelity_points.json"
# SD 2's UNet (865M: SD-1.5's blocks with 64-channel heads and 1024-wide text embeddings) is the zoo's sd2-unet,
# priced at each point's resolution (MLPerf's SD-2 base at 512 px, the papers' SD-2 at 768)
ZOO_MODEL = {"sd15": "sd15-unet", "sd1": "sd15-unet", "sd2": "sd2-unet", "sdxl": "sdxl-unet"}
# the catalog's GPU for a published name (the catalog holds each GPU's figures and their sources)
GPU_IDS = {"h100": "H100-SXM", "h100-sxm": "H100-SXM", "h100-pcie": "H100-PCIe", "h200": "H200-SXM",
           "b200": "B200", "gb200": "GB200", "a100-80": "A100-80GB-SXM", "a100-40": "A100-40GB-SXM",
           "a100": "A100-80GB-SXM", "v100": "V100-SXM2", "mi300x": "MI300X", "rtx4090": "RTX4090", "rtx3090": "RTX3090",
           "l40s": "L40S"}
NETWORKS = {"ndr": "IB-NDR400", "xdr": "IB-XDR", "hdr": "IB-HDR", "edr": "IB-EDR", "roce": "RoCE-400"}


def catalog_gpu(name: str) -> str | None:
    """The catalog id for a published GPU name ("A100-SXM4-80GB" -> "A100-80GB-SXM"); None for an accelerator the
    catalog does not hold (Gaudi, TPU)."""
    key = name.lower().replace(" ", "").replace("_", "-")
    if key.startswith("a100"):
        return GPU_IDS["a100-40"] if "40gb" in key else GPU_IDS["a100-80"]
    for prefix in sorted(GPU_IDS, key=len, reverse=True):
        if key.startswith(prefix.replace("-", "")) or key.startswith(prefix):
            return GPU_IDS[prefix]
    return None


def cluster_spec(point: dict[str, Any]) -> str:
    """A pase cluster spec for the point: one NVLink domain as large as the catalog's node allows (8, or 72 for
    GB200 NVL72), else nodes of that size over the point's network (InfiniBand NDR where it names none)."""
    from cost_models.catalog import Catalog

    gpu, gpus = catalog_gpu(point["gpu"]), int(point["gpus"])
    assert gpu is not None
    largest = int(getattr(Catalog.load().gpu(gpu), "max_gpus_per_node", 8) or 8)
    if gpus <= largest:
        return f"{gpus}x{gpu}"
    per_node = max(d for d in range(1, largest + 1) if gpus % d == 0)  # 512 GB200s: 64 domains of 8 (not of 72)
    interconnect = str(point.get("interconnect") or "").lower()
    network = next((net for key, net in NETWORKS.items() if key in interconnect), "IB-NDR400")
    return f"{gpus // per_node}x{per_node}x{gpu}+{network}x{per_node}"


def point_stack(point: dict[str, Any]) -> str:
    """How the point's steps reached the GPU (``PlanOptions.stack``): MLPerf's Stable Diffusion implementation
    (NVIDIA's NeMo, which every submitter's GPUs ran) captures whole training iterations in CUDA graphs
    (docs.nvidia.com/dl-cuda-graph/latest/examples/stable-diffusion-v2.html), so no host dispatch per operator;
    anything else ran eagerly unless its point says otherwise."""
    return str(point.get("stack", "graphed" if point["id"].startswith("mlperf") else "eager"))


def predict_training(point: dict[str, Any]) -> dict[str, Any]:
    import torch

    from cost_models.cluster import parse_spec
    from cost_models.rates import HardwareRates
    from pase.graph import extract_model
    from pase.models.zoo import ZOO, resolution_inputs
    from pase.planning import PlanOptions, make_plan
    from pase.planning.per_layer import data_parallel_prediction
    from pase.planning.pipeline import PipelineOptions

    model = ZOO_MODEL[point["model"]]
    batch = int(point["global_batch"])
    shapes = resolution_inputs(ZOO[model], batch, point.get("resolution_px")) or None
    precision = "bf16" if point.get("precision") in ("bf16", "fp16", "unknown", None) else "fp32"
    graph = extract_model(model, batch, dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                          input_shapes=shapes, use_cache=True)
    spec = cluster_spec(point)
    started = time.perf_counter()
    stack = point_stack(point)
    # NVIDIA's implementation clips by the global norm (gradient_clip_val: 1.0) and runs no EMA; a point that did
    # not clip says so
    options = PlanOptions(precision=precision, stack=stack, grad_clip=bool(point.get("gradient_clipping", True)),
                          ema=False)
    cluster = parse_spec(spec)
    plan, _ = make_plan(graph, cluster, options=options, pipeline=PipelineOptions())
    planned = batch / plan.predicted.step_seconds
    predicted, priced_as = planned, "pase plan"
    if point.get("configuration") == "ddp":  # the source ran plain DDP: priced as pase's ddp baseline, not the plan
        ddp, why = data_parallel_prediction(graph, cluster, HardwareRates(cluster, None, precision), options,
                                            fsdp=False)
        assert ddp is not None, why
        predicted, priced_as = batch / ddp.step_seconds, "ddp"
    return {"cluster": spec, "model": model, "stack": stack, "priced_as": priced_as,
            "predicted_images_per_s": predicted, "plan_images_per_s": planned, "micro_steps": plan.micro_steps,
            "stages": len(plan.stages), "plan_seconds": time.perf_counter() - started}


# sampling points pase's sample planner prices: id -> (sampler, steps, scheduler, GPUs, what the point measured).
# SD-v2 is priced as sd2-unet at the point's resolution (768 px) under classifier-free guidance (batch 2 per
# step), one sample; speedups are against sequential sampling on one GPU. DistriFusion's patch parallelism is not
# a sampler pase plans.
SAMPLING = {"paradigms-sd2-ddpm1000-sequential": ("sequential", 1000, "ddpm", 1, "seconds"),
            "paradigms-sd2-ddpm1000-parallel": ("paradigms", 1000, "ddpm", 8, "seconds"),
            "paradigms-sd2-1gpu-speedup": ("paradigms", 1000, "ddpm", 1, "speedup"),
            "paradigms-sd2-2gpu-speedup": ("paradigms", 1000, "ddpm", 2, "speedup"),
            "paradigms-sd2-4gpu-speedup": ("paradigms", 1000, "ddpm", 4, "speedup"),
            "paradigms-sd2-ddim200-sequential": ("sequential", 200, "ddim", 1, "seconds"),
            "paradigms-sd2-ddim200-parallel": ("paradigms", 200, "ddim", 8, "seconds"),
            "srds-sd2-25step-speedup": ("srds", 25, "ddim", 4, "speedup"),
            "srds-sd2-100step-speedup": ("srds", 100, "ddim", 4, "speedup")}


def predict_sampling(point: dict[str, Any], points: dict[str, dict[str, Any]]) -> tuple[float, str, str]:
    """(pase's figure for a sampling point, the cluster it priced, how), at the point's resolution (latents 1/8 of
    it) in fp16, as the ParaDiGMS code samples, on an eager stack (diffusers' pipelines dispatch every op), on the
    runtime it ran (``runtime``: "nn.DataParallel" for the ParaDiGMS code's multi-GPU runs, else pase's). A point
    whose source gives the run's counts (``run``) is priced as that run; one that gives its window takes the
    convergence of the run it names (``convergence_from``); the others are priced as `sample-plan` would pick."""
    from pase.cli.sample import build_pricing
    from pase.sampling.planner import Convergence, plan_sampling, predict_paradigms, predict_srds

    sampler, steps, scheduler, gpus, measure = SAMPLING[point["id"]]
    cluster = f"{gpus}xA100-80GB-SXM"
    latent = int(point["resolution_px"]) // 8 if point.get("resolution_px") else None
    data_parallel = point.get("runtime") == "nn.DataParallel"
    model = ZOO_MODEL[point["model"]]
    pricing, devices, where = build_pricing(model, None, cluster, steps, scheduler, latent, 7.5, False, None, None,
                                            "fp16", data_parallel=data_parallel)
    plan = plan_sampling(model, scheduler, steps, devices, 1, pricing, margin=0.0, sources={"devices": where})
    sequential = next(c.seconds for c in plan.candidates if c.sampler == "sequential")
    run = point.get("run") or {}
    if sampler == "paradigms" and ("passes" in run or "convergence_from" in run):
        measured = run if "passes" in run else points[run["convergence_from"]]["run"]
        pricing.convergence = Convergence({measured["window"]: measured["passes"]}, {}, point["id"],
                                          {measured["window"]: measured["evaluations"]})
        candidate = predict_paradigms(pricing, steps, 1, gpus, run["window"])
        best = candidate.seconds
        how = f"window {run['window']}: {candidate.passes} passes, {candidate.evals:g} evaluations"
        if "passes" not in run:
            how += f" (from {measured['passes']} / {measured['evaluations']} at {measured['window']})"
    elif sampler == "srds" and run:
        best = predict_srds(pricing, steps, 1, gpus, run["blocks"], run["pipelined"], run["iterations"]).seconds
        how = f"{run['blocks']} blocks, {run['iterations']} iteration(s)" + (", pipelined" if run["pipelined"] else "")
    else:
        best = min(c.seconds for c in plan.candidates if c.sampler.startswith(sampler))
        how = "sample-plan's pick" if sampler != "sequential" else "sequential"
    if data_parallel:
        how += ", nn.DataParallel"
    return (best if measure == "seconds" else sequential / best), cluster, how


@functools.cache
def inference_graph(model: str, latent: int) -> Any:
    """The batch-1 layer graph at ``latent`` x ``latent``, loaded once for all the GPUs and batches priced on it."""
    from pase.graph import extract_model

    return extract_model(model, 1, input_shapes={"sample": (1, 4, latent, latent)}, use_cache=True)


def predict_inference(point: dict[str, Any]) -> tuple[float, str]:
    """(denoising steps/s pase predicts for an inference point, the GPU it priced): one UNet call on
    ``unet_batch`` latents at the point's resolution in its precision, on its stack, with the sampler's roofline
    (``pase.sampling.planner.roofline_eval_time``); the scheduler's few elementwise operators are not priced."""
    from cost_models.cluster import load_cluster
    from cost_models.rates import HardwareRates
    from pase.sampling.planner import roofline_eval_time

    gpu = catalog_gpu(point["gpu"])
    assert gpu is not None
    graph = inference_graph(ZOO_MODEL[point["model"]], int(point["resolution_px"]) // 8)
    rates = HardwareRates(load_cluster(f"1x{gpu}"), None, point["precision"])
    seconds = roofline_eval_time(graph, rates, point["precision"], batches=(int(point["unet_batch"]),),
                                 stack=point["stack"]).seconds[0]
    return 1 / seconds, gpu


def sampling_skipped(point: dict[str, Any]) -> str:
    """Why a sampling point is not priced (a point may say so itself: ``not_priced``)."""
    if point.get("not_priced"):
        return f"not priced: {point['not_priced']}"
    if "DistriFusion" in point.get("method", ""):
        return "not priced: patch parallelism is not a sampler pase plans"
    if point.get("model") != "sd2":
        return f"not priced: model {point.get('model')} is not in the zoo"
    return "not priced: no single run to price (a range or a trend)"


def measured_images_per_s(point: dict[str, Any]) -> float | None:
    """The throughput the source measured (a log's own images/s first; else one derived from time to train)."""
    if str(point.get("unit", "")).lower() in ("images/s", "img/s", "samples/s"):
        return float(point["value"])
    return float(point["images_per_s"]) if point.get("images_per_s") else None


def why_skipped(point: dict[str, Any]) -> str | None:
    """Why a training point cannot be priced (None: it can)."""
    if point["model"] not in ZOO_MODEL:
        return f"model {point['model']} is not in the zoo"
    if catalog_gpu(point["gpu"]) is None:
        return f"{point['gpu']} is not in the catalog"
    if not point.get("global_batch"):
        return "the source gives no batch"
    if measured_images_per_s(point) is None:
        return "no images/s to compare"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=Path, default=POINTS)
    parser.add_argument("--json", type=Path, default=Path("bench_results/fidelity.json"))
    parser.add_argument("--only", default=None, help="Comma-separated point ids.")
    args = parser.parse_args()
    data = json.loads(args.points.read_text())
    wanted = set(args.only.split(",")) if args.only else None
    console = Console(width=160)
    rows: list[dict[str, Any]] = []
    for point in data["points"]:
        if wanted and point["id"] not in wanted or point.get("kind") != "training":
            continue
        skipped = why_skipped(point)
        if skipped:
            rows.append({"id": point["id"], "kind": "training", "skipped": skipped})
            continue
        measured = measured_images_per_s(point)
        assert measured is not None
        with console.status(f"planning {point['id']} ..."):
            predicted = predict_training(point)
        error = predicted["predicted_images_per_s"] / measured - 1
        rows.append({"id": point["id"], "kind": "training", "gpu": point["gpu"], "gpus": point["gpus"],
                     "measured_images_per_s": measured,
                     "published": bool(point.get("source_url")),
                     "per_gpu_batch": int(point["global_batch"]) // int(point["gpus"]),
                     "error": error, "source_url": point.get("source_url"), **predicted})
    by_id = {point["id"]: point for point in data["points"]}
    for point in data["points"]:
        if wanted and point["id"] not in wanted or point.get("kind") != "sampling":
            continue
        if point["id"] not in SAMPLING:
            rows.append({"id": point["id"], "kind": "sampling", "skipped": sampling_skipped(point)})
            continue
        with console.status(f"pricing {point['id']} ..."):
            predicted_value, cluster, how = predict_sampling(point, by_id)
        rows.append({"id": point["id"], "kind": "sampling", "cluster": cluster, "priced_as": how,
                     "measured": float(point["value"]),
                     "predicted": predicted_value, "unit": SAMPLING[point["id"]][4],
                     "error": predicted_value / float(point["value"]) - 1, "source_url": point.get("source_url")})
    for point in data["points"]:
        if wanted and point["id"] not in wanted or point.get("kind") != "inference":
            continue
        if catalog_gpu(point["gpu"]) is None:
            rows.append({"id": point["id"], "kind": "inference", "skipped": f"{point['gpu']} is not in the catalog"})
            continue
        with console.status(f"pricing {point['id']} ..."):
            steps_per_s, gpu = predict_inference(point)
        rows.append({"id": point["id"], "kind": "inference", "gpu": gpu, "unet_batch": point["unet_batch"],
                     "measured": float(point["value"]), "predicted": steps_per_s,
                     "error": steps_per_s / float(point["value"]) - 1, "source_url": point.get("source_url")})
    table = Table(title="pase's predicted training throughput against published measurements")
    for column in ("point", "cluster", "per GPU", "measured img/s", "priced as", "predicted img/s", "error",
                   "pase plan img/s"):
        table.add_column(column, justify="left" if column in ("point", "cluster", "priced as") else "right")
    for row in (r for r in rows if r["kind"] == "training"):
        if "skipped" in row:
            table.add_row(row["id"], "", "", "", "", "", row["skipped"], "")
            continue
        table.add_row(row["id"], row["cluster"], str(row["per_gpu_batch"]), f"{row['measured_images_per_s']:,.1f}",
                      row["priced_as"], f"{row['predicted_images_per_s']:,.1f}", f"{row['error']:+.0%}",
                      f"{row['plan_images_per_s']:,.1f}")
    console.print(table)
    sampling = Table(title="pase's sample planner against published sampling figures "
                           "(SD-v2 as sd2-unet at 768 px)")
    for column in ("point", "cluster", "priced as", "measured", "predicted", "error"):
        sampling.add_column(column, justify="left" if column in ("point", "cluster", "priced as") else "right")
    for row in (r for r in rows if r["kind"] == "sampling"):
        if "skipped" in row:
            sampling.add_row(row["id"], "", row["skipped"], "", "", "")
            continue
        unit = " s" if row["unit"] == "seconds" else "x"
        sampling.add_row(row["id"], row["cluster"], row["priced_as"], f"{row['measured']:.2f}{unit}",
                         f"{row['predicted']:.2f}{unit}", f"{row['error']:+.0%}")
    console.print(sampling)
    inference = Table(title="pase's network call against published inference steps (SD-1.5 at 512 px, SDXL at 1024 "
                            "px; fp16, eager; the UNet's batch is twice the images under guidance)")
    for column in ("point", "GPU", "UNet batch", "measured steps/s", "predicted steps/s", "error"):
        inference.add_column(column, justify="left" if column in ("point", "GPU") else "right")
    for row in (r for r in rows if r["kind"] == "inference"):
        if "skipped" in row:
            inference.add_row(row["id"], "", "", "", "", row["skipped"])
            continue
        inference.add_row(row["id"], row["gpu"], str(row["unet_batch"]), f"{row['measured']:.2f}",
                          f"{row['predicted']:.2f}", f"{row['error']:+.0%}")
    console.print(inference)
    summary: dict[str, Any] = {}
    priced = {kind: [r for r in rows if r["kind"] == kind and "error" in r] for kind in ("training", "sampling",
                                                                                        "inference")}
    for kind, chosen in (("training", priced["training"]),
                         ("training (published only)", [r for r in priced["training"] if r["published"]]),
                         ("sampling", priced["sampling"]), ("inference", priced["inference"])):
        errors = [abs(row["error"]) for row in chosen]
        summary[kind] = {"points": len(errors), "mean_abs_error": statistics.fmean(errors) if errors else None,
                         "worst_abs_error": max(errors, default=None)}
        if errors:
            console.print(f"{kind}: {len(errors)} points, mean absolute error {statistics.fmean(errors):.1%}, worst "
                          f"{max(errors):.1%} (targets: 15% and 25% for training, 25% for sampling; none set for "
                          "inference steps)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
