"""The kernel physics of the cost model (cost_models.kernels): wave quantisation, split-K, per-kernel floors, and
the host's dispatch time on an eager stack."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cost_models.catalog import Catalog
from cost_models.cluster import parse_spec
from cost_models.kernels import (
    KernelModel,
    flash_head_dim,
    host_bound,
    host_ops_per_step,
    kernels_per_step,
    layer_utilization,
    queued_seconds,
)
from cost_models.layer_costs import CostModel, CostOptions
from cost_models.rates import HardwareRates
from pase.errors import PaseError
from pase.graph import extract, extract_model
from pase.planning import PlanOptions
from strategies.splits import SplitSpace

H100 = KernelModel(sm_count=132, floor_s=1e-6)


def test_waves_hand_computed() -> None:
    # 256 x 256 outputs: 4 tiles on 132 SMs, and a reduction too short to split: 4 / 132 busy
    assert H100.utilization(np.array([256.0]), np.array([256.0]), 256.0)[0] == pytest.approx(4 / 132)
    # 133 tiles: two waves, the second holding one tile
    assert H100.utilization(np.array([133 * 128.0]), np.array([128.0]), 128.0)[0] == pytest.approx(133 / 264)
    # 132 tiles: one full wave
    assert H100.utilization(np.array([132 * 128.0]), np.array([128.0]), 128.0)[0] == pytest.approx(1.0)


def test_split_k_fills_the_machine_when_the_reduction_is_long() -> None:
    # 4 tiles over a 1M-long reduction split 33 ways: 132 pieces, one full wave
    assert H100.utilization(np.array([256.0]), np.array([256.0]), 2.0**20)[0] == pytest.approx(1.0)
    # a reduction of 2,048 splits only 4 ways (slices of at least 512): 16 of 132 SMs
    assert H100.utilization(np.array([256.0]), np.array([256.0]), 2048.0)[0] == pytest.approx(16 / 132)


def test_attention_tiles_queries_per_stream() -> None:
    # 8 heads x 2 samples x 4,096 / 128 query tiles = 512 tiles: 4 waves of 132, the last 116 full
    assert H100.attention_utilization(np.array([4096.0]), np.array([16.0]))[0] == pytest.approx(512 / 528)
    # SD-1.5's 40-channel heads run on FlashAttention-2's 64-channel kernel: 40/64 of its work is useful
    assert H100.attention_utilization(np.array([4096.0]), np.array([16.0]), 40.0)[0] == \
        pytest.approx(512 / 528 * 40 / 64)


def test_flash_kernels_pad_heads_to_their_head_dim() -> None:
    dims = np.array([8.0, 40.0, 64.0, 80.0, 160.0, 200.0, 256.0, 320.0])
    assert flash_head_dim(dims).tolist() == [32.0, 64.0, 64.0, 96.0, 160.0, 256.0, 256.0, 320.0]


def test_attention_layers_are_priced_at_their_padded_head_dim() -> None:
    """The layer graph's head dim (role ``reduction``) reaches the utilisation: SD-1.5's first self-attention has
    40-channel heads."""
    layer = next(d for _, d in extract_model("sd15-unet", 1, use_cache=True).layers() if d["op"] == "attention")
    local = {d: np.array([float(e)]) for d, e in layer["dims"].items()}
    waves = H100.attention_utilization(np.array([4096.0]), np.array([8.0]))
    assert layer["dims"]["d"] == 40
    assert layer_utilization(H100, layer, local)[0] == pytest.approx(waves[0] * 40 / 64)


def test_kernel_counts() -> None:
    assert kernels_per_step("conv", 0) == 3  # forward; input and weight gradients
    assert kernels_per_step("group_norm", 1) == 4  # norm + fused SiLU, each forward and backward
    assert kernels_per_step("linear", 2, training=False) == 3


def test_catalog_gives_every_gpu_its_sms_and_a_floor() -> None:
    catalog = Catalog.load()
    for gpu_id in catalog.gpu_ids():
        gpu = catalog.gpu(gpu_id)
        assert gpu.sm_count > 0 and gpu.kernel_floor_us > 0, gpu_id
    assert catalog.gpu("H100-SXM").sm_count == 132 and catalog.gpu("A100-80GB-SXM").sm_count == 108


def _conv_layer(batch: int) -> dict:
    with torch.device("meta"):
        conv = nn.Conv2d(1280, 1280, 3, padding=1)
    graph = extract(conv, (torch.zeros(batch, 1280, 8, 8, device="meta"),))
    return next(data for _, data in graph.layers() if data["op"] == "conv")


def test_small_per_device_work_is_slower_per_sample() -> None:
    """SD's 8x8 convolution: at batch 1 its 64 rows make 10 tiles, which split-K spreads over 130 of 132 SMs, and
    reading its 29.5 MB of weights bounds it; at batch 64 the weights are shared by 64 samples."""
    cluster = parse_spec("1xH100-SXM")
    model = CostModel(cluster, HardwareRates(cluster), CostOptions(precision="bf16", stack="graphed"))
    space = SplitSpace(("n",), np.array([[1]]))
    small, big = _conv_layer(1), _conv_layer(64)
    per_sample_small = model.layer_costs(small, space)[0][0]
    per_sample_big = model.layer_costs(big, space)[0][0] / 64
    assert per_sample_small > 4 * per_sample_big
    local = {d: np.array([float(e)]) for d, e in small["dims"].items()}
    assert layer_utilization(model.kernels, small, local)[0] == pytest.approx(130 / 132)


def test_host_operator_counts() -> None:
    # a conv's 3 kernels, plus autocast's cast of its weight and bias and of their gradients back
    assert host_ops_per_step("conv", 0, training=True, weight_casts=2) == 3 + 4
    assert host_ops_per_step("linear", 2, training=False) == 3  # inference in the compute precision: no casts
    assert host_ops_per_step("input", 0) == 0 and host_ops_per_step("output", 3) == 0
    eager = KernelModel(sm_count=132, floor_s=1e-6, host_s=30e-6)
    assert host_bound(np.array([1e-5, 1e-3]), 10, eager) == pytest.approx([3e-4, 1e-3])  # host-bound, then GPU
    assert host_bound(np.array([1e-5]), 10, H100)[0] == 1e-5  # a graphed stack pays no host


def test_an_eager_layer_takes_at_least_its_dispatch_time() -> None:
    """SD's 8x8 convolution: at batch 1 its GPU time is below its 7 operators' dispatch (the layer is host-bound on
    pase's eager runtime, whatever the GPU); at batch 64 the GPU work hides the host and both stacks agree. (The
    optimizer's step, once per step, is priced apart from the layer's kernels.)"""
    cluster = parse_spec("1xH100-SXM")
    space = SplitSpace(("n",), np.array([[1]]))

    def kernels_seconds(model: CostModel, layer: dict) -> float:
        parts: dict[str, np.ndarray] = {}
        compute = model.layer_costs(layer, space, parts=parts)[0]
        return float((compute - parts["optimizer"])[0])

    eager, graphed = (CostModel(cluster, HardwareRates(cluster), CostOptions(precision="bf16", stack=stack))
                      for stack in ("eager", "graphed"))
    small, big = _conv_layer(1), _conv_layer(64)
    host_s = cluster.gpu.host_us_per_op * 1e-6
    assert host_s > 0
    assert kernels_seconds(eager, small) == pytest.approx(host_s * (3 + 2 * 2))
    assert kernels_seconds(graphed, small) < kernels_seconds(eager, small)
    assert kernels_seconds(eager, big) == pytest.approx(kernels_seconds(graphed, big))
    assert kernels_seconds(eager, big) > host_s * 7
    # fp32 runs without autocast: no casts to dispatch
    fp32 = CostModel(cluster, HardwareRates(cluster, None, "fp32"), CostOptions(precision="fp32"))
    assert fp32.host_ops(small) == 3 and eager.host_ops(small) == 7
    assert kernels_seconds(fp32, small) >= host_s * 3
    with pytest.raises(ValueError, match="stack"):
        CostOptions(stack="compiled")
    with pytest.raises(PaseError, match="stack"):
        PlanOptions(stack="compiled")


def test_the_launch_queue_hides_dispatch_behind_long_kernels() -> None:
    """Hand-computed: layers of (GPU, host) (1, 3), (10, 1), (1, 1), (1, 4) end at 3, 13, 14, 15. The host
    dispatches layers 3 and 4 while layer 2's long kernel runs, so the chain takes 15 where per-layer maxima sum
    to 18; a second batch column with the GPU times doubled ends at 3, 23, 25, 27."""
    gpu = [np.array([1.0, 2.0]), np.array([10.0, 20.0]), np.array([1.0, 2.0]), np.array([1.0, 2.0])]
    host = [3.0, 1.0, 1.0, 4.0]
    assert queued_seconds(gpu, host) == pytest.approx([15.0, 27.0])
    assert queued_seconds(gpu[:1], host[:1]) == pytest.approx([3.0, 3.0])
    # bounds on random chains: at least either sum, at most the per-layer maxima that host_bound charges
    rng = np.random.default_rng(0)
    for _ in range(50):
        g, h = rng.exponential(1.0, (2, 30))
        total = float(queued_seconds([np.array(x) for x in g], list(h)))
        assert max(g.sum(), h.sum()) - 1e-9 <= total <= np.maximum(g, h).sum() + 1e-9


def test_the_sampler_forward_prices_unfused_kernels_at_their_own_floor() -> None:
    gpu = Catalog.load().gpu("H200-SXM")
    assert gpu.unfused_kernel_floor_us > gpu.kernel_floor_us > 0
    model = KernelModel.for_unfused_forward(gpu, "graphed")
    assert model is not None and model.floor_s == pytest.approx(gpu.unfused_kernel_floor_us * 1e-6)
    assert model.host_s == 0 and KernelModel.for_unfused_forward(gpu).host_s > 0


@pytest.mark.slow  # captures SD-1.5 (about 10 s from an empty cache)
def test_the_unfused_floor_is_the_recorded_graph_replay_less_its_work() -> None:
    """The catalog's unfused floor is the H200 run's SD-1.5 forward replayed from a CUDA graph at batch 1 less
    the roofline's work, over the layer graph's kernels; priced back, the replays at batches 2 and 8 come out
    within 5% of their measurements (fitted on batch 1 alone)."""
    import json
    from dataclasses import replace
    from pathlib import Path

    from pase.sampling.planner import roofline_eval_time

    record = json.loads((Path(__file__).parents[1] / "docs/gpu/h200-2026-12-04b-kernels.json").read_text())
    replays = {r["batch"]: r["seconds_cuda_graph"] for r in record["rows"] if r["op"] == "unet_forward"}
    graph = extract_model("sd15-unet", 1, use_cache=True)
    cluster = parse_spec("1xH200-SXM")
    gpu = cluster.gpu
    kernels = sum(kernels_per_step(data["op"], len(data.get("fused_ops", ())), training=False)
                  for _, data in graph.layers() if data["op"] not in ("input", "output"))
    no_floor = replace(cluster, gpu=replace(gpu, unfused_kernel_floor_us=0.0, kernel_floor_us=0.0))
    work = roofline_eval_time(graph, HardwareRates(no_floor), batches=(1,), stack="graphed").seconds[0]
    assert gpu.unfused_kernel_floor_us == pytest.approx((replays[1] - work) / kernels * 1e6, abs=0.05)
    priced = roofline_eval_time(graph, HardwareRates(cluster), batches=(2, 8), stack="graphed")
    for batch, seconds in zip((2, 8), priced.seconds, strict=True):
        assert seconds == pytest.approx(replays[batch], rel=0.05)


@pytest.mark.slow  # captures SD-1.5 (about 10 s from an empty cache)
def test_the_host_figure_is_the_recorded_forward_over_its_graph_operators() -> None:
    """The catalog's 33.7 us per operator is the H200 run's eager SD-1.5 forward at batch 1 over the operators of
    sd15-unet's layer graph: a measured figure with its source, re-derived here so it cannot drift."""
    import json
    from pathlib import Path

    from pase.graph import extract_model

    record = json.loads((Path(__file__).parents[1] / "docs/gpu/h200-2026-12-04b-kernels.json").read_text())
    forward = next(r for r in record["rows"] if r["op"] == "unet_forward" and r["batch"] == 1)
    assert forward["seconds"] > 3 * forward["seconds_cuda_graph"]  # host-bound: the GPU alone is far faster
    graph = extract_model("sd15-unet", 1, use_cache=True)
    operators = sum(host_ops_per_step(data["op"], len(data.get("fused_ops", ())), training=False)
                    for _, data in graph.layers())
    host_us = Catalog.load().gpu("H200-SXM").host_us_per_op
    assert host_us == pytest.approx(forward["seconds"] / operators * 1e6, rel=2e-3)
