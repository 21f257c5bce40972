"""The layer graph of real diffusion UNets: structure, shapes, maps, both capture paths."""
from __future__ import annotations

from math import prod

import networkx as nx
import pytest
import torch

from pase.graph import extract, extract_model
from pase.graph.rules import ROLES
from pase.models.zoo import ZOO

REQUIRED = ("op", "module", "dims", "roles", "tensors", "flops_fwd", "flops_bwd", "param_bytes", "param_count",
            "out_bytes", "block", "index")


@pytest.fixture(scope="module")
def tiny():
    return extract_model("unet-tiny", 2)


@pytest.fixture(scope="module")
def sd15():
    return extract_model("sd15-unet", 2)


def test_every_layer_is_described(tiny) -> None:
    assert nx.is_directed_acyclic_graph(tiny.graph)
    assert isinstance(tiny.graph, nx.MultiDiGraph)
    for layer_id, data in tiny.layers():
        for key in REQUIRED:
            assert key in data, (layer_id, key)
        assert set(data["dims"]) == set(data["roles"])
        assert set(data["roles"].values()) <= set(ROLES)
        assert all(extent >= 1 for extent in data["dims"].values())
        for dim in data["tensors"]["output"]:
            assert dim is None or dim in data["dims"]


def test_op_kinds_cover_a_diffusion_unet(tiny) -> None:
    ops = {data["op"] for _, data in tiny.layers()}
    assert {"input", "conv", "linear", "attention", "group_norm", "upsample", "elementwise", "concat"} <= ops
    # SiLU is fused into its producer (GroupNorm), never a layer of its own
    norms = [data for _, data in tiny.layers() if data["op"] == "group_norm"]
    assert any("silu" in data["fused_ops"] for data in norms)


def test_conv_dims_and_maps(tiny) -> None:
    conv = tiny["down_blocks.0.downsamplers.0.conv"]
    assert conv["op"] == "conv"
    assert conv["dims"] == {"n": 2, "c_out": 32, "c_in": 32, "h": 16, "w": 16, "kh": 3, "kw": 3}
    assert conv["roles"]["c_in"] == "reduction" and conv["roles"]["kh"] == "kernel"
    assert conv["tensors"]["operands"][0] == ["n", "c_in", "h", "w"]
    assert conv["tensors"]["operands"][1] == ["c_out", "c_in", "kh", "kw"]
    assert conv["param_count"] == 32 * 32 * 9 + 32
    assert conv["attrs"]["stride"] == [2, 2]


def test_edges_carry_shapes_and_consistent_maps(tiny) -> None:
    for src, dst, data in tiny.graph.edges(data=True):
        assert len(data["src_map"]) == len(data["shape"]), (src, dst)
        assert len(data["dst_map"]) == len(data["dst_shape"]), (src, dst)
        assert len(data["axis_map"]) == len(data["dst_shape"]), (src, dst)
        assert data["bytes"] <= prod(data["shape"]) * data["dtype_bytes"]
        consumer = tiny[dst]["dims"]
        for dim in data["dst_map"]:
            assert dim is None or dim in consumer, (src, dst, dim)


def test_attention_reads_heads_through_folded_views(tiny) -> None:
    """to_q's (B, S, C) output is viewed to (B, heads, S, d): the edge records the split."""
    edges = [d for s, t, d in tiny.graph.edges(data=True) if s.endswith("to_q") and tiny[t]["op"] == "attention"]
    assert edges
    edge = edges[0]
    assert edge["shape"][1] == edge["dst_shape"][2]  # sequence
    assert edge["dst_map"] == ["n", "heads", "q", "d"]
    assert edge["axis_map"][1] == [2] and edge["axis_map"][3] == [2]  # heads and d both come from channels
    assert edge["views"]


def test_skip_connections_are_encoder_to_decoder_edges(sd15) -> None:
    skips = sd15.skip_edges()
    # SD-1.5 keeps 12 encoder feature maps for its decoder (conv_in, 8 resnet/attention outputs, 3 downsamplers)
    assert len({(s, d["tensor"]) for s, _, d in skips}) == 12
    for _, dst, data in skips:
        assert sd15[dst]["op"] == "concat"
        assert sd15[dst]["module"].startswith("up_blocks")
        assert data["dst_map"][1] == "c"


def test_cross_attention_reads_the_text_context(sd15) -> None:
    context = "input:encoder_hidden_states/input"
    consumers = {sd15[dst]["op"] for _, dst in sd15.graph.out_edges(context)}
    assert consumers == {"linear"}  # to_k / to_v of every cross-attention
    assert sd15.graph.out_degree(context) == 2 * 16  # 16 transformer blocks, k and v each
    attention = [d for _, d in sd15.layers() if d["op"] == "attention" and d["dims"]["kv"] == 77]
    assert len(attention) == 16


def test_parameters_are_counted_once(tiny, sd15) -> None:
    assert tiny.param_count == tiny.meta["model_param_count"] == 702_499
    assert sd15.param_count == sd15.meta["model_param_count"] == 859_520_964


def test_both_capture_paths_agree_on_our_unet() -> None:
    exported = extract_model("pase-unet", 2, method="export")
    traced = extract_model("pase-unet", 2, method="symbolic_trace")
    assert exported.meta["capture"] == "export" and traced.meta["capture"] == "symbolic_trace"
    def summary(graph):
        return [(layer_id, data["op"], data["dims"]) for layer_id, data in graph.layers()]

    assert summary(exported) == summary(traced)
    assert sorted((s, t) for s, t in exported.graph.edges()) == sorted((s, t) for s, t in traced.graph.edges())


def test_matmul_softmax_matmul_becomes_attention() -> None:
    graph = extract_model("pase-unet", 2, method="symbolic_trace")
    attention = [(i, d) for i, d in graph.layers() if d["op"] == "attention"]
    assert len(attention) == 3
    layer_id, data = attention[0]
    assert data["attrs"]["attention_of"] == "matmul-softmax-matmul"
    assert data["dims"] == {"n": 2, "heads": 4, "q": 256, "kv": 256, "d": 16}
    # q, k and v are three slices of one qkv linear: three edges between the same two layers
    producers = [s for s, _ in graph.graph.in_edges(layer_id)]
    assert len(producers) == 3 and len(set(producers)) == 1


def test_diffusers_unets_need_meta_trace_or_export() -> None:
    """symbolic_trace cannot follow diffusers' control flow; auto capture takes meta_trace, export also works."""
    from pase.errors import GraphCaptureError

    with pytest.raises(GraphCaptureError, match="symbolic_trace"):
        extract_model("unet-tiny", 2, method="symbolic_trace")
    assert extract_model("unet-tiny", 2).meta["capture"] == "meta_trace"
    assert extract_model("unet-tiny", 2, method="export").meta["capture"] == "export"


def test_extract_on_a_user_module_with_real_weights() -> None:
    from user_models import TinyConvNet

    graph = extract(TinyConvNet(), (torch.randn(2, 3, 8, 8),))
    assert [d["op"] for _, d in graph.layers()] == ["input", "conv", "conv"]
    assert "relu" in graph["stem"]["fused_ops"]


def test_capture_is_on_meta(sd15) -> None:
    assert sd15.meta["dtype"] == "float32"
    assert sd15.meta["inputs"]["encoder_hidden_states"] == [2, 77, 768]


def test_bf16_capture_halves_bytes() -> None:
    fp32 = extract_model("unet-tiny", 2)
    bf16 = extract_model("unet-tiny", 2, dtype=torch.bfloat16)
    assert bf16.meta["dtype"] == "bfloat16"
    assert 2 * bf16.total("param_bytes") == fp32.total("param_bytes")


def test_sd2_unet_has_64_channel_heads_and_a_1024_wide_context() -> None:
    """SD 2's UNet (stabilityai/stable-diffusion-2's config): its published 865,910,724 parameters, every attention
    head 64 channels wide (SD-1.5's are 40, 80 and 160), 96x96 latents (768 px), cross-attention over 77 x 1024."""
    graph = extract_model("sd2-unet", 1)
    assert graph.param_count == 865_910_724
    attention = [d for _, d in graph.layers() if d["op"] == "attention"]
    assert len(attention) == 32 and {d["dims"]["d"] for d in attention} == {64}
    assert max(d["dims"]["q"] for d in attention) == 96 * 96
    assert {d["dims"]["kv"] for d in attention if d["dims"]["kv"] != d["dims"]["q"]} == {77}
    context = "input:encoder_hidden_states/input"
    assert graph.graph.out_degree(context) == 2 * 16


@pytest.mark.slow
def test_sdxl_capture() -> None:
    graph = extract_model("sdxl-unet", 1)
    assert graph.param_count == 2_567_463_684
    assert len(graph.skip_edges()) >= 9


def test_zoo_configs_are_plain_data() -> None:
    import json

    for spec in ZOO.values():
        json.dumps(spec.config)


@pytest.mark.parametrize("method", ["meta_trace", "export", "symbolic_trace"])
def test_parameters_used_through_views_are_owned(method: str) -> None:
    from user_models import ParamViews

    with torch.device("meta"):
        model = ParamViews()
    graph = extract(model, (torch.zeros(2, 16, 8, device="meta"),), method=method)
    assert graph.param_count == 16 * 8 + 8 * 8 + 8
    assert graph.meta["flops_fwd"] == 2 * 2 * 16 * 8 * 8


def _comparable(graph) -> tuple:
    meta = {k: v for k, v in graph.meta.items() if k not in ("capture_seconds", "rescaled_from_batch", "cached")}
    edges = sorted((s, d, sorted(data.items())) for s, d, data in graph.graph.edges(data=True))
    return list(graph.layers()), edges, sorted(meta.items(), key=str)


@pytest.mark.parametrize(("name", "captured", "wanted"), [("unet-tiny", 2, 6), ("pase-unet", 4, 2)])
def test_rescaling_the_batch_equals_capturing_at_it(name: str, captured: int, wanted: int) -> None:
    from pase.graph.rescale import with_batch

    rescaled = with_batch(extract_model(name, captured), wanted)
    assert rescaled is not None and rescaled.meta["rescaled_from_batch"] == captured
    assert _comparable(rescaled) == _comparable(extract_model(name, wanted))


def test_rescaling_refuses_what_it_cannot_tell_apart() -> None:
    from pase.graph.rescale import with_batch

    assert with_batch(extract_model("pase-unet", 1), 4) is None  # at batch 1 a broadcast looks like a batch axis
    odd = extract_model("pase-unet", 2)
    layer = next(layer_id for layer_id, data in odd.layers() if "n" in data["dims"])
    odd[layer]["dims"]["n"] = 3  # a batch dimension that does not match the graph's batch
    assert with_batch(odd, 4) is None
