"""Per-layer FLOPs add up to torch's FlopCounterMode on the same forward (and backward)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pase.graph import extract_model
from pase.models.zoo import ZOO

BATCH = 2


def counted_flops(name: str, backward: bool) -> int:
    """FlopCounterMode on the meta device (real CPU tensors would drop SDPA's FLOPs)."""
    spec = ZOO[name]
    with torch.device("meta"):
        model = spec.build()
    args, kwargs = spec.example_inputs(BATCH, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = model(*args, **kwargs)
        if backward:
            sample = out if isinstance(out, torch.Tensor) else out.sample
            sample.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name,method", [("unet-tiny", "auto"), ("ddpm-cifar10", "auto"),
                                         ("pase-unet", "meta_trace"), ("pase-unet", "export"),
                                         ("pase-unet", "symbolic_trace")])
def test_layer_flops_match_flop_counter(name: str, method: str) -> None:
    graph = extract_model(name, BATCH, method=method)
    forward = counted_flops(name, backward=False)
    total = counted_flops(name, backward=True)
    layer_forward = sum(data["flops_fwd"] for _, data in graph.layers())
    layer_total = layer_forward + sum(data["flops_bwd"] for _, data in graph.layers())
    assert forward > 0
    assert abs(layer_forward - forward) / forward < 0.01
    assert abs(layer_total - total) / total < 0.01
    assert graph.meta["flops_fwd"] == layer_forward


def test_flops_scale_with_batch() -> None:
    small, large = extract_model("unet-tiny", 2), extract_model("unet-tiny", 6)
    assert large.meta["flops_fwd"] == 3 * small.meta["flops_fwd"]


def test_attention_flops_are_counted() -> None:
    """The trap the issue warns of: attention must not silently count zero."""
    graph = extract_model("unet-tiny", BATCH)
    attention = [data for _, data in graph.layers() if data["op"] == "attention"]
    assert len(attention) == 4  # 2 down/mid/up attention blocks of the tiny config
    for data in attention:
        dims = data["dims"]
        expected = 4 * dims["n"] * dims["heads"] * dims["q"] * dims["kv"] * dims["d"]
        assert data["flops_fwd"] == expected
