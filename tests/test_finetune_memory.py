"""The fine-tuning memory model agrees with the models it prices."""
from __future__ import annotations

import torch

from cost_models.finetune_memory import (
    deme_group,
    deme_merge,
    estimate,
    full_finetune,
    sizes_from_layer_graph,
    tuneqdm,
)
from pase.models.zoo import ZOO
from pase.train.memory import model_sizes
from strategies.deme import add_channel_projections
from strategies.tuneqdm import TuneQDMConfig, quantize_model, trainable_count


def test_counts_match_the_real_models() -> None:
    sizes = model_sizes("unet-tiny", 4, 16)
    model = ZOO["unet-tiny"].build()
    assert sizes.params == sum(p.numel() for p in model.parameters())
    quantize_model(model, TuneQDMConfig(4, 3))
    assert tuneqdm(sizes, 4, bits=4, experts=3).trainable_params == trainable_count(model)
    adapted = ZOO["unet-tiny"].build()
    added = sum(adapted.get_parameter(n).numel() for n in add_channel_projections(adapted))
    assert deme_group(sizes, 4, adapters=True).trainable_params == sizes.params + added


def test_strategies_relative_to_each_other() -> None:
    sizes = model_sizes("ddpm-cifar10", 8)
    full = full_finetune(sizes, 8)
    eight, four = tuneqdm(sizes, 8, bits=8, experts=2), tuneqdm(sizes, 8, bits=4, experts=2)
    assert full.grad_and_optimizer == 12 * sizes.params
    assert full.grad_and_optimizer >= 100 * eight.grad_and_optimizer
    assert four.weights < eight.weights < full.weights / 3
    assert full.activations == sizes.activation_bytes and 0 < sizes.silu_fed_bytes < sizes.activation_bytes / 2
    assert eight.activations == four.activations == full.activations - sizes.silu_fed_bytes
    group = deme_group(sizes, 8)
    assert group.teacher == 4 * sizes.params and group.total == full.total + group.teacher
    assert deme_group(sizes, 8, group_size=2).activations == full_finetune(sizes, 4).activations
    assert estimate("tuneqdm", sizes, 8, bits=8, experts=2) == eight
    assert deme_merge(sizes, 4) == 4 * sizes.params * 10


def test_layer_graph_sizes_agree_with_the_meta_run() -> None:
    from pase.graph import extract_model

    graph_sizes = sizes_from_layer_graph(extract_model("unet-tiny", 8, use_cache=True))
    run_sizes = model_sizes("unet-tiny", 8)
    assert graph_sizes.params == run_sizes.params
    assert sorted(graph_sizes.layers) == sorted(run_sizes.layers)
    assert abs(graph_sizes.activation_bytes / run_sizes.activation_bytes - 1) < 0.25
    assert abs(graph_sizes.silu_fed_bytes / run_sizes.silu_fed_bytes - 1) < 0.25
    assert run_sizes.activations_at(16) == 2 * run_sizes.activation_bytes


def test_silu_fed_bytes_are_what_tuneqdm_stops_saving() -> None:
    """The meta-run count equals the drop in bytes a real quantized model saves when its SiLU-fed layers keep
    the SiLU's input (the tags on) instead of their own input (the tags off)."""
    sizes = model_sizes("unet-tiny", 4, 16)
    saved = []
    for tagged in (True, False):
        torch.manual_seed(0)
        model = ZOO["unet-tiny"].build()
        quantize_model(model, TuneQDMConfig(8, 2))
        if not tagged:
            for handle in model.tuneqdm_silu_hooks:
                handle.remove()
        weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor, seen: dict[int, int] = seen, weights: set[int] = weights) -> torch.Tensor:
            if tensor.untyped_storage()._cdata not in weights:
                seen[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(torch.randn(4, 3, 16, 16), torch.tensor([10, 300, 600, 900]))
        saved.append(sum(seen.values()))
    assert sizes.silu_fed_bytes > 0 and saved[1] - saved[0] == sizes.silu_fed_bytes
    assert saved[0] <= tuneqdm(sizes, 4, bits=8, experts=2).activations  # the model does not under-price them
