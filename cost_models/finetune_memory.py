"""Memory of fine-tuning jobs per process: plain fine-tuning, one DeMe group, TuneQDM.

Pure arithmetic over a ``ModelSizes`` (parameter count, the Linear/Conv2d weight shapes, activation
bytes at a batch), so the planner and what-if can price these jobs without building the model.
Sizes come from a LayerGraph (``sizes_from_layer_graph``) or from a model run on the meta device
(``pase.train.memory.model_sizes``). Per process, in bytes, fp32 weights and AdamW:

| strategy | weights | gradients | optimizer | extra |
|---|---|---|---|---|
| full     | 4 P                         | 4 P       | 8 P       | EMA 4 P if on |
| DeMe     | 4 (P + A)                   | 4 (P + A) | 8 (P + A) | frozen teacher 4 P; A = adapters |
| TuneQDM  | b/8 Q + 4 (P - Q) + 4 S + 1 per channel zero point | 4 S | 8 S | transient W and dW of the largest layer |

P: parameters, Q: quantized weight values, S = sum over layers of E (C_out + C_in): trainable scales.
Activations saved for backward scale with the per-process batch and are the same for full fine-tuning
and DeMe. TuneQDM saves less: its custom backward saves each layer's input, as an ordinary layer
does, except where that input is silu(h) (norm -> SiLU -> conv, twice per ResNet block): there it
keeps h, which the SiLU keeps anyway, and rebuilds silu(h) in backward (``strategies.silu_recompute``),
so the SiLU outputs read by Linear/Conv2d layers (``ModelSizes.silu_fed_bytes``) are not kept. ``total`` counts
gradients as live beside all activations, an upper bound: the loop frees gradients after each
step, and on ddpm-cifar10 the measured peak of full fine-tuning sits at the end of the forward
(weights + optimizer + activations), about 10% under this total.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

FP32 = 4
ADAM_MOMENTS = 2


@dataclass(frozen=True)
class ModelSizes:
    params: int  # all parameters (fp32 values)
    layers: tuple[tuple[int, int, int], ...]  # (C_out, C_in per group, numel) of every Linear/Conv2d weight
    activation_bytes: int  # saved for backward by one forward at ``batch``
    batch: int
    channel_projection_widths: tuple[int, ...] = ()  # DeMe adapter widths (1x1 C x C convs)
    silu_fed_bytes: int = 0  # of activation_bytes: SiLU outputs read by a Linear/Conv2d (TuneQDM rebuilds them)

    def activations_at(self, batch: int) -> int:
        return round(self.activation_bytes * batch / self.batch)

    def silu_fed_at(self, batch: int) -> int:
        return round(self.silu_fed_bytes * batch / self.batch)


@dataclass(frozen=True)
class MemoryEstimate:
    strategy: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    teacher: int = 0
    ema: int = 0
    transient: int = 0
    trainable_params: int = 0

    @property
    def grad_and_optimizer(self) -> int:
        return self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.teacher + self.ema + \
            self.transient

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "grad_and_optimizer": self.grad_and_optimizer, "total": self.total}


def full_finetune(sizes: ModelSizes, batch: int, ema: bool = False) -> MemoryEstimate:
    p = sizes.params
    return MemoryEstimate("full", FP32 * p, FP32 * p, ADAM_MOMENTS * FP32 * p, sizes.activations_at(batch),
                          ema=FP32 * p if ema else 0, trainable_params=p)


def deme_group(sizes: ModelSizes, batch: int, group_size: int = 1, adapters: bool = False, consistency: bool = True,
               ema: bool = False) -> MemoryEstimate:
    """One process of a DeMe group training one range; ``batch`` is the group's batch (split over the group)."""
    extra = sum(width * width for width in sizes.channel_projection_widths) if adapters else 0
    trained = sizes.params + extra
    return MemoryEstimate("deme", FP32 * trained, FP32 * trained, ADAM_MOMENTS * FP32 * trained,
                          sizes.activations_at(max(1, batch // group_size)),
                          teacher=FP32 * sizes.params if consistency else 0, ema=FP32 * trained if ema else 0,
                          trainable_params=trained)


def deme_merge(sizes: ModelSizes, ranges: int, adapters: bool = False) -> int:
    """Rank 0 at the merge: the pretrained weights, every theta_r, every task vector and the merged weights."""
    extra = sum(width * width for width in sizes.channel_projection_widths) if adapters else 0
    return FP32 * (sizes.params + extra) * (2 * ranges + 2)


def tuneqdm(sizes: ModelSizes, batch: int, bits: int, experts: int, train_input_scales: bool = True) -> MemoryEstimate:
    quantized = sum(numel for _, _, numel in sizes.layers)
    channels_out = sum(c_out for c_out, _, _ in sizes.layers)
    channels_in = sum(c_in for _, c_in, _ in sizes.layers)
    scales = experts * (channels_out + channels_in)
    trainable = experts * (channels_out + channels_in * train_input_scales)
    codes = sum((numel + 1) // 2 if bits == 4 else numel for _, _, numel in sizes.layers)
    weights = codes + channels_out + FP32 * (sizes.params - quantized) + FP32 * scales
    largest = max((numel for _, _, numel in sizes.layers), default=0)
    return MemoryEstimate(f"tuneqdm-{bits}bit", weights, FP32 * trainable, ADAM_MOMENTS * FP32 * trainable,
                          sizes.activations_at(batch) - sizes.silu_fed_at(batch), transient=3 * FP32 * largest,
                          trainable_params=trainable)


def estimate(strategy: str, sizes: ModelSizes, batch: int, **options: Any) -> MemoryEstimate:
    """Dispatch by name: ``full``, ``deme`` (options of ``deme_group``) or ``tuneqdm`` (bits, experts)."""
    if strategy == "full":
        return full_finetune(sizes, batch, ema=options.get("ema", False))
    if strategy == "deme":
        return deme_group(sizes, batch, **options)
    if strategy == "tuneqdm":
        return tuneqdm(sizes, batch, **options)
    raise ValueError(f"unknown fine-tuning strategy {strategy!r}: full, deme or tuneqdm")


def sizes_from_layer_graph(graph: Any) -> ModelSizes:
    """ModelSizes from a LayerGraph: weights of conv/linear layers, the layers' outputs as the activations
    kept for backward (the graph's batch), and of them the outputs of layers ending in a SiLU that only
    conv/linear layers read (norm + SiLU fuse into one layer there) as the SiLU outputs TuneQDM rebuilds."""
    layers = []
    silu_fed = 0
    for node, data in graph.layers():
        if "silu" in data.get("fused_ops", ()) and all(graph.graph.nodes[successor]["op"] in ("conv", "linear")
                                               for successor in graph.graph.successors(node)):
            silu_fed += data["out_bytes"]
        if data["op"] not in ("conv", "linear"):
            continue
        for name, info in data["params"].items():
            if name.endswith(".weight") and len(info["shape"]) >= 2:
                layers.append((info["shape"][0], info["shape"][1], info["numel"]))
    return ModelSizes(graph.param_count, tuple(layers), int(graph.total("out_bytes")), max(graph.batch, 1),
                      silu_fed_bytes=silu_fed)
