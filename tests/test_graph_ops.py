"""Op-level correctness beyond the zoo: contractions, views, buffers, embeddings, resized fusions."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pase.graph import extract, extract_model


def meta(cls):
    with torch.device("meta"):
        return cls()


def assert_maps_consistent(graph) -> None:
    """Every dim an edge names exists in its layer with the extent the tensor axis has."""
    for src, dst, data in graph.graph.edges(data=True):
        producer, consumer = graph[src]["dims"], graph[dst]["dims"]
        for axis, names in enumerate(data["src_map"]):
            for name in names:
                assert name in producer, (src, dst, data["src_map"])
                assert producer[name] == data["shape"][axis], (src, dst, name, data["shape"])
        for name in data["dst_map"]:
            assert name is None or name in consumer, (src, dst, data["dst_map"])


@pytest.mark.parametrize("method", ["meta_trace", "export", "symbolic_trace"])
def test_einsum_matvec_movedim_mt(method: str) -> None:
    from user_models import ViewsAndContractions

    x, y = torch.zeros(2, 64, 16, device="meta"), torch.zeros(2, 5, 6, device="meta")
    graph = extract(meta(ViewsAndContractions), (x, y), method=method)
    linear = next(data for _, data in graph.layers() if data["op"] == "linear")
    assert linear["flops_fwd"] == 2 * 2 * 5 * 6 * 6
    matmuls = sorted(data["flops_fwd"] for _, data in graph.layers() if data["op"] == "matmul")
    # einsum 2*B*64*16*32; x @ v (1-D) 2*B*64*32, which FlopCounterMode misses (aten.mv has no formula)
    assert matmuls == sorted([2 * 2 * 64 * 16 * 32, 2 * 2 * 64 * 32])
    einsum = next(data for _, data in graph.layers() if data["op"] == "matmul" and "c" in data["dims"])
    assert einsum["roles"]["c"] == "reduction" and einsum["dims"] == {"b": 2, "s": 64, "c": 16, "d": 32}
    assert_maps_consistent(graph)


def test_transposing_views_fold_into_edges() -> None:
    class Transposer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(5, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.movedim(self.a(x), 1, 2).mT.mT)

    for method in ("meta_trace", "export", "symbolic_trace"):
        graph = extract(meta(Transposer), (torch.zeros(2, 5, 6, device="meta"),), method=method)
        edge = next(d for s, t, d in graph.graph.edges(data=True) if s == "a" and t == "b")
        assert edge["shape"] == [2, 5, 6] and edge["dst_shape"] == [2, 6, 5]
        assert edge["axis_map"] == [[0], [2], [1]], method
        assert edge["src_map"] == [["n"], ["s"], ["c_out"]] and edge["dst_map"] == ["n", "s", "c_in"]


@pytest.mark.parametrize("method", ["meta_trace", "export", "symbolic_trace"])
def test_buffers_are_not_parameters(method: str) -> None:
    from user_models import ConvBatchNorm

    model = meta(ConvBatchNorm)
    graph = extract(model, (torch.zeros(2, 3, 8, 8, device="meta"),), method=method)
    assert graph.param_count == sum(p.numel() for p in model.parameters()) == 3 * 8 * 9 + 8 + 16
    assert graph.total("buffer_bytes") >= 2 * 8 * 4  # running mean and variance


def test_none_default_arguments_trace_symbolically() -> None:
    from user_models import OptionalContext

    graph = extract(meta(OptionalContext), (torch.zeros(2, 7, 16, device="meta"),), method="symbolic_trace")
    assert graph.meta["capture"] == "symbolic_trace" and graph.param_count == 16 * 48 + 48 + 16 * 16 + 16


def test_embedding_dims() -> None:
    from user_models import Embedder

    graph = extract(meta(Embedder), (torch.zeros(2, 7, dtype=torch.long, device="meta"),))
    table = graph["table"]
    assert table["op"] == "embedding"
    assert table["dims"] == {"n": 2, "s": 7, "vocab": 100, "c_out": 16}
    assert table["tensors"]["output"] == ["n", "s", "c_out"]
    assert_maps_consistent(graph)


def test_resizing_fusions_get_their_own_dims() -> None:
    """SD's GEGLU chunks the projection in two: the 1280-wide result is not the 2560-wide c_out."""
    graph = extract_model("sd15-unet", 1)
    geglu = graph["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"]
    assert geglu["dims"]["c_out"] == 2560
    assert geglu["tensors"]["output"][-1] != "c_out"
    assert_maps_consistent(graph)


def test_zoo_edges_are_consistent() -> None:
    for name in ("unet-tiny", "ddpm-cifar10", "pase-unet"):
        assert_maps_consistent(extract_model(name, 2))


def test_batch_follows_an_input_override() -> None:
    graph = extract_model("unet-tiny", input_shapes={"sample": (4, 3, 32, 32)})
    assert graph.batch == 4 and graph.meta["inputs"]["timestep"] == [4]


def test_cli_usage_errors_exit_2_without_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "pase", "graph", "--batch", "0"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--batch" in result.stderr


@pytest.mark.parametrize("module", ["pase", "pase.cli"])
def test_the_cli_runs_as_a_module(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("pase "), result.stderr
