"""TuneQDM (Ryu et al., ECCV 2024): fine-tune only the quantization scales of a quantized UNet.

Every Linear and Conv2d weight is quantized once, uniformly per output channel (asymmetric
round-to-nearest, 8 or 4 bits; 4-bit codes packed two per byte) and frozen with its zero points,
biases, norms and embeddings. What trains is, per layer and per timestep expert e, an
output-channel scale s_out^e (initialised to the quantization scale) and an input-channel scale
s_in^e (initialised to 1):  W^e = s_out^e * (W_q - z) * s_in^e. Expert e(t) = floor(t E / T).

Two departures from the TuneQDM reference code, on purpose:
- each sample is routed to its own expert (the batch is grouped by expert inside every layer),
  so batches larger than 1 train correctly; training draws its timesteps in sorted order so the
  groups are contiguous slices (views) rather than copies that autograd would keep;
- ``_ScaledQuantFn`` saves only the input, the scales and a reference to the integer codes, and
  recomputes W^e in backward, so autograd keeps no float copy of any weight (where the input is
  silu(h) from an ``nn.SiLU``, it saves h, which the SiLU keeps anyway, and rebuilds silu(h) in
  backward: ``strategies.silu_recompute``; one activation fewer per norm -> SiLU -> layer); each expert's scales
  are separate parameters in their own optimizer group, so an expert that got no gradient in a
  step has grad None and AdamW leaves it exactly as it was (no momentum or weight-decay drift).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._prims_common import suggest_memory_format

from pase.errors import PaseError
from pase.weights import load_weights, read_safetensors, save_weights
from strategies import silu_recompute


class TuneQDMError(PaseError):
    """A TuneQDM setting or checkpoint that does not fit the model."""


@dataclass(frozen=True)
class TuneQDMConfig:
    bits: int = 8
    experts: int = 2
    num_train_timesteps: int = 1000
    train_input_scales: bool = True  # False: s_out only (the PEQA baseline)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise TuneQDMError(f"--bits {self.bits}: TuneQDM quantizes to 8 or 4 bits")
        if not 1 <= self.experts <= self.num_train_timesteps:
            raise TuneQDMError(f"--experts {self.experts}: use 1 to {self.num_train_timesteps} timestep experts "
                               "(the paper finds 2 best on CIFAR-10)")


# ---------------------------------------------------------------- quantization and packing
def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel asymmetric quantization: (codes uint8 same shape, zero points uint8 (C_out,),
    scales float32 (C_out,)) with weight ~ scale * (codes - zero). The range always holds 0, so a
    zero weight is exact and an all-zero channel gets scale 1."""
    qmax = 2**bits - 1
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    low = flat.amin(dim=1).clamp(max=0)
    high = flat.amax(dim=1).clamp(min=0)
    scale = (high - low) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp(0, qmax)
    codes = (torch.round(flat / scale[:, None]) + zero[:, None]).clamp(0, qmax)
    return codes.to(torch.uint8).reshape(weight.shape), zero.to(torch.uint8), scale


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The float weight the quantized layer starts from: scale * (codes - zero)."""
    codes, zero, scale = quantize_weight(weight, bits)
    view = (-1,) + (1,) * (weight.dim() - 1)
    return scale.view(view) * (codes.float() - zero.float().view(view))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (values 0..15, any shape) packed two per byte: element 2i in the low nibble."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:numel]


# ---------------------------------------------------------------- expert routing
class ExpertRouter:
    """Per-sample timestep experts, set by a forward pre-hook on the model from its ``timestep`` argument."""

    def __init__(self, experts: int, num_train_timesteps: int) -> None:
        self.experts = experts
        self.num_train_timesteps = num_train_timesteps
        self.current: torch.Tensor | None = None
        self._groups: list[tuple[int, torch.Tensor | None]] | None = None

    def expert_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        index = torch.floor(timesteps.float() * self.experts / self.num_train_timesteps).long()
        return index.clamp(0, self.experts - 1)

    def set_timesteps(self, timesteps: torch.Tensor | int | float, batch: int) -> None:
        t = torch.as_tensor(timesteps)
        self.current = self.expert_of(t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(-1))
        self._groups = None

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if sample is None or timestep is None:
            raise TuneQDMError("a TuneQDM model is called as model(sample, timestep): the timestep picks the "
                               "scale expert of each sample")
        self.set_timesteps(timestep, sample.shape[0])

    def groups(self, batch: int) -> list[tuple[int, slice | torch.Tensor | None]]:
        """(expert, the samples it takes) for a layer input of ``batch`` rows: None for the whole batch, a slice
        when the batch is ordered by expert (a view: nothing is copied), else an index tensor."""
        if self.current is None:
            if self.experts == 1:
                return [(0, None)]
            raise TuneQDMError("no timestep set: call the model with its timestep, or router.set_timesteps(t, B)")
        if self._groups is None:  # once per model call (one host sync), not once per layer
            current = self.current.to("cpu")
            experts = current.unique().tolist()
            if len(experts) == 1:
                self._groups = [(int(experts[0]), None)]
            elif bool((current[1:] >= current[:-1]).all()):
                counts = torch.bincount(current, minlength=self.experts).tolist()
                starts = [sum(counts[:e]) for e in experts]
                self._groups = [(int(e), slice(start, start + counts[e])) for e, start in zip(experts, starts)]
            else:
                self._groups = [(int(e), (current == e).nonzero().squeeze(1).to(self.current.device))
                                for e in experts]
        if len(self._groups) > 1 and self.current.numel() != batch:
            raise TuneQDMError(f"a layer input has batch {batch} but {self.current.numel()} timesteps were given; "
                               "TuneQDM routes per sample, so layers must keep the batch as their first dimension")
        return self._groups


# ---------------------------------------------------------------- the layer and its backward
def _rows(x: torch.Tensor, part: slice | torch.Tensor) -> torch.Tensor:
    """The samples of one expert: a view for a slice, a transient copy for an index tensor."""
    return x[part] if isinstance(part, slice) else x.index_select(0, part)


def _put(out: torch.Tensor, part: slice | torch.Tensor, rows: torch.Tensor) -> None:
    if isinstance(part, slice):
        out[part] = rows
    else:
        out.index_copy_(0, part, rows)


def _scaled_backward(layer: QuantizedLayer, x: torch.Tensor, grad: torch.Tensor, s_out: torch.Tensor,
                     s_in: torch.Tensor, needs: tuple[bool, bool, bool],
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, ds_out, ds_in) of y = op(x, s_out * (W_q - z) * s_in): W is rebuilt from the codes, used, dropped."""
    centered = layer.centered(s_out.dtype)
    out_view, in_view = layer.scale_views()
    grad_x, grad_w = layer.grads(x, layer.scaled(centered.clone(), s_out, s_in), grad, need_input=needs[0])
    if not (needs[1] or needs[2]):
        return grad_x, None, None
    dims = tuple(range(centered.dim()))
    in_place = needs[1] != needs[2] and grad_w.dtype == centered.dtype  # grad_w is needed once more otherwise
    product = grad_w.mul_(centered) if in_place else grad_w * centered  # dW * (W_q - z), shared by both scales
    del centered, grad_w
    grad_s_out = (product * s_in.view(in_view)).sum(dim=dims[1:]) if needs[1] else None
    grad_s_in = product.mul_(s_out.view(out_view)).sum(dim=(0, *dims[2:])) if needs[2] else None
    return grad_x, grad_s_out, grad_s_in


def _save_input(ctx: Any, x: torch.Tensor, source: torch.Tensor | None, *rest: torch.Tensor) -> None:
    """Save the layer input x, or h when x = silu(h) (``source``): the SiLU node keeps h anyway."""
    ctx.from_silu = source is not None
    ctx.save_for_backward(source if ctx.from_silu else x, *rest)


def _saved_input(ctx: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    saved, *rest = ctx.saved_tensors
    return (silu_recompute.rebuild(saved) if ctx.from_silu else saved), rest


class _ScaledQuantFn(torch.autograd.Function):
    """y = op(x, s_out * (W_q - z) * s_in) + b, saving only x (or h where x = silu(h)) and the scales
    (W is recomputed in backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor, layer: QuantizedLayer,
                source: torch.Tensor | None = None) -> torch.Tensor:
        ctx.layer = layer
        _save_input(ctx, x, source, s_out, s_in)
        return layer.apply_weight(x, layer.scaled(layer.centered(s_out.dtype), s_out, s_in))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, (s_out, s_in) = _saved_input(ctx)
        return (*_scaled_backward(ctx.layer, x, grad, s_out, s_in, tuple(ctx.needs_input_grad[:3])), None, None)


class _ExpertScaledQuantFn(torch.autograd.Function):
    """Several experts in one node: y[rows_e] = op(x[rows_e], W^e) for each expert's rows.

    One node per layer rather than one per expert plus a cat: autograd saves the layer input once
    (not each expert's ``index_select`` copy of it, nor a slice-backward zero-filled copy per expert),
    and the output and dx are written in place row block by row block. Each block is computed exactly
    as ``_ScaledQuantFn`` computes it, and the output gets the memory layout the former cat (slices) or
    index_select (index tensors) gave, so the numbers are the same. With ``source`` (x = silu(source))
    backward rebuilds all of x once and takes each expert's rows from it.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLayer, parts: list[slice | torch.Tensor],
                source: torch.Tensor | None, *scales: torch.Tensor) -> torch.Tensor:
        out, layout = None, torch.contiguous_format
        for index, part in enumerate(parts):
            s_out, s_in = scales[2 * index], scales[2 * index + 1]
            rows = layer.apply_weight(_rows(x, part), layer.scaled(layer.centered(s_out.dtype), s_out, s_in))
            if isinstance(part, slice):  # the memory layout torch.cat would give (kernels after it depend on it)
                fits = suggest_memory_format(rows)
                layout = fits if out is None or fits == layout else torch.contiguous_format
            if out is None:
                out = torch.empty((x.shape[0], *rows.shape[1:]), dtype=rows.dtype, device=rows.device,
                                  memory_format=layout)
            elif layout == torch.contiguous_format and not out.is_contiguous():
                out = out.contiguous()
            _put(out, part, rows)
            del rows
        ctx.layer, ctx.parts = layer, parts
        _save_input(ctx, x, source, *scales)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scales = _saved_input(ctx)
        needs = ctx.needs_input_grad
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else None
        grad_scales: list[torch.Tensor | None] = []
        for index, part in enumerate(ctx.parts):
            s_out, s_in = scales[2 * index], scales[2 * index + 1]
            part_x, part_out, part_in = _scaled_backward(
                ctx.layer, _rows(x, part), _rows(grad, part), s_out, s_in,
                (needs[0], needs[4 + 2 * index], needs[5 + 2 * index]))
            if part_x is not None:
                _put(grad_x, part, part_x)
            grad_scales += [part_out, part_in]
        return (grad_x, None, None, None, *grad_scales)


class QuantizedLayer(nn.Module):
    """A Linear or Conv2d with frozen integer weights and trainable per-expert channel scales."""

    def __init__(self, source: nn.Linear | nn.Conv2d, bits: int, router: ExpertRouter,
                 train_input_scales: bool = True) -> None:
        super().__init__()
        if isinstance(source, nn.Conv2d) and (source.padding_mode != "zeros" or isinstance(source.padding, str)):
            raise TuneQDMError(f"conv with padding {source.padding!r}, mode {source.padding_mode!r} is not supported "
                               "by TuneQDM's quantized conv; only numeric zero padding is")
        self.kind = "conv" if isinstance(source, nn.Conv2d) else "linear"
        self.conv_args = (source.stride, source.padding, source.dilation, source.groups) if self.kind == "conv" \
            else None
        self.bits = bits
        self.weight_shape = tuple(source.weight.shape)
        self.router = router
        device = source.weight.device
        numel = source.weight.numel()
        self.register_buffer("weight_codes", torch.empty((numel + 1) // 2 if bits == 4 else numel, dtype=torch.uint8,
                                                         device=device))
        self.register_buffer("zero_point", torch.empty(self.weight_shape[0], dtype=torch.uint8, device=device))
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone(), requires_grad=False)
        experts = router.experts
        self.s_out = nn.ParameterList([nn.Parameter(torch.empty(self.weight_shape[0], device=device))
                                       for _ in range(experts)])
        self.s_in = nn.ParameterList([nn.Parameter(torch.ones(self.weight_shape[1], device=device),
                                                   requires_grad=train_input_scales) for _ in range(experts)])
        if device.type != "meta":
            self.set_weight(source.weight)

    @property
    def weight_numel(self) -> int:
        return int(torch.Size(self.weight_shape).numel())

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight into this layer; every expert's scales restart from it."""
        if tuple(weight.shape) != self.weight_shape:
            raise TuneQDMError(f"weight of shape {tuple(weight.shape)} given to a layer of shape {self.weight_shape}")
        codes, zero, scale = quantize_weight(weight.to(self.weight_codes.device), self.bits)
        self.weight_codes.copy_(pack_int4(codes) if self.bits == 4 else codes.reshape(-1))
        self.zero_point.copy_(zero)
        for s_out, s_in in zip(self.s_out, self.s_in):
            s_out.copy_(scale)
            s_in.fill_(1.0)

    def codes(self) -> torch.Tensor:
        flat = unpack_int4(self.weight_codes, self.weight_numel) if self.bits == 4 else self.weight_codes
        return flat.reshape(self.weight_shape)

    def scale_views(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        rest = (1,) * (len(self.weight_shape) - 2)
        return (-1, 1, *rest), (1, -1, *rest)

    def centered(self, dtype: torch.dtype) -> torch.Tensor:
        """W_q - z as floats (a transient: built in forward and again in backward, never saved)."""
        out_view, _ = self.scale_views()
        return self.codes().to(dtype).sub_(self.zero_point.to(dtype).view(out_view))

    def dequantize(self, s_out: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
        out_view, in_view = self.scale_views()
        return s_out.view(out_view) * self.centered(s_out.dtype) * s_in.view(in_view)

    def scaled(self, centered: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
        """``dequantize`` in place on a fresh ``centered`` (no autograd: inside the custom function), so one
        weight-sized float buffer is live instead of two; a * b == b * a exactly, so the values are the same."""
        out_view, in_view = self.scale_views()
        return centered.mul_(s_out.view(out_view)).mul_(s_in.view(in_view))

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kind == "linear":
            return F.linear(x, weight.to(x.dtype), bias)
        stride, padding, dilation, groups = self.conv_args
        return F.conv2d(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)

    def grads(self, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, need_input: bool,
              ) -> tuple[torch.Tensor | None, torch.Tensor]:
        weight = weight.to(x.dtype)
        if self.kind == "linear":
            grad_x = grad @ weight if need_input else None
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            return grad_x, grad_w.to(weight.dtype)
        stride, padding, dilation, groups = self.conv_args
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [need_input, True, False])
        return grad_x, grad_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.router.groups(x.shape[0])
        source = silu_recompute.silu_source(x)
        if len(groups) == 1:
            expert = groups[0][0]
            return _ScaledQuantFn.apply(x, self.s_out[expert], self.s_in[expert], self, source)
        scales = [s for e, _ in groups for s in (self.s_out[e], self.s_in[e])]
        return _ExpertScaledQuantFn.apply(x, self, [part for _, part in groups], source, *scales)

    def extra_repr(self) -> str:
        return f"{self.kind}, weight {self.weight_shape}, {self.bits}-bit, {self.router.experts} expert(s)"


# ---------------------------------------------------------------- whole models
def quantize_model(model: nn.Module, config: TuneQDMConfig) -> ExpertRouter:
    """Swap every Linear and Conv2d of ``model`` for a ``QuantizedLayer`` (in place), freeze everything
    but the scales, and route experts from the model's timestep argument. Works on the meta device
    too (then fill the weights with ``load_quantized_weights``)."""
    if getattr(model, "tuneqdm_router", None) is not None:
        raise TuneQDMError("this model is already quantized for TuneQDM")
    router = ExpertRouter(config.experts, config.num_train_timesteps)
    for param in model.parameters():
        param.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    if not targets:
        raise TuneQDMError("the model has no Linear or Conv2d layer to quantize")
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantizedLayer(module, config.bits, router, config.train_input_scales))
    model.tuneqdm_router = router
    model.tuneqdm_config = config
    model.register_forward_pre_hook(router.hook, with_kwargs=True)
    model.tuneqdm_silu_hooks = silu_recompute.tag_silu_outputs(model)  # layers fed by a SiLU keep its input only
    return router


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)]


@torch.no_grad()
def load_quantized_weights(model: nn.Module, path: str | Path) -> None:
    """Fill a model quantized on the meta device (then ``to_empty``) from a float weights file, one tensor at
    a time: each float weight is quantized as it is read, so no float copy of the model is ever held."""
    layers = dict(quantized_layers(model))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    expected = {n for n in params if ".s_out." not in n and ".s_in." not in n} | \
        {n for n in buffers if not n.endswith((".weight_codes", ".zero_point"))} | {f"{n}.weight" for n in layers}
    seen = set()
    _, tensors = read_safetensors(path)
    for name, tensor in tensors:
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight" and owner in layers:
            layers[owner].set_weight(tensor)
        elif name in params or name in buffers:
            target = params.get(name, buffers.get(name))
            if target.shape != tensor.shape:
                raise TuneQDMError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}")
            target.copy_(tensor)
        else:
            raise TuneQDMError(f"{path} has a tensor {name!r} that this model does not have; is it a weights file "
                               "of this model?")
        seen.add(name)
    if missing := sorted(expected - seen):
        raise TuneQDMError(f"{path} lacks {len(missing)} tensor(s) of this model, e.g. {missing[:3]}")


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_trainable_count(model: nn.Module) -> int:
    """sum over quantized layers of E * (C_out + C_in) (C_out only without input scales)."""
    config: TuneQDMConfig = model.tuneqdm_config
    return sum(config.experts * (layer.weight_shape[0] + layer.weight_shape[1] * config.train_input_scales)
               for _, layer in quantized_layers(model))


def weight_count(model: nn.Module) -> int:
    """All weights of the model: its parameters plus the quantized ones held as integer codes."""
    return sum(p.numel() for p in model.parameters()) + sum(layer.weight_numel for _, layer in quantized_layers(model))


def expert_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """One AdamW group per expert, holding that expert's scales in every layer."""
    config: TuneQDMConfig = model.tuneqdm_config
    groups = []
    for expert in range(config.experts):
        params = [p for _, layer in quantized_layers(model) for p in (layer.s_out[expert], layer.s_in[expert])
                  if p.requires_grad]
        groups.append({"params": params, "expert": expert})
    return groups


def scale_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_scales(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """The scale-only checkpoint: every expert's s_out and s_in, and the settings that produced them."""
    meta = {"pase_tuneqdm": json.dumps({**asdict(model.tuneqdm_config), **(extra or {})})}
    return save_weights(path, scale_state(model), meta)


@torch.no_grad()
def load_scales(model: nn.Module, path: str | Path) -> None:
    metadata, _ = read_safetensors(path)
    saved = json.loads(metadata.get("pase_tuneqdm", "null") or "null")
    if saved is None:
        raise TuneQDMError(f"{path} is not a TuneQDM scale checkpoint (no pase_tuneqdm metadata)")
    config = asdict(model.tuneqdm_config)
    if any(saved.get(k) != v for k, v in config.items()):
        raise TuneQDMError(f"{path} was saved with {saved}, but this model is quantized with {config}")
    state = load_weights(path)
    own = dict(model.named_parameters())
    if set(state) != set(scale_state(model)):
        raise TuneQDMError(f"{path} holds scales for other layers than this model has")
    for name, tensor in state.items():
        own[name].copy_(tensor)


def apply_scales(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a TuneQDM fine-tune into a float model (the pretrained weights it started from), in place: quantize it
    with the settings the scales were saved with, then load the scales. For a diffusers pipeline:
    ``apply_scales(pipe.unet, "OUT/scales.safetensors")``, then call the pipeline as usual (each sample's timestep
    picks its expert)."""
    metadata, _ = read_safetensors(path)
    saved = json.loads(metadata.get("pase_tuneqdm", "null") or "null")
    if not isinstance(saved, dict):
        raise TuneQDMError(f"{path} is not a TuneQDM scale checkpoint (no pase_tuneqdm metadata); `pase finetune "
                           "--strategy tuneqdm --out OUT` writes OUT/scales.safetensors")
    fields = {name: saved[name] for name in TuneQDMConfig.__dataclass_fields__ if name in saved}
    quantize_model(model, TuneQDMConfig(**fields))
    load_scales(model, path)
    return model
