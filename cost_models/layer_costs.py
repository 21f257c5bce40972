"""Per-layer and per-edge costs of parallel configurations, in seconds and bytes (vectorised).

For a layer and every configuration of its ``SplitTable``:
- compute: forward + backward FLOPs of the local shard at the kind's achieved rate, or the
  bytes it touches at memory bandwidth if that is slower (a roofline), plus fused pointwise
  work at memory bandwidth;
- collectives, from the layer's tensor maps (PaSE's three all-reduces, generalised): an
  output missing a split dimension holds partial sums (forward all-reduce over that group);
  an activation input missing one gets partial gradients (backward all-reduce); a weight
  missing one is replicated there, so its gradient is all-reduced over that group (data
  parallelism), or reduce-scattered and all-gathered twice under FSDP; these weight collectives
  run on their own stream beside the compute (DDP's bucketed all-reduce during backward, FSDP's
  prefetched all-gathers), so with ``overlap_gradients`` only the part longer than the layer's
  backward (FSDP: forward + backward) compute is charged. That is additive per layer, and as
  the sync of one bucket overlaps the backward of the next layers, whose compute is of the same
  order, it is a fair first model; ``pase verify`` measures what it misses;
- halo exchange for spatially split convolutions, statistics all-reduce for split norms;
- memory per device: weights, gradients and optimizer state of the local weight shard
  (divided by the replica group under FSDP) plus the activations kept for backward.
For an edge and every (producer, consumer) configuration pair: the re-layout volume that must
move (the consumer's local block minus its overlap with the producer's, forward activation
and backward gradient) at the cluster's per-device bandwidth.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from cost_models.cluster import Cluster
from cost_models.conventions import BUS_FACTOR, bytes_per_element
from cost_models.kernels import (
    KernelModel,
    gemm_extents,
    host_bound,
    host_ops_per_step,
    kernels_per_step,
    layer_utilization,
)
from cost_models.rates import HardwareRates
from pase.graph.attrs import EdgeAttrs, LayerAttrs, ParamInfo
from pase.graph.gating import gated_dims

COMPUTE_KINDS = frozenset({"conv", "linear", "matmul", "attention"})
NORM_KINDS = frozenset({"group_norm", "layer_norm", "batch_norm"})
TRAINING_BYTES_PER_PARAM = 16  # mixed-precision AdamW: bf16 weight + grad, fp32 master + two moments
# AdamW's step per parameter: reads the fp32 weight, gradient and two moments, writes the weight and moments
OPTIMIZER_BYTES_PER_PARAM = 28
# clipping by the global norm (pase train's default): the norm reads each fp32 gradient, the scaling reads and
# writes it (torch.nn.utils.clip_grad_norm_ always scales, by at most 1)
CLIP_BYTES_PER_PARAM = 12
# an exponential moving average of the weights (pase train --ema): lerp reads the average and the weight and writes
# the average
EMA_BYTES_PER_PARAM = 12
EMA_STATE_BYTES_PER_PARAM = 4  # the average itself, fp32
# DDP's default bucket: DDP, FSDP and pase's own gradient sync (strategies.tensor.GradientSync, and
# strategies.data for pipeline replicas) fuse gradient collectives into one call per 25 MiB, so the runtime and
# this model share the size.
GRADIENT_BUCKET_BYTES = 25 * 2**20
STACKS = ("eager", "graphed")  # how a step's kernels reach the GPU (CostOptions.stack)


class SplitTable(Protocol):
    """The configurations of one layer as the cost model reads them (``strategies.splits.SplitSpace`` is one):
    ``factors[k, i]`` is configuration k's split of ``dims[i]``."""

    @property
    def dims(self) -> tuple[str, ...]: ...

    @property
    def factors(self) -> np.ndarray: ...

    def __len__(self) -> int: ...


@dataclass
class CostOptions:
    precision: str = "bf16"
    fsdp: bool = False
    # with fsdp: gather the weights again for the backward ("full", ZeRO-3) or keep them gathered from the forward
    # through the backward ("gradients", ZeRO-2: FSDP2's reshard_after_forward=False): one gather less per
    # micro-step, the whole weights in the compute precision held while it runs
    reshard: bool = True
    checkpointing: bool = False
    bytes_per_param: int = TRAINING_BYTES_PER_PARAM
    overlap_gradients: bool = True  # weight collectives hide behind compute (see the module docstring)
    # activations enter and leave every layer batch-sharded over all devices (the runtime's layout between
    # layers, ``strategies.runnable``): a layer's partial sums are reduce-scattered to batch chunks, not all-reduced
    batch_interface: bool = False
    # "eager": every operator is dispatched by the host (pase's runtime), so a layer takes at least its operators'
    # dispatch time; "graphed": the step replays from CUDA graphs (published runs that capture whole iterations)
    stack: str = "eager"
    grad_clip: bool = True  # the step clips gradients by their global norm (pase train's default)
    ema: bool = False  # the step updates a moving average of the weights

    @property
    def step_bytes_per_param(self) -> int:
        """Bytes the once-per-step update moves per parameter a device updates: AdamW, clipping and EMA."""
        return OPTIMIZER_BYTES_PER_PARAM + CLIP_BYTES_PER_PARAM * self.grad_clip + EMA_BYTES_PER_PARAM * self.ema

    def __post_init__(self) -> None:
        if self.stack not in STACKS:
            raise ValueError(f"stack must be one of {', '.join(STACKS)}, not {self.stack!r}")


@dataclass
class CostModel:
    cluster: Cluster
    rates: HardwareRates
    options: CostOptions = field(default_factory=CostOptions)

    def __post_init__(self) -> None:
        self.devices = self.cluster.world_size
        self._collective = lru_cache(maxsize=None)(self._collective_uncached)
        self.relayout_gbps = self.rates.collective("all_gather", list(range(self.devices))).busbw_gbps \
            if self.devices > 1 else float("inf")
        self.kernels = KernelModel.for_gpu(self.cluster.gpu, self.options.stack)

    def gemm_seconds(self, layer: LayerAttrs, dims: list[str], extent: np.ndarray, f: np.ndarray,
                     flops: float, rate: float) -> np.ndarray:
        """Seconds of ``flops`` (a forward, or forward and backward) of a GEMM-like layer split as ``f``, at the
        kind's rate times the wave utilisation of each device's share (``cost_models.kernels``). A backward's
        weight gradient is a GEMM of its own shape (output channels x input channels and kernel, summed over the
        rows), so it is utilised apart: half the backward's FLOPs, as the rules count them."""
        used = f.prod(axis=1)
        if self.kernels is None:
            return flops / used / rate
        local = {d: extent[i] / f[:, i] for i, d in enumerate(dims)}
        util = layer_utilization(self.kernels, layer, local)
        forward = float(layer["flops_fwd"])
        backward = flops - forward
        if layer["op"] == "attention" or backward <= 0:
            return flops / used / (rate * util)
        rows, cols, inputs = gemm_extents(layer, local)
        weight_util = self.kernels.utilization(cols, inputs, rows)
        return ((forward + backward / 2) / util + backward / 2 / weight_util) / used / rate

    def kernel_floor(self, layer: LayerAttrs, training: bool = True) -> float:
        """The per-kernel floor of every kernel ``layer`` launches in a step (forward, and backward if training)."""
        if self.kernels is None or layer["op"] in ("input", "output"):
            return 0.0
        return kernels_per_step(layer["op"], len(layer.get("fused_ops", ())), training) * self.kernels.floor_s

    def host_ops(self, layer: LayerAttrs, training: bool = True) -> int:
        """Operators the host dispatches for ``layer`` in a step (``cost_models.kernels.host_ops_per_step``): under
        a mixed precision, autocast casts each of its trainable weights, and casts their gradients back."""
        casts = len(trainable_weights(layer)) if self.options.precision != "fp32" else 0
        return host_ops_per_step(layer["op"], len(layer.get("fused_ops", ())), training, casts)

    # ------------------------------------------------------------------ collectives
    def _collective_uncached(self, op: str, group: int, stride: int) -> tuple[tuple[float, float], ...]:
        """(latency, bus bandwidth) of each algorithm NCCL chooses among for this group."""
        ranks = [(i * stride) % self.devices for i in range(group)]
        return tuple((rate.alpha_s, rate.busbw_gbps) for rate in self.rates.collective_algorithms(op, ranks))

    def collective_seconds(self, op: str, nbytes: np.ndarray, group: np.ndarray, stride: np.ndarray | int,
                           bucketed: bool = False) -> np.ndarray:
        """Time of ``op`` on ``nbytes`` per device over groups of ``group`` ranks spaced ``stride`` apart.

        ``bucketed`` collectives (weight gradients) share their latency with the rest of a
        gradient bucket, as DDP and FSDP fuse them: each pays its share of one call's latency. Each size runs by
        the quickest algorithm (``HardwareRates.collective_algorithms``), as NCCL's tuner picks.
        """
        out = np.zeros(np.broadcast(nbytes, group, stride).shape)
        nbytes, group, stride = np.broadcast_arrays(nbytes, group, stride)
        # distinct (group, stride) pairs: a handful per layer, found over Python ints (not numpy scalars)
        pairs = set(zip(group.ravel().tolist(), stride.ravel().tolist()))
        for g, s in ((int(g), int(s)) for g, s in pairs if g > 1):
            where = (group == g) & (stride == s)
            sizes = nbytes[where]
            share = np.minimum(1.0, sizes / GRADIENT_BUCKET_BYTES) if bucketed else 1.0
            # NCCL picks by the call's size: a bucket's (whole) size, or the collective's own
            call = np.maximum(sizes, GRADIENT_BUCKET_BYTES) if bucketed else sizes
            times = [(alpha + call * BUS_FACTOR[op](g) / (busbw * 1e9), alpha * share
                      + sizes * BUS_FACTOR[op](g) / (busbw * 1e9)) for alpha, busbw in self._collective(op, g, s)]
            pick = np.argmin(np.stack([whole for whole, _ in times]), axis=0)
            out[where] = np.choose(pick, [priced for _, priced in times])
        return out

    @staticmethod
    def collective_bytes(op: str, nbytes: np.ndarray, group: np.ndarray) -> np.ndarray:
        """Bytes ``op`` moves per device (``nbytes`` x the bus factor of ``cost_models.conventions``): the
        figure ``pase verify`` counts at the torch.distributed call boundary."""
        nbytes, group = np.broadcast_arrays(np.asarray(nbytes, dtype=np.float64), np.asarray(group))
        out = np.zeros(nbytes.shape)
        for g in {int(g) for g in group.ravel().tolist() if g > 1}:
            where = group == g
            out[where] = nbytes[where] * BUS_FACTOR[op](g)
        return out

    # ------------------------------------------------------------------ layers
    def layer_costs(self, layer: LayerAttrs, space: SplitTable, block_output: bool = True,
                    parts: dict[str, np.ndarray] | None = None, recomputed: bool | None = None,
                    sharding: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(compute seconds, communication seconds, bytes per device) for every configuration of
        ``layer``. O(K * dims). When ``parts`` is given it receives the pieces a pipeline prices
        apart: "weight_sync" (the exposed part of the whole gradients' all-reduce inside ``comm``: once per step
        under gradient accumulation or microbatches, where FSDP's gathers and reduce-scatters run every time),
        "sync_bytes" (the bytes that all-reduce moves per device), "saved" (the activation bytes inside the
        memory, per microbatch), "weight_bytes" (the local weight-gradient shard), "comm_bytes" (bytes every
        collective of ``comm`` moves per device, hidden or not) and "optimizer" (the AdamW step, gradient clipping and
        any EMA update over the parameters this device updates, inside the compute; once per step, like
        "weight_sync"). ``sharding`` ("none",
        "gradients" or "full": ``strategies.sharding``) prices the layer's state as its block is sharded, instead of
        as the options shard every layer."""
        fsdp = self.options.fsdp if sharding is None else sharding != "none"
        reshard = self.options.reshard if sharding is None else sharding == "full"
        f = self._factor_table(layer, space)  # (K, D) over all layer dims
        dims = list(layer["dims"])
        extent = np.array([layer["dims"][d] for d in dims], dtype=np.float64)
        used = f.prod(axis=1)
        itemsize = bytes_per_element(self.options.precision)
        maps = layer["tensors"]
        out_map = maps["output"]
        gated = gated_dims(layer)  # a GEGLU projection: its anchor computes the 2F channels its output halves
        anchor_map = [gated[0] if d == gated[1] else d for d in out_map] if gated else out_map

        def local(tensor_map: list, table: np.ndarray = f) -> np.ndarray:
            """Elements of a tensor over ``tensor_map`` held by one device."""
            idx = [dims.index(d) for d in tensor_map if d in dims]
            return (extent[idx].prod() / table[:, idx].prod(axis=1)) if idx else np.ones(len(f))

        def missing(tensor_map: list, among: set[str | None] | None = None) -> np.ndarray:
            """Product of the splits of dimensions (``among`` these) a tensor does not run over."""
            idx = [i for i, d in enumerate(dims) if d not in tensor_map and (among is None or d in among)]
            return f[:, idx].prod(axis=1) if idx else np.ones(len(f), dtype=np.int64)

        def gradient_group(weight_map: list) -> np.ndarray:
            """Devices whose gradients of this weight differ and must be summed: the splits of the dims
            its gradient contraction sums over (output dims for a bias or scale, output and input dims
            for a weight). Between batch layouts a reduction split's partial sums are reduce-scattered to
            batch chunks before the bias is added, so a bias's gradient is summed over that split too."""
            if set(weight_map) <= set(anchor_map):
                summed = set(anchor_map) | (reductions if self.options.batch_interface else set())
            else:
                summed = set(anchor_map).union(*map(set, activations))
            return missing(weight_map, summed)

        kind = layer["op"]
        reductions = {d for d in dims if layer["roles"][d] == "reduction" and kind in ("conv", "linear")}
        flops = float(layer["flops_fwd"] + layer["flops_bwd"])
        activations = maps.get("inputs", [])
        weights = trainable_weights(layer)
        out_local = local(out_map, self._factor_table(layer, space, output=True))
        scales = _input_scales(layer)  # a strided convolution reads a larger grid than its output's
        touched = out_local + sum((local(m) * k for m, k in zip(activations, scales)), np.zeros(len(f)))
        weight_local = sum((p["numel"] / np.maximum(1, self._weight_split(p["map"], dims, f)) for p in weights),
                           np.zeros(len(f)))
        memory_rate = self.rates.memory(kind).value
        seconds = np.zeros(len(f))
        if kind in COMPUTE_KINDS and flops > 0:
            compute_rate = self.rates.compute(kind).value
            seconds += np.maximum(self.gemm_seconds(layer, dims, extent, f, flops, compute_rate),
                                  3 * (touched + weight_local) * itemsize / memory_rate)
        pointwise = float(layer.get("pointwise_elems", 0)) * itemsize * 4  # fwd read+write, bwd read+write
        seconds += pointwise / used / memory_rate + self.kernel_floor(layer)
        seconds = host_bound(seconds, self.host_ops(layer), self.kernels)
        # under checkpointing a layer inside a checkpointed block runs its forward again in the backward (the
        # block's outputs too: checkpointing re-runs the whole block), forward collectives included
        recomputed = (not block_output) if recomputed is None else recomputed
        if self.options.checkpointing and recomputed and kind in COMPUTE_KINDS:  # recompute forward
            recompute = self.gemm_seconds(layer, dims, extent, f, float(layer["flops_fwd"]),
                                          self.rates.compute(kind).value) + self.kernel_floor(layer, training=False)
            seconds += host_bound(recompute, self.host_ops(layer, training=False), self.kernels)

        # collectives from the tensor maps
        comm_bytes = np.zeros(len(f))

        def priced(op: str, nbytes: np.ndarray, group: np.ndarray, stride: np.ndarray | int = 1,
                   bucketed: bool = False) -> np.ndarray:
            nonlocal comm_bytes
            comm_bytes = comm_bytes + self.collective_bytes(op, nbytes, group)
            return self.collective_seconds(op, nbytes, group, stride, bucketed)

        # partial sums (of a reduction split): all-reduced in place, or, between batch layouts, reduce-scattered to
        # batch chunks, whose backward all-gathers the gradient (the layer's whole way back to the batch layout)
        partials = "reduce_scatter" if self.options.batch_interface else "all_reduce"
        summed, reducing = local(anchor_map) * itemsize, missing(anchor_map)
        comm = priced(partials, summed, reducing)
        if self.options.batch_interface:
            comm += priced("all_gather", summed, reducing)
        if self.options.checkpointing and recomputed:  # the forward's partial sums are reduced again
            comm += priced(partials, summed, reducing)
        for m, grad, k in zip(activations, maps.get("inputs_grad") or [True] * len(activations), scales):
            if grad:  # the input's gradient is summed over the splits it does not run over (none without one)
                comm += priced(partials, local(m) * k * itemsize, missing(m))
        weight_sync = np.zeros(len(f))
        once = np.zeros(len(f))  # the all-reduce of whole gradients: paused between micro-steps, so once per step
        once_bytes = np.zeros(len(f))  # the bytes it moves per device
        reduction_split = f[:, [dims.index(d) for d in reductions]].prod(axis=1) > 1 if reductions else \
            np.zeros(len(f), dtype=bool)
        for p in weights:
            replicas = gradient_group(p["map"])
            shard = p["numel"] / self._weight_split(p["map"], dims, f) * itemsize
            stride = np.maximum(1, used // np.maximum(1, replicas))
            # under FSDP a parameter is sharded with its module's data-parallel peers; the bias of an in-split,
            # summed over every rank (``gradient_group``), stays whole and is all-reduced instead
            whole = ~np.asarray(fsdp, dtype=bool) | (
                reduction_split & (set(p["map"]) <= set(anchor_map)) & self.options.batch_interface)
            # FSDP2 shards a parameter's dim 0 and pads it to a multiple of the shard count: the padded rows travel too
            rows = _dim0_rows(p, dims, f)
            padded = np.ceil(rows / np.maximum(1, replicas)) * np.maximum(1, replicas) / rows
            sharded = np.where(whole, 0.0, shard * padded)
            weight_sync += priced("reduce_scatter", sharded, replicas, stride, bucketed=True)
            gathers = 2 if reshard else 1
            weight_sync += gathers * priced("all_gather", sharded, replicas, stride, bucketed=True)
            if reshard:  # the backward's gather (a kept weight is gathered once)
                comm_bytes = comm_bytes + self.collective_bytes("all_gather", sharded, replicas)
            reduced = priced("all_reduce", np.where(whole, shard, 0.0), replicas, stride, bucketed=True)
            weight_sync += reduced
            once += reduced
            once_bytes = once_bytes + self.collective_bytes("all_reduce", np.where(whole, shard, 0.0), replicas)
        if self.options.overlap_gradients:
            hiding = seconds if fsdp else seconds * float(layer["flops_bwd"]) / max(flops, 1.0)
            exposed = np.maximum(0.0, weight_sync - hiding)
            once = np.divide(once * exposed, weight_sync, out=np.zeros(len(f)), where=weight_sync > 0)
            weight_sync = exposed
        comm += weight_sync
        halo, halo_bytes = self._halo(layer, dims, f, extent, itemsize)
        stats, stats_bytes = self._norm_stats(layer, dims, f, extent)
        comm += halo + stats
        comm_bytes = comm_bytes + halo_bytes + stats_bytes

        # memory per device, and the optimizer's step over the parameters this device updates (its shard under FSDP)
        state = weight_local * self.options.bytes_per_param
        updated = weight_local
        if fsdp and weights:
            replicas = np.max(np.stack([gradient_group(p["map"]) for p in weights]), axis=0)
            state = state / replicas
            updated = weight_local / replicas
            if not reshard:  # the gathered weights, kept from the forward to the end of the backward
                state = state + np.where(replicas > 1, weight_local * itemsize, 0.0)
        if self.options.ema:  # the moving average of the parameters this device updates, in fp32
            state = state + updated * EMA_STATE_BYTES_PER_PARAM
        saved = out_local * itemsize
        if self.options.checkpointing and not block_output:
            saved = np.zeros(len(f))
        optimizer = updated * self.options.step_bytes_per_param / self.rates.memory("optimizer").value
        seconds = seconds + optimizer
        if parts is not None:
            parts.update(weight_sync=once, saved=saved, weight_bytes=weight_local * itemsize,
                         comm_bytes=comm_bytes, sync_bytes=once_bytes, optimizer=optimizer)
        return seconds, comm, state + saved

    @staticmethod
    def _weight_split(weight_map: list, dims: list[str], f: np.ndarray) -> np.ndarray:
        idx = [dims.index(d) for d in weight_map if d in dims]
        return f[:, idx].prod(axis=1) if idx else np.ones(len(f), dtype=np.int64)

    @staticmethod
    def _factor_table(layer: LayerAttrs, space: SplitTable, output: bool = False) -> np.ndarray:
        """Per configuration, the split of every layer dimension. ``output``: as the layer's output holds it,
        where a gated projection's output channels split with its projection channels
        (``pase.graph.gating.gated_dims``; not an extra split of the devices, so only for the output)."""
        dims = list(layer["dims"])
        table = np.ones((len(space), len(dims)), dtype=np.int64)
        for j, name in enumerate(space.dims):
            table[:, dims.index(name)] = space.factors[:, j]
        gated = gated_dims(layer) if output else None
        if gated is not None:
            table[:, dims.index(gated[1])] = table[:, dims.index(gated[0])]
        return table

    def _halo(self, layer: LayerAttrs, dims: list[str], f: np.ndarray, extent: np.ndarray,
              itemsize: int) -> tuple[np.ndarray, np.ndarray]:
        """(seconds, bytes per device) of a spatially split convolution's halo exchange, forward and backward: along
        each split spatial axis the busiest rank sends ``kernel // 2`` boundary rows of its input (all its input
        channels and samples) to each neighbour, one neighbour for a 2-way split and two beyond, and gets the rows'
        gradients back the same way (``strategies.spatial``) unless its input carries no gradient."""
        none = (np.zeros(len(f)), np.zeros(len(f)))
        roles = layer["roles"]
        spatial = [d for d in dims if roles[d] == "spatial"]
        kernels = [d for d in dims if roles[d] == "kernel"]
        if layer["op"] != "conv" or not spatial or len(kernels) != len(spatial):
            return none
        carried = [i for i, d in enumerate(dims) if roles[d] in ("batch", "reduction")]  # the input's other dims
        plane = extent[carried].prod() / f[:, carried].prod(axis=1) if carried else np.ones(len(f))
        nbytes = np.zeros(len(f))
        for d, kernel in zip(spatial, kernels):
            split = f[:, dims.index(d)]
            sides = np.where(split > 2, 2, np.where(split > 1, 1, 0))
            across = np.prod([extent[dims.index(o)] / f[:, dims.index(o)] for o in spatial if o != d], axis=0)
            nbytes += sides * (int(layer["dims"][kernel]) // 2) * across * plane * itemsize
        pairs = np.where(nbytes > 0, 2, 1)
        ways = 2 if (layer["tensors"].get("inputs_grad") or [True])[0] else 1  # forward, and backward for a gradient
        return (np.where(nbytes > 0, ways * self.collective_seconds("send_recv", nbytes, pairs, 1), 0.0),
                ways * self.collective_bytes("send_recv", nbytes, pairs))

    def _norm_stats(self, layer: LayerAttrs, dims: list[str], f: np.ndarray,
                    extent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(seconds, bytes per device): mean and variance are reduced over the dims a norm normalises, so
        a split there needs an all-reduce of the statistics (forward and backward); a split elsewhere none."""
        kind = layer["op"]
        none = (np.zeros(len(f)), np.zeros(len(f)))
        if kind not in NORM_KINDS:
            return none
        reduced_roles = {"group_norm": ("spatial",), "layer_norm": ("channel",),
                         "batch_norm": ("batch", "spatial")}[kind]
        reduced = [i for i, d in enumerate(dims) if layer["roles"][d] in reduced_roles]
        kept = [i for i in range(len(dims)) if i not in reduced and layer["roles"][dims[i]] != "channel"]
        if not reduced:
            return none
        group = f[:, reduced].prod(axis=1)
        statistics = (extent[kept].prod() / f[:, kept].prod(axis=1)) if kept else np.ones(len(f))
        if kind == "group_norm":
            statistics = statistics * int(layer.get("attrs", {}).get("groups", 32))
        elif kind == "batch_norm":
            statistics = extent[[i for i, d in enumerate(dims) if layer["roles"][d] == "channel"]].prod() \
                * np.ones(len(f))
        return (2 * self.collective_seconds("all_reduce", 2 * 4 * statistics, group, 1),
                2 * self.collective_bytes("all_reduce", 2 * 4 * statistics, group))

    # ------------------------------------------------------------------ edges
    def relayout_bytes(self, seconds: np.ndarray | float) -> np.ndarray:
        """Bytes per device behind re-layout ``seconds`` from ``edge_costs`` (one rate prices every re-layout)."""
        return np.asarray(seconds) * (self.relayout_gbps * 1e9 if self.devices > 1 else 0.0)

    def edge_costs(self, edge: EdgeAttrs, producer: LayerAttrs, src: SplitTable, consumer: LayerAttrs,
                   dst: SplitTable, forward_only: bool = False) -> np.ndarray:
        """Re-layout seconds for every (producer config, consumer config) pair: (K_src, K_dst). A tensor that
        carries no gradient (a model input, the timestep embedding) re-lays out forward only."""
        forward_only = forward_only or not edge.get("requires_grad", True)
        shape = np.array(edge["shape"], dtype=np.float64)
        if self.devices <= 1 or not len(shape):
            return np.zeros((len(src), len(dst)))
        fp = self._factor_table(producer, src, output=True)
        fc = self._factor_table(consumer, dst)
        pdims, cdims = list(producer["dims"]), list(consumer["dims"])
        axes = len(shape)
        # configurations that differ only in dimensions the tensor does not run over hold the same
        # block: price each distinct (producer block, consumer block) pair once, then spread
        s_rows, s_of = _distinct_rows(fp, [pdims.index(n) for names in edge["src_map"] for n in names if n in pdims])
        t_rows, t_of = _distinct_rows(fc, [cdims.index(n) for n in edge["dst_map"] if n in cdims])
        fp, fc = fp[s_rows], fc[t_rows]
        s_split = np.ones((len(fp), axes))
        for a, names in enumerate(edge["src_map"]):
            for name in names:
                if name in pdims:
                    s_split[:, a] *= fp[:, pdims.index(name)]
        t_split = np.ones((len(fc), axes))
        for j, read_dim in enumerate(edge["dst_map"]):
            base_axes = edge["axis_map"][j] if j < len(edge["axis_map"]) else []
            if read_dim is not None and read_dim in cdims and base_axes:
                # a tensor covering part of the consumer's dimension (one input of a concat) is read
                # by fewer device groups: its effective split shrinks by the share it covers
                share = edge["dst_shape"][j] / max(1, consumer["dims"][read_dim])
                t_split[:, base_axes[0]] *= np.maximum(1.0, fc[:, cdims.index(read_dim)] * min(1.0, share))
        s_block = shape / np.maximum(1, np.minimum(s_split, shape))
        t_block = shape / np.maximum(1, np.minimum(t_split, shape))
        target = t_block.prod(axis=1)
        source = s_block.prod(axis=1)
        overlap = np.ones((len(s_block), len(t_block)))
        for a in range(axes):
            overlap *= np.minimum.outer(s_block[:, a], t_block[:, a])
        # forward: the consumer gathers its block; backward: the producer gathers the gradient of its own
        moved = np.maximum(0.0, target[None, :] - overlap)
        if not forward_only:
            moved = moved + np.maximum(0.0, source[:, None] - overlap)
        fraction = min(1.0, edge["bytes"] / max(1.0, shape.prod() * edge["dtype_bytes"]))
        itemsize = bytes_per_element(self.options.precision, edge["dtype_bytes"])
        seconds = moved * (fraction * itemsize / (self.relayout_gbps * 1e9))
        return seconds[np.ix_(s_of, t_of)]


def trainable_weights(layer: LayerAttrs) -> list[ParamInfo]:
    """The layer's parameters the optimizer updates (trainable, with a tensor map and a size)."""
    return [p for p in layer["params"].values() if p.get("trainable") and "map" in p and "numel" in p]


def _dim0_rows(param: Mapping[str, Any], dims: list[str], f: np.ndarray) -> np.ndarray:
    """Rows of a parameter's dim 0 on one device (its extent over the split of the layer dim it maps to)."""
    shape, mapped = param.get("shape") or [param["numel"]], (param.get("map") or [None])[0]
    split = f[:, dims.index(mapped)] if mapped in dims else np.ones(len(f))
    return np.maximum(1.0, shape[0] / split)


def _input_scales(layer: LayerAttrs) -> list[float]:
    """Per input activation, its elements over those of the layer dimensions it runs over. A convolution's
    input runs over the output's spatial grid, which a stride ``s`` shrinks: its input holds ``s`` times more
    along each such axis (exactly so for the even sizes and "same"-style padding of UNet downsamplers)."""
    inputs = layer["tensors"].get("inputs", [])
    if layer["op"] != "conv":
        return [1.0] * len(inputs)
    spatial = [d for d, role in layer["roles"].items() if role == "spatial"]
    stride = layer.get("attrs", {}).get("stride", 1)
    strides = list(stride) if isinstance(stride, (list, tuple)) else [stride] * len(spatial)
    return [float(np.prod([int(s) for d, s in zip(spatial, strides) if d in names])) for names in inputs]


def _distinct_rows(factors: np.ndarray, columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(index of the first row of each distinct value of ``factors[:, columns]``, each row's distinct index).

    Split factors are small positive integers, so a row's columns pack exactly into one int64 key
    (base: the largest factor + 1), which ``np.unique`` sorts far faster than rows."""
    if not columns:
        return np.zeros(1, dtype=np.int64), np.zeros(len(factors), dtype=np.int64)
    picked = factors[:, columns]
    base = int(picked.max()) + 1
    if base ** len(columns) >= 2**62:
        _, first, inverse = np.unique(picked, axis=0, return_index=True, return_inverse=True)
        return first, inverse.ravel()
    key = np.zeros(len(factors), dtype=np.int64)
    for column in picked.T:
        key = key * base + column
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return first, inverse.ravel()
