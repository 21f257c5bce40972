"""meta_trace records export's graph: equal OpGraphs and LayerGraphs on every zoo model, a graph that replays
the model, the same plan, and the fallbacks and errors of ``capture``."""
from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pase.errors import GraphCaptureError, InputShapeError
from pase.graph import extract, layer_graph_of
from pase.graph.capture import capture
from pase.graph.ir import OpGraph
from pase.graph.layer_graph import LayerGraph
from pase.graph.meta_trace import meta_trace
from pase.models.zoo import ZOO


@functools.cache
def captured(name: str, batch: int = 2) -> dict[str, tuple[OpGraph, LayerGraph]]:
    """Both captures of one zoo model (built once on meta), as OpGraph and LayerGraph."""
    spec = ZOO[name]
    with torch.device("meta"):
        model = spec.build()
    args, kwargs = spec.example_inputs(batch, device="meta")
    result = {}
    for method in ("meta_trace", "export"):
        op_graph = capture(model, args, kwargs, method)
        result[method] = op_graph, layer_graph_of(op_graph, model, args, kwargs, name=name)
    return result


def op_rows(graph: OpGraph) -> list[tuple]:
    return [(op.name, op.op, tuple(op.operands), op.out, op.module, op.module_class,
             json.dumps(op.attrs, sort_keys=True, default=str)) for op in graph.ops if op.out is not None]


def used_params(graph: OpGraph) -> dict:
    used = {name for op in graph.ops for name in op.operands}
    return {name: ref for name, ref in graph.params.items() if name in used}


def assert_same_capture(name: str) -> None:
    (ops_m, layers_m), (ops_e, layers_e) = captured(name)["meta_trace"], captured(name)["export"]
    assert ops_m.method == "meta_trace" and ops_e.method == "export"
    # op for op: names, canonical ops, operands, shapes, module paths and the attributes layer rules read
    assert op_rows(ops_m) == op_rows(ops_e)
    assert used_params(ops_m) == used_params(ops_e) and (ops_m.inputs, ops_m.outputs) == (ops_e.inputs, ops_e.outputs)

    # the LayerGraph, structurally: layers in order with every attribute, every edge, the skips, the totals
    assert [(i, d["op"], d["block"], d["module"]) for i, d in layers_m.layers()] == \
        [(i, d["op"], d["block"], d["module"]) for i, d in layers_e.layers()]
    assert list(layers_m.layers()) == list(layers_e.layers())  # flops, params, bytes, dims, maps
    edges = [sorted((s, d, sorted(data.items())) for s, d, data in g.graph.edges(data=True))
             for g in (layers_m, layers_e)]
    assert edges[0] == edges[1]
    assert layers_m.skip_edges() == layers_e.skip_edges()
    for key in ("flops_fwd", "flops_bwd", "param_count"):
        assert layers_m.meta[key] == layers_e.meta[key] > 0
    assert layers_m.meta["capture"] == "meta_trace" and layers_e.meta["capture"] == "export"
    drop = ("capture", "capture_seconds")
    plain = [{**g.to_dict(), "graph": {k: v for k, v in g.meta.items() if k not in drop}} for g in (layers_m, layers_e)]
    assert plain[0] == plain[1]  # nothing else differs either


@pytest.mark.parametrize("name", ["unet-tiny", "pase-unet", "ddpm-cifar10",
                                  pytest.param("sd15-unet", marks=pytest.mark.slow)])  # 6 s
def test_meta_trace_equals_export(name: str) -> None:
    assert_same_capture(name)
    if name != "pase-unet":  # diffusers UNets: the U's skips are there, not only equal
        assert captured(name)["meta_trace"][1].skip_edges()


@pytest.mark.slow
def test_meta_trace_equals_export_sdxl() -> None:
    assert_same_capture("sdxl-unet")


class Tricky(nn.Module):
    """The calls whose ATen form differs from the Python one: in-place and reflected operators, indexing, casts,
    no-op contiguous, chunk/split/unbind, interpolate, string padding, transposed convolution, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding="same")
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.proj = nn.Linear(8, 24)
        self.norm = nn.LayerNorm(8)
        self.register_buffer("scale", torch.ones(1, 8, 1, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x) * self.scale
        h += 1
        h = h / 2 + (1 - h) + 2 ** h + 1 / (h + 3)
        h = h + (t[:, None].float() * torch.arange(8, device=x.device)[None, :])[:, :, None, None]
        tokens = self.norm(h.flatten(2).transpose(1, 2).contiguous().contiguous())
        q, k, v = self.proj(tokens).chunk(3, dim=-1)
        a, b = q.split([3, 5], dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        out = torch.cat([torch.stack(list(attn)), a.sum(-1, keepdim=True).expand(-1, -1, 8)], dim=1)
        out = out[:, :36, :8].permute(0, 2, 1).reshape(h.shape)
        out = F.avg_pool2d(F.interpolate(out, scale_factor=2.0, mode="nearest"), 2) + h.mean((2, 3), keepdim=True)
        return self.up(out), b


def tricky_inputs(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4, 6, 6, device=device), torch.arange(2, device=device)


def test_lowered_calls_are_recorded_as_export_records_them() -> None:
    with torch.device("meta"):
        model = Tricky()
    args = tricky_inputs("meta")
    traced, exported = capture(model, args, None, "meta_trace"), capture(model, args, None, "export")
    assert op_rows(traced) == op_rows(exported)
    ops = [op.op for op in traced.ops]
    assert {"add_", "rsub", "reciprocal", "unsqueeze", "slice", "to", "unbind", "split_with_sizes",
            "upsample_nearest2d"} <= set(ops)
    assert ops.count("contiguous") == 1  # the second call returns the tensor itself: no node, as in export


@pytest.mark.parametrize("factory", [Tricky, lambda: ZOO["unet-tiny"].build().eval(), lambda: ZOO["pase-unet"].build()])
def test_the_graph_replays_the_model(factory) -> None:
    """Every node, argument and constant is right: the fx graph over real weights computes the model's output."""
    torch.manual_seed(0)
    model = factory()
    args = tricky_inputs("cpu") if isinstance(model, Tricky) else \
        (torch.randn(2, 3, 32, 32), torch.tensor([3, 500]))
    expected = model(*args)
    expected = [t for t in (expected if isinstance(expected, tuple) else [getattr(expected, "sample", expected)])]
    trace = meta_trace(model, args, on_meta=False)
    replayed = trace.graph_module()(*args)
    assert len(replayed) == len(expected)
    for got, want in zip(replayed, expected):
        torch.testing.assert_close(got, want)
    # traced through meta copies instead: the same nodes, and the model keeps its real weights
    on_meta = meta_trace(model, args)
    assert [(n.op, n.name, str(n.target)) for n in on_meta.graph.nodes] == \
        [(n.op, n.name, str(n.target)) for n in trace.graph.nodes]
    assert all(not p.is_meta for p in model.parameters())
    assert all(v.is_meta for v in on_meta.attrs.values())


def test_the_same_plan_from_either_capture() -> None:
    from cost_models.cluster import parse_spec
    from pase.planning.per_layer import PlanOptions, plan_graph

    everything = PlanOptions(space="all")  # batch 2 on 4 devices: no runnable plan, but both captures must agree
    plans = [plan_graph(captured("unet-tiny")[method][1], parse_spec("4xL40S"), options=everything).to_dict()
             for method in ("meta_trace", "export")]
    for plan in plans:
        plan["search"].pop("seconds")
        plan["search"].pop("pricing_seconds")
    assert plans[0]["layers"] and plans[0] == plans[1]


class BranchOnValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return x


class CondOnValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda x: self.a(x), lambda x: self.b(x), (x,))


def test_value_dependent_control_flow_falls_back_to_export() -> None:
    with torch.device("meta"):
        model = CondOnValue()
    x = torch.zeros(2, 4, device="meta")
    with pytest.raises(GraphCaptureError, match="meta_trace"):
        capture(model, (x,), None, "meta_trace")
    graph = extract(model, (x,))
    assert graph.meta["capture"] == "export"
    assert any(op.op == "cond" for op in capture(model, (x,), None, "auto").ops)


def test_a_branch_on_a_value_is_explained_for_every_front_end() -> None:
    with torch.device("meta"):
        model = BranchOnValue()
    with pytest.raises(GraphCaptureError) as failure:
        extract(model, (torch.zeros(2, 4, device="meta"),))
    message = str(failure.value)
    assert "meta_trace: MetaValueError in module '<root>' (BranchOnValue)" in message
    assert "Tensor.__bool__" in message and "if x.sum() > 0" in message
    assert "  - export:" in message and "  - symbolic_trace:" in message


def test_a_wrong_input_shape_names_the_input_and_the_module() -> None:
    from user_models import TinyConvNet

    with torch.device("meta"):
        model = TinyConvNet()
    with pytest.raises(InputShapeError, match=r"input 'x' \(2, 4, 8, 8\) does not fit module 'stem'.*3 channels"):
        extract(model, (torch.zeros(2, 4, 8, 8, device="meta"),), method="meta_trace")


def test_hooks_and_mode_are_gone_after_a_failure() -> None:
    from torch.nn.modules import module as module_mod

    hooks = (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks))
    with torch.device("meta"):
        model = BranchOnValue()
    with pytest.raises(RuntimeError, match="reads a tensor's value"):
        meta_trace(model, (torch.zeros(2, 4, device="meta"),))
    assert (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks)) == hooks
    assert torch._C._len_torch_function_stack() == 0


def test_the_cache_key_of_auto_names_its_front_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    from pase.graph import cache

    spec = ZOO["unet-tiny"]
    key = functools.partial(cache.cache_key, spec.name, spec.config, 2, torch.float32, input_shapes=None)
    auto = key("auto")
    assert auto != key("export") and auto != key("meta_trace")
    monkeypatch.setattr(cache, "CAPTURE_METHODS", ("export", "symbolic_trace"))  # what auto meant before
    assert key("auto") != auto


class InPlaceAfterRepeats(nn.Module):
    """Layers of one signature followed by in-place ops: the second linear's result is a memo hit."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        g = self.act(self.b(x))
        g += h
        g[:, :4].mul_(2)
        return self.c(g)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_in_place_ops_on_memoized_results_are_traced(device: str) -> None:
    with torch.device(device):
        model = InPlaceAfterRepeats()
    x = torch.zeros(2, 8, device=device)
    traced, exported = capture(model, (x,), None, "meta_trace"), capture(model, (x,), None, "export")
    # F.relu(inplace=True) is named relu here and relu_ by export; the layers are otherwise the same
    layers = [layer_graph_of(ops, model, (x,)) for ops in (traced, exported)]
    rows = [[(i, {k: v for k, v in d.items() if k != "fused_ops"}) for i, d in g.layers()] for g in layers]
    assert rows[0] == rows[1] and len(rows[0]) == 5
    assert sorted(layers[0].graph.edges) == sorted(layers[1].graph.edges) and len(layers[0].graph.edges) >= 4
    assert [op.op for op in traced.ops].count("linear") == 3 and "mul_" in [op.op for op in traced.ops]
    with torch.device("meta"):  # a memo hit requires grad as the kernel's result does, and is no leaf
        trace = meta_trace(model, (torch.zeros(2, 8),))
    linears = [n.meta["val"] for n in trace.graph.nodes if n.op == "call_function" and n.name.startswith("linear")]
    assert len(linears) == 3 and all(t.requires_grad and not t.is_leaf for t in linears)


class WithMultiheadAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.out = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(x, x, x, need_weights=False)[0])


def test_composite_functionals_are_not_recorded_as_one_node() -> None:
    """F.multi_head_attention_forward runs two linears and an attention: recorded as one call, the graph would hide
    them (a third of the FLOPs, weights without maps); meta_trace refuses and auto falls back to export."""
    with torch.device("meta"):
        model = WithMultiheadAttention()
    x = torch.zeros(2, 8, 16, device="meta")
    with pytest.raises(GraphCaptureError, match="multi_head_attention_forward"):
        capture(model, (x,), None, "meta_trace")
    graph = extract(model, (x,))
    assert graph.meta["capture"] == "export"
    assert [d["op"] for _, d in graph.layers()].count("linear") == 3
    assert graph.meta["flops_fwd"] == extract(model, (x,), method="export").meta["flops_fwd"]
