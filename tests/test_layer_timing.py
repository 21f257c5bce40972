"""`pase.runtime.layer_timing`: every planned conv, linear, norm and attention module timed in a training step,
each layer's time exclusive of the timed modules inside it (an attention module holds its projections)."""
from __future__ import annotations

import time

import torch

from pase.graph import extract_model
from pase.models.zoo import ZOO
from pase.runtime.layer_timing import LayerTimer, per_kind


def test_a_step_is_timed_per_layer_and_per_kind_without_counting_nested_modules_twice() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    graph = extract_model("unet-tiny", 4, use_cache=True)
    model = ZOO["unet-tiny"].build()
    x, t = torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4,))
    timer = LayerTimer(model, graph, torch.device("cpu"))
    started = time.perf_counter()
    with timer.step():
        model(x, t).sample.square().mean().backward()
    whole = time.perf_counter() - started
    seconds = timer.take()
    assert set(timer.kind_of.values()) == {"conv", "linear", "group_norm", "attention"}
    assert set(seconds) == set(timer.kind_of) and all(value > 0 for value in seconds.values())
    assert sum(seconds.values()) < whole  # exclusive times: nothing counted twice
    attention = next(layer for layer, kind in timer.kind_of.items() if kind == "attention")
    assert len(timer.covers[attention]) > 1  # the attention module's own elementwise ops come with it
    kinds = per_kind([seconds, seconds], timer, {layer_id: 1.0 for layer_id, _ in graph.layers()})
    assert kinds["conv"]["layers"] == sum(1 for _, data in graph.layers() if data["op"] == "conv")
    assert kinds["attention"]["predicted_seconds"] == sum(len(timer.covers[layer]) for layer, kind
                                                          in timer.kind_of.items() if kind == "attention")
    timer.remove()
    with timer.step():  # hooks removed: nothing is timed
        model(x, t).sample.mean().backward()
    assert timer.take() == {}
