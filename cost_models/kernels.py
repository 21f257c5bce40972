"""What one layer's kernels cost beyond FLOPs over a rate: the GPU's per-kernel floor and wave quantisation.

A GEMM-like kernel (a convolution as implicit GEMM, a linear layer, a flash-attention pass) cuts its output
into ``tile`` x ``tile`` tiles and runs them in waves of one tile per streaming multiprocessor; a last wave that
fills few SMs idles the rest, so the achieved rate is the kind's efficiency times ``tiles / (waves * SMs)``.
Where tiles are fewer than SMs and the reduction is long, cuBLAS and cuDNN split the reduction (split-K) to fill
the machine; the model does the same, in splits of at least ``SPLIT_K_MIN`` reduction elements. Every kernel
also costs a floor (launch, ramp-up, tail) that no amount of work hides, which is what makes small per-device
batches slow per sample. All of it is vectorised over a layer's split configurations.

An eager PyTorch stack (pase's runtime) also pays the host: every operator is dispatched from Python before its
kernel can start, ``host_s`` each. The host runs ahead of the GPU only while queued kernels last
(``queued_seconds``): a long kernel hides the dispatch of the small ones after it, and a run of small kernels
waits on the host. A chain priced end to end (the sampler's forward) runs that queue; the training search needs
a cost per layer and takes the queue's upper bound, the longer of each layer's GPU time and its operators'
dispatch time (``host_bound``). A CUDA-graphed stack (``host_s`` 0) replays the kernels without the host.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

SPLIT_K_MIN = 512  # reduction elements per split-K slice (CUTLASS's split-K and stream-K work in such chunks)
# kernels launched per layer: the forward's anchor op and every op fused into the layer; the backward runs two
# per GEMM-like op (input gradient, weight gradient) and one per other op
BACKWARD_KERNELS = {"conv": 2, "linear": 2, "matmul": 2, "attention": 2}


@dataclass(frozen=True)
class KernelModel:
    sm_count: int  # streaming multiprocessors (compute units on AMD) that tiles spread over
    floor_s: float  # GPU time per kernel no work hides: launch, ramp-up and tail
    host_s: float = 0.0  # host time per operator an eager stack dispatches (0: a CUDA-graphed stack)
    tile: int = 128  # output rows and columns per tile: cuBLAS/CUTLASS bf16 GEMM and cuDNN implicit-GEMM tiles

    @classmethod
    def for_gpu(cls, gpu: Any, stack: str = "eager") -> KernelModel | None:
        """The model of ``gpu`` (a catalog ``GPUSpec``) on ``stack`` ("eager": the host dispatches every operator;
        "graphed": no host); None where the GPU's SM count is unknown (a CPU, a probed GPU outside the catalog)."""
        if not gpu.sm_count:
            return None
        return cls(gpu.sm_count, gpu.kernel_floor_us * 1e-6, gpu.host_us_per_op * 1e-6 if stack == "eager" else 0.0)

    @classmethod
    def for_unfused_forward(cls, gpu: Any, stack: str = "eager") -> KernelModel | None:
        """``for_gpu``, with the floor of a forward whose every layer-graph operator is its own kernel (an eager
        module, dispatched or replayed from a CUDA graph: the catalog's ``unfused_floor_us``), where the training
        stacks' floor is a bare kernel's."""
        model = cls.for_gpu(gpu, stack)
        if model is None or not gpu.unfused_kernel_floor_us:
            return model
        return replace(model, floor_s=gpu.unfused_kernel_floor_us * 1e-6)

    def utilization(self, rows: np.ndarray, cols: np.ndarray, reduction: np.ndarray | float) -> np.ndarray:
        """Share of the SMs' time a GEMM of ``rows`` x ``cols`` outputs over ``reduction`` keeps busy."""
        tiles = np.ceil(np.maximum(rows, 1) / self.tile) * np.ceil(np.maximum(cols, 1) / self.tile)
        splits = np.clip(np.minimum(self.sm_count // tiles, np.asarray(reduction) // SPLIT_K_MIN), 1, None)
        work = tiles * splits
        return work / (np.ceil(work / self.sm_count) * self.sm_count)

    def attention_utilization(self, queries: np.ndarray, streams: np.ndarray,
                              head_dim: np.ndarray | float | None = None) -> np.ndarray:
        """Flash attention: one tile per ``tile`` queries of each (sample, head) stream, and each head's channels
        padded to the kernel's head dim (``flash_head_dim``)."""
        work = np.ceil(np.maximum(queries, 1) / self.tile) * np.maximum(streams, 1)
        waves = work / (np.ceil(work / self.sm_count) * self.sm_count)
        if head_dim is None:
            return waves
        return waves * np.asarray(head_dim, dtype=np.float64) / flash_head_dim(head_dim)


def flash_head_dim(head_dim: np.ndarray | float) -> np.ndarray:
    """The head dim a flash-attention kernel computes over for heads of ``head_dim`` channels: FlashAttention-2
    instantiates kernels for 32, 64, ..., 192 and 256 and runs a head on the smallest that holds it, its extra
    channels zero (static_switch.h ``HEADDIM_SWITCH``: ``d <= 32``, ``<= 64``, ... ``<= 256``; flash_api.cpp rounds
    ``head_size <= 192 ? round_multiple(head_size, 32) : 256`` alike); SD-1.5's 40-channel heads run on the 64
    kernel. Wider heads than 256 are taken as they are (no flash kernel holds them)."""
    d = np.maximum(np.asarray(head_dim, dtype=np.float64), 1.0)
    return np.where(d <= 192, np.ceil(d / 32) * 32, np.where(d <= 256, 256.0, d))


def kernels_per_step(op: str, fused_ops: int, training: bool = True) -> int:
    """Kernels one layer launches: forward (its op and the ops fused into it) and, when training, backward."""
    forward = 1 + fused_ops
    if not training:
        return forward
    return forward + BACKWARD_KERNELS.get(op, 1) + fused_ops


def host_ops_per_step(op: str, fused_ops: int, training: bool = True, weight_casts: int = 0) -> int:
    """Operators the host dispatches for one layer in a step: its kernels (``kernels_per_step``) and, under
    mixed-precision autocast over fp32 weights, each weight's cast to the compute precision in the forward and its
    gradient's cast back in the backward (``weight_casts``: the layer's trainable weight tensors)."""
    if op in ("input", "output"):
        return 0
    return kernels_per_step(op, fused_ops, training) + (2 if training else 1) * weight_casts


def host_bound(gpu_seconds: np.ndarray, host_ops: float, model: KernelModel | None) -> np.ndarray:
    """A layer's time on an eager stack: its GPU time, or its operators' dispatch time where that is longer."""
    if model is None or model.host_s <= 0 or host_ops <= 0:
        return gpu_seconds
    return np.maximum(gpu_seconds, host_ops * model.host_s)


def queued_seconds(gpu_seconds: Iterable[np.ndarray], host_seconds: Iterable[np.ndarray | float]) -> np.ndarray:
    """Wall time of layers run in order on one CUDA stream fed by one host thread, given each layer's GPU time
    and its operators' dispatch time: a layer's kernels start once the GPU has finished the layer before and the
    host has begun dispatching this one, and end no earlier than the host has dispatched its last operator. So
    the host's dispatch hides behind queued kernels, and the GPU idles only where the host falls behind. Never
    more than the sum of ``host_bound``'s per-layer maxima, never less than the larger of the two sums."""
    end: np.ndarray | float = 0.0
    dispatched: np.ndarray | float = 0.0
    for gpu, host in zip(gpu_seconds, host_seconds, strict=True):
        end = np.maximum(np.maximum(end, dispatched) + gpu, dispatched + host)
        dispatched = dispatched + host
    return np.asarray(end, dtype=np.float64)


def _product(local: dict[str, np.ndarray], dims: list[str]) -> np.ndarray:
    value = np.ones_like(next(iter(local.values()))) if local else np.ones(1)
    for d in dims:
        value = value * local[d]
    return value


def gemm_extents(layer: Mapping[str, Any], local: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, reduction) of a conv, linear or matmul layer's GEMM at the ``local`` (per device) extents:
    rows are the output's dims other than its output channels, columns the output channels, the reduction its
    reduction and kernel dims."""
    roles, out = layer["roles"], [d for d in layer["tensors"]["output"] if d is not None]
    return (_product(local, [d for d in out if roles[d] != "out_channel"]),
            _product(local, [d for d in out if roles[d] == "out_channel"]),
            _product(local, [d for d in layer["dims"] if roles[d] in ("reduction", "kernel")]))


def layer_utilization(model: KernelModel, layer: Mapping[str, Any], local: dict[str, np.ndarray]) -> np.ndarray:
    """Wave utilisation of a conv, linear, matmul or attention layer whose dims have the ``local`` (per device)
    extents (``gemm_extents``); attention tiles its queries per (sample, head) stream, its heads padded to the
    flash kernel's head dim."""
    if layer["op"] == "attention":
        roles, out = layer["roles"], [d for d in layer["tensors"]["output"] if d is not None]
        head_dims = [d for d in layer["dims"] if roles[d] == "reduction"]
        return model.attention_utilization(_product(local, [d for d in out if roles[d] == "sequence"]),
                                           _product(local, [d for d in out if roles[d] in ("batch", "head")]),
                                           _product(local, head_dims) if head_dims else None)
    return model.utilization(*gemm_extents(layer, local))
