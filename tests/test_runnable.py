"""A plan is a promise: the default search space is exactly what the runtime runs, the runtime refuses the rest
by name, `--force` pins layers, and the predicted communication bytes follow the runtime's collectives."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cost_models.cluster import parse_spec
from cost_models.layer_costs import CostModel, CostOptions
from cost_models.rates import HardwareRates
from pase.errors import PaseError
from pase.graph import extract_model
from pase.planning.per_layer import PlanOptions, plan_graph
from pase.runtime.layout import PlanNotRunnable, layer_layouts
from strategies.runnable import KEPT_RULE, LayerRun, edge_mode, layer_run, runnable_reason
from strategies.splits import SplitSpace, split_space

SD15_CLUSTER = "8x8xH100-SXM+IB-NDR400x8"


@pytest.fixture(scope="module")
def tiny():
    return extract_model("unet-tiny", 16)


@pytest.fixture(scope="module")
def sd15():
    return extract_model("sd15-unet", 64)


def _first(graph, op: str) -> tuple[str, dict]:
    return next((layer_id, data) for layer_id, data in graph.layers() if data["op"] == op)


def _dim(data: dict, role: str) -> str:
    return next(d for d, r in data["roles"].items() if r == role)


def _wide_conv(graph, role: str) -> tuple[str, dict]:
    """The first convolution with at least 64 channels of ``role`` (so 2- and 4-way splits are in its space)."""
    return next((i, d) for i, d in graph.layers() if d["op"] == "conv" and d["dims"][_dim(d, role)] >= 64)


def test_runnable_configurations(tiny) -> None:
    _, conv = _wide_conv(tiny, "reduction")
    n, c_out, c_in = _dim(conv, "batch"), _dim(conv, "out_channel"), _dim(conv, "reduction")
    assert layer_run(conv, {n: 4}, 4).kind == "batch"
    assert layer_run(conv, {n: 2, c_out: 2}, 4).kind == "out" and layer_run(conv, {n: 2, c_out: 2}, 4).factor == 2
    assert layer_run(conv, {n: 1, c_in: 4}, 4).kind == "in"
    grid = layer_run(conv, {n: 1, c_out: 2, c_in: 2}, 4)  # output x input channels on a 2 x 2 grid of ranks
    assert (grid.kind, grid.factor, grid.inner, grid.ranks, grid.label) == ("grid", 2, 2, 4, "grid/2x2")
    assert "uses 4 of 8 ranks" in runnable_reason(conv, {c_out: 2, c_in: 2}, 8)
    assert "only as output x input channels" in runnable_reason(conv, {c_in: 2, "h": 2}, 4)
    rows = layer_run(conv, {n: 1, c_out: 2, "h": 2}, 4)  # output channels x rows on a 2 x 2 grid
    assert rows == LayerRun("outspatial", 2, c_out, inner=2, inner_dim="h") and rows.label == "outspatial/2x2"
    assert "no FSDP runtime" in runnable_reason(conv, {n: 1, c_out: 2, "h": 2}, 4, fsdp=True)
    assert "uses 2 of 4 ranks" in runnable_reason(conv, {c_in: 2}, 4)  # idle devices
    assert layer_run(conv, {c_out: 2}, 4) == LayerRun("out", 2, c_out, replicas=2)  # 2 replicas of each part
    assert "no FSDP runtime" in runnable_reason(conv, {c_out: 2}, 4, fsdp=True)
    assert layer_run(conv, {n: 2}, 4) == LayerRun("replicated", 2)  # 2 groups of 2 replicas
    assert layer_run(conv, {}, 4).label == "replicated/4"  # unsplit: every rank computes the whole batch
    assert "do not form equal groups" in runnable_reason(conv, {n: 2}, 3)
    adds = [data for _, data in tiny.layers() if data["op"] == "elementwise" and len(data["tensors"]["inputs"]) == 2]
    assert "whole Conv2d, Linear" in runnable_reason(adds[0], {n: 2}, 4)  # a residual add is no module of its own
    assert layer_run(conv, {n: 2, c_out: 2}, 4, fsdp=True).kind == "out"  # FSDP shards the shards (2-D mesh)
    assert layer_run(conv, {n: 2, "h": 2}, 4) == LayerRun("spatial", 2, "h")  # rows, with a halo exchange
    down = next(d for i, d in tiny.layers() if i.endswith("downsamplers.0.conv"))
    assert "stride 1" in runnable_reason(down, {"n": 2, "h": 2}, 4)  # strided convolutions are not split by rows
    _, norm = _first(tiny, "group_norm")
    norm_split = {_dim(norm, "batch"): 2, _dim(norm, "channel"): 2}
    assert layer_run(norm, norm_split, 4) == LayerRun("local", 2, _dim(norm, "channel"))  # whole groups per rank
    assert "cut its 8 groups" in runnable_reason(norm, {_dim(norm, "channel"): 16}, 16)
    assert layer_run(norm, norm_split, 4, fsdp=True).kind == "local"
    assert layer_run(norm, {_dim(norm, "batch"): 2, "h": 2}, 4).kind == "spatial"  # statistics summed over the group
    _, attention = _first(tiny, "attention")
    assert layer_run(attention, {_dim(attention, "batch"): 2, _dim(attention, "head"): 2}, 4).kind == "heads"
    assert layer_run(attention, {_dim(attention, "batch"): 2, "q": 2}, 4) == LayerRun("seq", 2, "q")
    assert "distributed softmax" in runnable_reason(attention, {_dim(attention, "batch"): 2, "kv": 2}, 4)


def test_kept_layouts_pair_a_resnet_block(tiny) -> None:
    """conv1 out-split -> time-embedding add and norm2 on their channel part -> conv2 in-split keep the
    activation channel-split (no collective); a channel-split layer next to a batch layout cannot run, and an
    out-split with two consumers cannot keep its output for one of them."""
    block = "down_blocks.1.resnets.0"
    conv1, add, norm2, conv2, emb = (f"{block}.conv1", f"{block}/elementwise", f"{block}.norm2", f"{block}.conv2",
                                     f"{block}.time_emb_proj")
    runs = {conv1: LayerRun("out", 2, "c_out"), emb: LayerRun("out", 2, "c_out"), add: LayerRun("local", 2, "c"),
            norm2: LayerRun("local", 2, "c"), conv2: LayerRun("in", 2, "c_in")}

    def mode(src: str, dst: str, source: LayerRun | None = None, target: LayerRun | None = None) -> str | None:
        edge = tiny.graph.get_edge_data(src, dst)[0]
        return edge_mode(edge, tiny[src], source or runs[src], tiny[dst], target or runs[dst],
                         tiny.graph.out_degree(src))

    assert [mode(*pair) for pair in ((conv1, add), (emb, add), (add, norm2), (norm2, conv2))] == ["kept"] * 4
    batch = LayerRun("batch")
    assert mode(norm2, conv2, target=batch) is None and mode(conv1, add, source=batch) is None
    assert mode(norm2, conv2, target=LayerRun("in", 4, "c_in")) is None  # another degree: another group
    assert mode(conv1, add, target=batch) == "batch" == mode(norm2, conv2, source=batch)
    wide = "conv_in"  # three consumers: its out-split output returns to the batch layout
    consumer = next(iter(tiny.graph.successors(wide)))
    assert mode(wide, consumer, LayerRun("out", 2, "c_out"), LayerRun("local", 2, "c")) is None


def test_kept_layouts_pair_an_attention(tiny) -> None:
    """q, k, v out-split -> attention on its heads -> to_out in-split keep the head channels in place (a diffusers
    Attention, whose processor the runtime replaces); attention built from matmul and softmax is not head-split."""
    block = "down_blocks.1.attentions.0"
    attention = f"{block}/attention"
    heads, out, to_in = LayerRun("heads", 2, "heads"), LayerRun("out", 2, "c_out"), LayerRun("in", 2, "c_in")

    def mode(src: str, dst: str, source: LayerRun, target: LayerRun, graph=tiny) -> str | None:
        edge = graph.graph.get_edge_data(src, dst)[0]
        return edge_mode(edge, graph[src], source, graph[dst], target, graph.graph.out_degree(src))

    for projection in ("to_q", "to_k", "to_v"):
        assert mode(f"{block}.{projection}", attention, out, heads) == "kept"
    assert mode(attention, f"{block}.to_out.0", heads, to_in) == "kept"
    assert mode(attention, f"{block}.to_out.0", heads, LayerRun("batch")) == "batch"
    other_module = {**tiny[attention], "module_class": "my.models.Attention"}  # its processor is not replaced
    edge = tiny.graph.get_edge_data(f"{block}.to_q", attention)[0]
    assert edge_mode(edge, tiny[f"{block}.to_q"], out, other_module, heads, 1) == "batch"
    own = extract_model("pase-unet", 8)
    layer_id, folded = _first(own, "attention")
    assert folded["attrs"]["attention_of"] == "matmul-softmax-matmul"
    assert "no runtime" in runnable_reason(folded, {_dim(folded, "batch"): 4, _dim(folded, "head"): 2}, 8)


def test_geglu_projection_splits_its_rows_only_as_a_kept_pair() -> None:
    """A GEGLU projection (chunk, gelu and product fused after it) out-splits with interleaved rows, its output
    channels F split with its 2F projection channels, and only with its output kept for an in-split of the
    feed-forward's second linear; row shards gather back to the full weight's order."""
    import torch

    from pase.graph.gating import gated_dims
    from strategies.tensor import ordered_rows, rows_of

    graph = extract_model("sd-tiny", 8)
    block = "mid_block.attentions.0.transformer_blocks.0.ff"
    proj, second = f"{block}.net.0.proj", f"{block}.net.2"
    projected, output = gated_dims(graph[proj])
    assert graph[proj]["dims"][projected] == 2 * graph[proj]["dims"][output] and gated_dims(graph[second]) is None
    run = layer_run(graph[proj], {projected: 2}, 2)
    assert run == LayerRun("out", 2, output, gated=True)
    edge = graph.graph.get_edge_data(proj, second)[0]
    assert edge_mode(edge, graph[proj], run, graph[second], LayerRun("in", 2, "c_in"), 1) == "kept"
    assert edge_mode(edge, graph[proj], run, graph[second], LayerRun("batch"), 1) is None  # 2F channels back: no
    weight = torch.arange(24.0).reshape(12, 2)  # rows: h (0..5), g (6..11)
    parts = [rows_of(weight, 3, rank, halves=2) for rank in range(3)]
    assert parts[1][:, 0].tolist() == [4.0, 6.0, 16.0, 18.0]  # rank 1: its third of h, then of g
    assert torch.equal(ordered_rows(torch.cat(parts), 3, halves=2), weight)


def test_forced_channel_split_without_kept_neighbours_is_refused(tiny) -> None:
    cluster = parse_spec("2xL40S")
    alone = {"down_blocks.1.resnets.0/elementwise_1": {"c": 2}}  # the residual add: conv2's sums arrive batch-split
    with pytest.raises(PaseError, match="leaves no runnable plan.*" + KEPT_RULE[:40]):
        plan_graph(tiny, cluster, options=PlanOptions(force=alone))
    plan = plan_graph(tiny, cluster, options=PlanOptions(force={"down_blocks.1.resnets.0.norm2": {"c": 2}}))
    chosen = {layer.id: layer.splits for layer in plan.layers}
    assert chosen["down_blocks.1.resnets.0.conv1"] == {"c_out": 2}  # the search gives the norm its kept neighbours
    assert chosen["down_blocks.1.resnets.0.conv2"] == {"c_in": 2}
    assert all(layout.kind != "local" or layout.factor == 2 for layout in layer_layouts(plan, tiny))


def test_default_sd15_plan_at_64_gpus_runs_as_planned(sd15) -> None:
    plan = plan_graph(sd15, parse_spec(SD15_CLUSTER))
    assert all(layer.runnable for layer in plan.layers)
    layouts = layer_layouts(plan, sd15)  # the runtime's own check, without a process group
    assert len(layouts) == len(plan.layers) == len(sd15)
    kinds = {layout.kind for layout in layouts}  # batch and tensor splits and kept layouts, all runnable (small layers
    # split their channels rather than replicate: each rank's AdamW then updates a slice of their weights)
    assert "batch" in kinds and {"out", "in", "grid"} <= kinds
    assert any(layout.keep_output for layout in layouts) and any(layout.kept_input for layout in layouts)
    assert plan.predicted.step_seconds < plan.baselines["ddp"].step_seconds
    assert plan.predicted.comm_bytes_per_device > 0
    wide = plan_graph(sd15, parse_spec(SD15_CLUSTER), options=PlanOptions(space="all"))
    refused = [layer for layer in wide.layers if not layer.runnable]
    assert refused and wide.options["space"] == "all"
    with pytest.raises(PlanNotRunnable, match=f"{refused[0].id} \\({refused[0].op}"):
        layer_layouts(wide, sd15)


def test_ddp_bytes_are_the_gradient_all_reduce(tiny) -> None:
    """A batch-only plan moves exactly DDP's all-reduce of every gradient: 2 (p - 1) / p x the gradient bytes."""
    plan = plan_graph(tiny, parse_spec("4xL40S"), options=PlanOptions(only="dp", precision="fp32"))
    params = sum(p["numel"] for _, data in tiny.layers() for p in data["params"].values() if p.get("trainable"))
    assert plan.predicted.comm_bytes_per_device == pytest.approx(2 * 3 / 4 * params * 4, rel=1e-9)
    assert plan.baselines["ddp"].comm_bytes_per_device == pytest.approx(plan.predicted.comm_bytes_per_device)


def test_partial_sums_are_reduce_scattered_between_batch_layouts(tiny) -> None:
    """Between layers activations are batch-sharded, so a row-parallel layer's partial sums are reduce-scattered
    to batch chunks and its gradient all-gathered back (priced with the layer: together the bytes of the
    all-reduce the unrestricted space prices), and its edges to the next layers have no way left to go."""
    cluster = parse_spec("4xL40S")
    _, conv = _wide_conv(tiny, "reduction")
    n, c_in = _dim(conv, "batch"), _dim(conv, "reduction")
    space = SplitSpace((n, c_in), np.array([[2, 2]]))
    moved = {}
    for interface in (False, True):
        parts: dict = {}
        model = CostModel(cluster, HardwareRates(cluster), CostOptions(overlap_gradients=False,
                                                                       batch_interface=interface))
        model.layer_costs(conv, space, parts=parts)
        moved[interface] = float(parts["comm_bytes"][0])
    out = np.prod([conv["dims"][d] for d in conv["tensors"]["output"]]) / 2 * 2  # batch half, bf16
    weights = sum(p["numel"] for p in conv["params"].values() if p.get("trainable"))
    bias = conv["dims"][_dim(conv, "out_channel")] * 2  # added after the reduce-scatter: summed over all 4 ranks
    reduce_scatter_and_gather, all_reduce = 2 * out * 1 / 2, out * 2 * 1 / 2
    assert moved[True] - reduce_scatter_and_gather - bias * 2 * 3 / 4 == \
        pytest.approx(moved[False] - all_reduce - bias * 2 * 1 / 2, rel=1e-6)
    assert moved[True] > weights  # the weight gradients are still all-reduced over the data-parallel pair


def test_force_pins_layers_and_refuses_what_does_not_run(tiny) -> None:
    cluster = parse_spec("4xL40S")
    layer_id, conv = _wide_conv(tiny, "out_channel")
    n, c_out = _dim(conv, "batch"), _dim(conv, "out_channel")
    plan = plan_graph(tiny, cluster, options=PlanOptions(force={layer_id: {n: 2, c_out: 2}}))
    assert next(layer for layer in plan.layers if layer.id == layer_id).splits == {n: 2, c_out: 2}
    wide_in, wide_conv = _wide_conv(tiny, "reduction")
    c_in = _dim(wide_conv, "reduction")
    with pytest.raises(PaseError, match="uses 2 of 4 ranks"):
        plan_graph(tiny, cluster, options=PlanOptions(force={wide_in: {c_in: 2}}))
    with pytest.raises(PaseError, match="no layer id matches"):
        plan_graph(tiny, cluster, options=PlanOptions(force={"no_such_layer*": {n: 4}}))
    wide = plan_graph(tiny, cluster, options=PlanOptions(space="all", force={wide_in: {c_in: 2}}))
    assert not next(layer for layer in wide.layers if layer.id == wide_in).runnable


@pytest.mark.slow  # 15 s of CLI runs
def test_cli_force_and_space(tmp_path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pase", "plan", "--model", "unet-tiny", "--cluster", "4xL40S",
                               "--batch", "16", *args], capture_output=True, text=True, timeout=300)

    out = tmp_path / "plan.json"
    result = run("--force", "down_blocks.1.*conv1=n:2,c_out:2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "all 104 layers run as planned" in result.stdout
    forced = [layer for layer in json.loads(out.read_text())["layers"] if "down_blocks.1" in layer["id"]
              and layer["id"].endswith("conv1")]
    assert forced and all(layer["splits"] == {"n": 2, "c_out": 2} and layer["runnable"] for layer in forced)
    bad = run("--force", "conv_in=n:2:x")
    assert bad.returncode != 0 and "DIM:FACTOR" in bad.stderr and "Traceback" not in bad.stderr
    wide = run("--space", "all", "--force", "down_blocks.1.*conv2=c_in:2")
    assert wide.returncode == 0 and "not runnable" in wide.stdout
    narrow = "down_blocks.1.resnets.0.conv1=n:1,c_out:4"  # 64 output channels: 16 a device, under the default 32
    assert "it is not one of its splits" in " ".join(run("--force", narrow).stderr.split())
    assert run("--force", narrow, "--min-chunk", "out_channel:16").returncode == 0
    bad_chunk = run("--min-chunk", "kernel:1")
    assert bad_chunk.returncode != 0 and "ROLE:SIZE" in bad_chunk.stderr and "Traceback" not in bad_chunk.stderr


def test_every_default_configuration_is_runnable(tiny) -> None:
    """The search's default space, layer by layer, is a subset of what the runtime runs."""
    from pase.planning.per_layer import layer_space

    for devices in (2, 4, 8):
        for layer_id, data in tiny.layers():
            space, mask = layer_space(layer_id, data, devices, PlanOptions())
            assert mask.all() and len(space) >= 1
            for k in range(len(space)):
                assert runnable_reason(data, space.config(k), devices) is None
            assert len(space) <= len(split_space(data, devices))


def test_checkpointed_dp_plan_is_priced_as_its_ddp_baseline(tiny) -> None:
    """The DDP baseline prices checkpointing's re-run blocks as the plan does (whole blocks re-run)."""
    plan = plan_graph(tiny, parse_spec("4xL40S"), options=PlanOptions(only="dp", checkpointing=True))
    assert plan.predicted.step_seconds == pytest.approx(plan.baselines["ddp"].step_seconds, rel=1e-9)
    assert plan.predicted.comm_bytes_per_device == pytest.approx(plan.baselines["ddp"].comm_bytes_per_device)
