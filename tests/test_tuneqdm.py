"""TuneQDM: quantized layers, scale-only training, per-sample experts, custom backward, packing, checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pase.errors import PaseError
from pase.models.zoo import ZOO
from pase.train.data import load_images
from pase.train.loop import LoopConfig, fit
from pase.weights import save_weights
from strategies.silu_recompute import silu_source, tag_silu_outputs
from strategies.tuneqdm import (
    ExpertRouter,
    QuantizedLayer,
    TuneQDMConfig,
    _ExpertScaledQuantFn,
    _ScaledQuantFn,
    expected_trainable_count,
    expert_param_groups,
    fake_quantize,
    load_quantized_weights,
    load_scales,
    pack_int4,
    quantize_model,
    quantize_weight,
    quantized_layers,
    save_scales,
    trainable_count,
    unpack_int4,
)


def _unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO["unet-tiny"].build()


def _quantized(bits: int = 8, experts: int = 2, seed: int = 0) -> nn.Module:
    model = _unet(seed)
    quantize_model(model, TuneQDMConfig(bits, experts))
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_initial_output_is_fake_quant_exactly(bits: int) -> None:
    torch.manual_seed(1)
    cases = ((nn.Linear(12, 7), torch.randn(5, 3, 12)), (nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 8, 8)))
    for layer, x in cases:
        router = ExpertRouter(2, 1000)
        router.set_timesteps(torch.tensor([700] * len(x)), len(x))
        quantized = QuantizedLayer(layer, bits, router)
        weight = fake_quantize(layer.weight, bits)
        expected = F.linear(x, weight, layer.bias) if isinstance(layer, nn.Linear) else \
            F.conv2d(x, weight, layer.bias, padding=1)
        assert torch.equal(quantized(x), expected)


def test_quantized_unet_is_close_to_fp32_at_8_bits() -> None:
    reference = _unet()
    model = copy.deepcopy(reference)
    quantize_model(model, TuneQDMConfig(8, 2))
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([5, 300, 600, 999])
    with torch.no_grad():
        ours, fp32 = model(x, t).sample, reference(x, t).sample
    assert (ours - fp32).norm() / fp32.norm() < 2e-2
    assert not torch.equal(ours, fp32)


def test_only_scales_train_and_count_matches_formula() -> None:
    model = _quantized(experts=3)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".s_out." in n or ".s_in." in n for n in trainable)
    layers = quantized_layers(model)
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    assert trainable_count(model) == sum(3 * (layer.weight_shape[0] + layer.weight_shape[1]) for _, layer in layers)
    assert trainable_count(model) == expected_trainable_count(model)


def test_expert_routing_at_interval_borders() -> None:
    router = ExpertRouter(2, 1000)
    assert router.expert_of(torch.tensor([0, 499, 500, 999])).tolist() == [0, 0, 1, 1]
    router = ExpertRouter(4, 1000)
    assert router.expert_of(torch.tensor([249, 250, 749, 750, 1000])).tolist() == [0, 1, 2, 3, 3]


def test_per_sample_routing_equals_one_sample_at_a_time() -> None:
    model = _quantized(experts=2)
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.s_out[1].mul_(1.1)  # make the experts differ
        x = torch.randn(3, 3, 16, 16)
        for t in (torch.tensor([100, 900, 200]), torch.tensor([100, 200, 900])):  # index path, then slice path
            batched = model(x, t).sample
            assert isinstance(model.tuneqdm_router.groups(3)[0][1], torch.Tensor if t[1] == 900 else slice)
            single = torch.cat([model(x[i:i + 1], t[i:i + 1]).sample for i in range(3)])
            assert torch.allclose(batched, single, atol=1e-5)


def test_training_keeps_frozen_state_and_inactive_experts_bit_identical() -> None:
    model = _quantized(experts=2)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".s_out." not in k and ".s_in." not in k}
    before = {k: v.clone() for k, v in model.state_dict().items() if ".s_out.1" in k or ".s_in.1" in k}
    scales0 = {k: v.clone() for k, v in model.state_dict().items() if ".s_out.0" in k}

    def low_t_loss(net: nn.Module, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 500, (len(x0),), generator=generator)  # expert 0 only
        return F.mse_loss(net(x0 + noise, t).sample, noise)

    data = load_images("shapes", 16, 3, 32)
    fit(model, low_t_loss, data, LoopConfig(steps=3, batch=4, lr=1e-2, weight_decay=0.1, progress=False),
        param_groups=expert_param_groups(model))
    state = model.state_dict()
    assert frozen and all(torch.equal(state[k], v) for k, v in frozen.items())  # codes, zero points, biases, norms
    assert all(torch.equal(state[k], v) for k, v in before.items())  # expert 1: no drift despite weight decay
    assert any(not torch.equal(state[k], v) for k, v in scales0.items())  # expert 0 trained


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_custom_backward_gradcheck_float64(kind: str) -> None:
    torch.manual_seed(0)
    layer = (nn.Linear(5, 4) if kind == "linear" else nn.Conv2d(3, 4, 3, stride=2, padding=1)).double()
    quantized = QuantizedLayer(layer, 8, ExpertRouter(1, 1000))
    x = torch.randn((2, 3, 5) if kind == "linear" else (2, 3, 5, 5), dtype=torch.float64, requires_grad=True)
    s_out = (quantized.s_out[0].detach().double() * 1.3).requires_grad_()
    s_in = (1 + 0.2 * torch.randn(quantized.weight_shape[1], dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: _ScaledQuantFn.apply(a, b, c, quantized), (x, s_out, s_in))
    # and it matches autograd through a naive dequantise-in-forward
    out = _ScaledQuantFn.apply(x, s_out, s_in, quantized)
    grads = torch.autograd.grad(out.sum(), (x, s_out, s_in))
    naive = quantized.apply_weight(x, quantized.dequantize(s_out, s_in))
    expected = torch.autograd.grad(naive.sum(), (x, s_out, s_in))
    for ours, reference in zip(grads, expected):
        assert torch.allclose(ours, reference, atol=1e-10)


def test_no_float_weight_is_saved_for_backward() -> None:
    layer = QuantizedLayer(nn.Conv2d(8, 16, 3, padding=1), 8, ExpertRouter(1, 1000))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(2, 8, 6, 6)).sum()
    shapes = [tuple(t.shape) for t in saved]
    assert (16, 8, 3, 3) not in shapes and shapes  # input and scales only


def _saved_storages(run) -> tuple[object, dict[int, int]]:
    """Run ``run()`` recording every storage autograd saves for backward: {storage id: bytes}."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, saved


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("timesteps", [[700, 800, 900, 999], [10, 20, 600, 700], [600, 10, 700, 20]],
                         ids=["one-expert", "slices", "index"])
def test_bytes_saved_per_layer_are_input_weight_codes_and_scales(bits: int, kind: str, timesteps: list[int]) -> None:
    torch.manual_seed(0)
    source, x = (nn.Linear(24, 40), torch.randn(4, 6, 24)) if kind == "linear" else \
        (nn.Conv2d(8, 16, 3, padding=1), torch.randn(4, 8, 12, 12))
    router = ExpertRouter(2, 1000)
    router.set_timesteps(torch.tensor(timesteps), 4)
    layer = QuantizedLayer(source, bits, router)
    x.requires_grad_()
    out, saved = _saved_storages(lambda: layer(x))
    scales = sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
    bound = x.numel() * x.element_size() + layer.weight_codes.numel() + scales
    assert 0 < sum(saved.values()) <= bound
    own = {t.untyped_storage()._cdata for t in (x, *layer.parameters(), *layer.buffers())}
    assert set(saved) <= own  # the input itself (no per-expert copy of it) and the layer's own tensors
    out.sum().backward()  # and backward still runs from what was saved
    active = set(router.expert_of(torch.tensor(timesteps)).tolist())
    assert x.grad is not None and [p.grad is not None for p in layer.s_out] == [e in active for e in range(2)]


def test_unsorted_timesteps_save_no_more_than_sorted_or_the_float_model() -> None:
    reference = _unet()
    model = _quantized(experts=2)
    x = torch.randn(4, 3, 16, 16)
    _, float_saved = _saved_storages(lambda: reference(x, torch.tensor([100, 900, 200, 800])).sample)
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    activations = []
    for t in ([100, 200, 800, 900], [100, 900, 200, 800]):  # slice path, index path
        _, saved = _saved_storages(lambda t=t: model(x, torch.tensor(t)).sample)
        activations.append(sum(size for key, size in saved.items() if key not in weights))
    sorted_bytes, unsorted_bytes = activations
    assert unsorted_bytes <= 1.01 * sorted_bytes  # grouping by index tensors copies nothing that autograd keeps
    assert max(activations) <= sum(float_saved.values())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_expert_function_gradcheck_float64_and_matches_one_expert_at_a_time(kind: str) -> None:
    torch.manual_seed(0)
    layer = (nn.Linear(5, 4) if kind == "linear" else nn.Conv2d(3, 4, 3, stride=2, padding=1)).double()
    quantized = QuantizedLayer(layer, 8, ExpertRouter(2, 1000))
    x = torch.randn((4, 3, 5) if kind == "linear" else (4, 3, 5, 5), dtype=torch.float64, requires_grad=True)
    scales = [t.requires_grad_() for _ in range(2) for t in
              ((quantized.s_out[0].detach().double() * (1 + 0.2 * torch.rand(4, dtype=torch.float64))),
               1 + 0.2 * torch.randn(quantized.weight_shape[1], dtype=torch.float64))]
    for parts in ([slice(0, 1), slice(1, 4)], [torch.tensor([0, 2]), torch.tensor([1, 3])]):
        def fn(a, *s, parts=parts):
            return _ExpertScaledQuantFn.apply(a, quantized, parts, None, *s)

        assert torch.autograd.gradcheck(fn, (x, *scales))
        out = fn(x, *scales)
        grads = torch.autograd.grad((out * out).sum(), (x, *scales))
        pieces = [(p, _ScaledQuantFn.apply(x[p] if isinstance(p, slice) else x.index_select(0, p), scales[2 * i],
                                           scales[2 * i + 1], quantized)) for i, p in enumerate(parts)]
        expected_out = torch.empty_like(out)
        for p, piece in pieces:
            expected_out[p] = piece.detach()
        expected = torch.autograd.grad(sum((piece * piece).sum() for _, piece in pieces), (x, *scales))
        assert torch.equal(out, expected_out)
        for ours, reference in zip(grads, expected):
            assert torch.equal(ours, reference)


def _silu_fed_layer(kind: str, experts: int) -> tuple[QuantizedLayer, nn.SiLU, torch.Tensor, list[torch.Tensor]]:
    """A float64 quantized layer, a tagging SiLU in front of it, its pre-activation input h and one
    (s_out, s_in) pair per expert, all requiring grad."""
    torch.manual_seed(0)
    layer = (nn.Linear(5, 4) if kind == "linear" else nn.Conv2d(3, 4, 3, stride=2, padding=1)).double()
    quantized = QuantizedLayer(layer, 8, ExpertRouter(experts, 1000))
    silu = nn.SiLU()
    tag_silu_outputs(silu)
    h = torch.randn((4, 3, 5) if kind == "linear" else (4, 3, 5, 5), dtype=torch.float64, requires_grad=True)
    scales = [t.requires_grad_() for _ in range(experts) for t in
              ((quantized.s_out[0].detach().double() * (1 + 0.2 * torch.rand(4, dtype=torch.float64))),
               1 + 0.2 * torch.randn(quantized.weight_shape[1], dtype=torch.float64))]
    return quantized, silu, h, scales


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_silu_fed_backward_gradcheck_float64_and_saves_only_the_pre_activation(kind: str) -> None:
    quantized, silu, h, (s_out, s_in) = _silu_fed_layer(kind, 1)

    def fused(a, b, c):
        x = silu(a)
        assert silu_source(x) is a  # the layer takes the path that rebuilds silu(h) in backward
        return _ScaledQuantFn.apply(x, b, c, quantized, silu_source(x))

    assert torch.autograd.gradcheck(fused, (h, s_out, s_in))
    out, saved = _saved_storages(lambda: fused(h, s_out, s_in))
    assert h.untyped_storage()._cdata in saved and len(saved) == 3  # h (SiLU and layer), s_out, s_in: no silu(h)
    grads = torch.autograd.grad((out * out).sum(), (h, s_out, s_in))
    plain = _ScaledQuantFn.apply(F.silu(h), s_out, s_in, quantized)
    for ours, reference in zip(grads, torch.autograd.grad((plain * plain).sum(), (h, s_out, s_in))):
        assert torch.equal(ours, reference)
    for parts in ([slice(0, 1), slice(1, 4)], [torch.tensor([0, 2]), torch.tensor([1, 3])]):
        quantized, silu, h, scales = _silu_fed_layer(kind, 2)

        def experts(a, *s, parts=parts, silu=silu, quantized=quantized):
            x = silu(a)
            return _ExpertScaledQuantFn.apply(x, quantized, parts, silu_source(x), *s)

        assert torch.autograd.gradcheck(experts, (h, *scales))


def test_silu_tag_survives_dropout_but_not_an_in_place_change() -> None:
    silu = nn.SiLU()
    tag_silu_outputs(silu)
    h = torch.randn(3, 4, requires_grad=True)
    x = nn.Dropout(0.0).train()(silu(h))
    assert silu_source(x) is h and silu_source(x + 0) is None and silu_source(x[:2]) is None
    x.mul_(2)  # no longer silu(h): the layer must save x itself
    assert silu_source(x) is None
    with torch.no_grad():
        assert silu_source(silu(h)) is None  # nothing to save, nothing tagged


def _loss_scale_grads_and_saved_bytes(timesteps: list[int], silu_tags: bool,
                                     ) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """One float64 forward and backward of a quantized UNet (experts made to differ), with or without the
    SiLU tags: the loss, every scale's gradient (zeros where it got none) and the activation bytes saved."""
    model = _quantized(experts=2)
    if not silu_tags:
        for handle in model.tuneqdm_silu_hooks:
            handle.remove()
    model.double()
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.s_out[1].mul_(1.1)
    torch.manual_seed(3)
    x, noise = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randn(4, 3, 16, 16, dtype=torch.float64)
    loss, saved = _saved_storages(lambda: F.mse_loss(model(x, torch.tensor(timesteps)).sample, noise))
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [g if g is not None else torch.zeros_like(p)
             for g, p in zip(torch.autograd.grad(loss, trainable, allow_unused=True), trainable)]
    return loss.detach(), grads, sum(size for key, size in saved.items() if key not in weights)


@pytest.mark.parametrize("timesteps", [[10, 20, 600, 700], [600, 10, 700, 20]], ids=["slices", "index"])
def test_silu_fed_path_gives_the_unfused_loss_and_scale_gradients(timesteps: list[int]) -> None:
    loss, grads, saved = _loss_scale_grads_and_saved_bytes(timesteps, silu_tags=True)
    plain_loss, plain_grads, plain_saved = _loss_scale_grads_and_saved_bytes(timesteps, silu_tags=False)
    assert torch.equal(loss, plain_loss)  # the forward is untouched
    assert len(grads) == len(plain_grads) and any(g.abs().sum() > 0 for g in grads)
    for ours, reference in zip(grads, plain_grads):
        assert torch.allclose(ours, reference, rtol=1e-12, atol=1e-15)
    assert saved < 0.85 * plain_saved  # and it keeps less: no SiLU output is saved


def test_int4_packing_round_trip() -> None:
    codes = torch.randint(0, 16, (7, 3), dtype=torch.uint8)  # odd count
    packed = pack_int4(codes)
    assert packed.numel() == 11 and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, codes.numel()).reshape(7, 3), codes)
    four, eight = _quantized(bits=4), _quantized(bits=8)
    size = {bits: sum(layer.weight_codes.numel() for _, layer in quantized_layers(m)) for bits, m in ((4, four),
                                                                                                       (8, eight))}
    assert size[4] <= size[8] // 2 + len(quantized_layers(four))
    weight = torch.randn(6, 10)
    codes4, zero, scale = quantize_weight(weight, 4)
    assert codes4.max() <= 15 and ((fake_quantize(weight, 4) - weight).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_scale_checkpoint_round_trip(tmp_path) -> None:
    model = _quantized(bits=4, experts=2)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.mul_(1 + 0.05 * torch.randn_like(p))
    path = save_scales(tmp_path / "scales.safetensors", model)
    fresh = _quantized(bits=4, experts=2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 800])
    with torch.no_grad():
        assert not torch.equal(fresh(x, t).sample, model(x, t).sample)
        load_scales(fresh, path)
        assert torch.equal(fresh(x, t).sample, model(x, t).sample)
    assert path.stat().st_size < 0.2 * sum(p.numel() * 4 for p in _unet().parameters())
    with pytest.raises(PaseError, match="quantized with"):
        load_scales(_quantized(bits=8, experts=2), path)


def test_streamed_quantization_equals_quantizing_the_built_model(tmp_path) -> None:
    weights = save_weights(tmp_path / "w.safetensors", _unet(seed=5).state_dict())
    with torch.device("meta"):
        streamed = ZOO["unet-tiny"].build()
    quantize_model(streamed, TuneQDMConfig(4, 2))
    streamed = streamed.to_empty(device="cpu")
    load_quantized_weights(streamed, weights)
    built = _quantized(bits=4, seed=5)
    for (name, a), (_, b) in zip(streamed.state_dict().items(), built.state_dict().items()):
        assert torch.equal(a, b), name


def test_bad_settings() -> None:
    with pytest.raises(PaseError, match="8 or 4 bits"):
        TuneQDMConfig(bits=3)
    with pytest.raises(PaseError, match="already quantized"):
        quantize_model(_quantized(), TuneQDMConfig())
