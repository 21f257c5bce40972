"""The configurations the runtime runs exactly as planned: the search's default space, and the runtime's check.

One rule, read by both sides, so that a plan is a promise: ``pase.planning`` searches only these
configurations (unless asked for ``--space all``, whose plans say they are not runnable), and
``pase.runtime`` refuses any layer outside them instead of running it some other way.

Between layers the runtime keeps every activation batch-sharded over all ``p`` ranks (rank ``r``
holds batch chunk ``r``). A layer then runs as one of:

- **batch** (``strategies.data``): ``{batch: p}``, every layer kind; a layer without a batch
  dimension (a table, a constant) runs whole on every rank (``{}``);
- **out** / **in** (``strategies.tensor``, column / row parallel): a plain Conv2d or Linear
  (ungrouped, not transposed) with ``{batch: p/t, out_channel: t}`` or ``{batch: p/t, reduction: t}``
  for ``1 < t | p``, on a tensor-parallel group of ``t`` consecutive ranks; an out-split also with
  ``{batch: b, out_channel: t}``, ``b * t < p``: each output part computed by ``p / (b * t)`` replicas
  (``strategies.replication``), never keeping its layout, not under FSDP;
- **grid** (``strategies.tensor``, 2-D tensor parallel): a plain Conv2d or Linear with
  ``{batch: p/(t*u), out_channel: t, reduction: u}`` on a ``t x u`` grid of consecutive ranks, each
  holding one weight block;
- **heads** (``strategies.tensor``): attention computed by ``scaled_dot_product_attention`` with
  ``{batch: p/t, head: t}``;
- **outspatial** (``strategies.spatial``): a plain convolution (stride 1, "same" padding along the rows) with
  ``{batch: p/(f*s), out_channel: f, h or w: s}`` on an ``f x s`` grid of ranks: its rows of the grid's batch, all
  input channels, a halo exchange, and this rank's output channels; not under FSDP;
- **spatial** (``strategies.spatial``): a convolution (stride 1, "same" padding) or a group norm with
  ``{batch: p/t, h or w: t}``, on its rows of the group's batch: a convolution exchanges its boundary rows
  with its neighbours (halo), a group norm sums its statistics over the group;
- **seq** (``strategies.tensor``): the same attention with ``{batch: p/t, query sequence: t}``, each rank
  attending from its part of the queries to every key and value of the group's batch (gathered);
- **replicated** (``strategies.replication``): a whole Conv2d, Linear, GroupNorm or LayerNorm module, or an SDPA
  attention, with ``{batch: p/t}`` (``t > 1``: fewer ranks than the world, PaSE's "idle devices"), on groups of
  ``t`` consecutive ranks that each compute the group's batch (replicas), gradients summed over the ``p/t`` groups;
- **norm** (``strategies.tensor``): a LayerNorm with ``{batch: p/t, channel: t}``, its statistics summed over the
  group;
- **local** (``strategies.tensor``): a group norm (whole groups) or an elementwise layer with
  ``{batch: p/t, channel: t}``, run on this rank's channels without communication. Such a layer
  neither takes nor gives the batch layout: its activations stay channel-split (see below).

**Kept layouts.** An activation stays channel-split between two layers, with no collective, when its
producer can give that layout (an out-split with that one consumer, or a local layer) and its
consumer can take it (an in-split or a local layer) with the same degree, on the same tensor axis
(``edge_mode``: "kept"). This is Megatron's pairing, applied to a UNet's ResNet block: ``conv1``
out-split, the time-embedding add and ``norm2`` (+ SiLU) local, ``conv2`` in-split: one all-gather
in and one reduce-scatter out for the block; and to attention: ``to_q``/``to_k``/``to_v``
out-split, the attention on its heads (a diffusers ``Attention``, whose processor the runtime
replaces), ``to_out`` in-split. Every other edge passes through the batch layout
("batch"), which a local layer cannot do: a local layer whose neighbour does not keep the layout
is not runnable (``edge_mode`` None), and the search prices that pair as infinite.

Under FSDP the same layouts run, each module's parameters sharded over its data-parallel peers
(``strategies.tensor.shard_parameters``). Every other configuration (spatial splits of other layers,
sequence splits of other layers than attention, two dimensions besides the batch other than a grid, fewer
devices than ``p`` together with a split other than output channels, replicas of other layers) is priced only
by ``--space all``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pase.graph.gating import gated_dims
from strategies.splits import SplitSpace

# the module classes (as the graph records them) whose forward is the whole of one layer: the runtime can run them
# on replica groups (``pase.runtime.parallel`` checks the live modules against the same torch.nn classes)
LAYER_NORM_MODULE = "torch.nn.modules.normalization.LayerNorm"
REPLICABLE_MODULES = ("torch.nn.modules.conv.Conv2d", "torch.nn.modules.linear.Linear",
                      "torch.nn.modules.normalization.GroupNorm", LAYER_NORM_MODULE)

SPACES = ("runnable", "all")  # pase plan --space
# ops that run on their channel part alone (not upsampling: diffusers' Upsample2D asserts its channel count)
LOCAL_OPS = ("group_norm", "elementwise")
SPATIAL_OPS = ("conv", "group_norm")  # ops the runtime splits by rows (halo exchange; statistics all-reduce)
GIVES_CHANNELS = ("out", "local", "heads")  # layer runs whose output can stay channel-split
TAKES_CHANNELS = ("in", "local", "heads")  # layer runs that can take a channel-split input
SDPA = "scaled_dot_product_attention"  # the attention op the runtime splits by heads
# attention modules whose q, k, v and output the runtime can keep head-split (it installs its own processor)
KEEPING_ATTENTION = ("diffusers.models.attention_processor.Attention",)
TENSOR_RUNS = ("out", "in", "heads", "grid")  # layer runs with their own tensor-parallel collectives
KEPT_RULE = ("A channel-split norm or elementwise layer, or an out-split GEGLU projection, runs only between layers "
             "that keep its layout (before it, an out-split conv/linear with it as its one consumer or another "
             "channel-split layer; after it, an in-split or channel-split layer; same degree)")
TENSOR_LAYOUTS = {("conv", "out_channel"): "out", ("conv", "reduction"): "in", ("linear", "out_channel"): "out",
                  ("linear", "reduction"): "in", ("attention", "head"): "heads", ("attention", "sequence"): "seq",
                  ("layer_norm", "channel"): "norm"}


@dataclass(frozen=True)
class LayerRun:
    """How the runtime runs one layer: ``kind`` is "batch", "out", "in", "heads", "seq" (attention's query
    sequence), "spatial", "local", "norm" (a layer norm's channels), "grid" (output and input channels at once)
    "outspatial" (output channels and rows) or "replicated"; ``factor`` the tensor-parallel degree (1 for batch; a
    grid's or outspatial's output-channel split; the ranks
    of a replica group); ``dim`` the layer dimension split ``factor`` ways (None for batch and replicas)."""
    kind: str
    factor: int = 1
    dim: str | None = None
    gated: bool = False  # an out-split of a GEGLU projection: interleaved rows, ``dim`` its output channels
    inner: int = 1  # a "grid" run's input-channel split (``factor`` splits its output channels)
    inner_dim: str | None = None  # that input-channel dimension
    replicas: int = 1  # an "out" run on replica groups: the batch split over fewer ranks than the world

    @property
    def ranks(self) -> int:
        """Ranks of one tensor-parallel group of this run (1 for batch)."""
        return self.factor * self.inner * self.replicas

    @property
    def label(self) -> str:
        """How it prints: "batch", "out/2", "grid/2x2" (output x input channels), "out/2+replicas/2"."""
        if self.kind == "batch":
            return "batch"
        if self.kind in ("grid", "outspatial"):
            return f"{self.kind}/{self.factor}x{self.inner}"
        return f"{self.kind}/{self.factor}" + (f"+replicas/{self.replicas}" if self.replicas > 1 else "")


class NotRunnable(ValueError):
    """A configuration the runtime would not run as planned; the message says why."""


def layer_run(layer: Mapping[str, Any], splits: Mapping[str, int], devices: int, fsdp: bool = False) -> LayerRun:
    """The runtime's layout for ``layer`` under ``splits`` on ``devices`` ranks, or ``NotRunnable``."""
    roles = layer["roles"]
    split = {d: int(f) for d, f in splits.items() if int(f) > 1}
    batch_dims = [d for d, role in roles.items() if role == "batch"]
    batch = int(np.prod([split.get(d, 1) for d in batch_dims])) if batch_dims else 1
    others = {d: f for d, f in split.items() if roles.get(d) != "batch"}
    if not others:
        if batch == devices or (not batch_dims and batch == 1):
            return LayerRun("batch")
        return _replicated_run(layer, batch, devices)
    if len(others) > 1:
        return _grid_run(layer, others, batch, devices, fsdp)
    (dim, factor), = others.items()
    role, op = roles.get(dim), layer["op"]
    kind = TENSOR_LAYOUTS.get((op, role)) or ("local" if role == "channel" and op in LOCAL_OPS else None) or \
        ("spatial" if role == "spatial" and op in SPATIAL_OPS else None)
    if kind is None:
        raise NotRunnable(f"{role} splits of {op} layers have no runtime (only {_tensor_kinds()})")
    if kind == "local":
        _check_local(layer, dim, factor)
    if kind == "spatial":
        _check_spatial(layer, dim, factor)
    if kind == "norm":
        _check_channel_norm(layer, dim)
    gated = gated_dims(layer)
    if kind == "out" and dim not in layer["tensors"]["output"] and not (gated and gated[0] == dim):
        fused = ", ".join(layer.get("fused_ops", []))
        raise NotRunnable(f"its output channels are regrouped by ops fused after it ({fused}): the runtime splits "
                          "output channels only where the output keeps them or a GEGLU halves them")
    built = layer.get("attrs", {}).get("attention_of")  # attention the graph folded from matmul, softmax, matmul
    if kind in ("heads", "seq") and built:
        raise NotRunnable(f"{role} splits of attention computed as {built} have no runtime (the runtime splits "
                          f"torch's {SDPA})")
    if kind == "seq" and dim not in layer["tensors"]["output"]:
        raise NotRunnable(f"a split of the key/value sequence {dim} would need a distributed softmax: the runtime "
                          "splits the query sequence")
    if kind in ("out", "in") and not _plain(layer):
        raise NotRunnable(f"{role} splits of grouped or transposed {op} layers have no runtime")
    if kind == "out" and not (gated and gated[0] == dim) and batch * factor < devices and \
            devices % (batch * factor) == 0:  # each output part computed by replicas (strategies.replication)
        if fsdp:
            raise NotRunnable(f"{role} split {factor} x batch split {batch} on {devices} ranks (replicas of each "
                              "part) has no FSDP runtime")
        return LayerRun(kind, factor, dim, replicas=devices // (batch * factor))
    if batch * factor != devices:
        raise NotRunnable(f"{role} split {factor} x batch split {batch} uses {batch * factor} of {devices} ranks: "
                          "the runtime needs the batch split over the rest")
    if kind == "out" and gated and gated[0] == dim:  # rows interleaved: this rank's output channels of both halves
        return LayerRun(kind, factor, gated[1], gated=True)
    return LayerRun(kind, factor, dim)


def _grid_run(layer: Mapping[str, Any], others: dict[str, int], batch: int, devices: int,
              fsdp: bool = False) -> LayerRun:
    """A plain Conv2d or Linear split over both its output and its input channels (a 2-D tensor-parallel grid), or
    a plain Conv2d over its output channels and its rows (height or width)."""
    roles = {layer["roles"].get(d): d for d in others}
    out_dim, in_dim = roles.get("out_channel"), roles.get("reduction")
    if len(others) == 2 and layer["op"] == "conv" and out_dim is not None and "spatial" in roles:
        return _out_spatial_run(layer, others, out_dim, roles["spatial"], batch, devices, fsdp)
    if len(others) != 2 or layer["op"] not in ("conv", "linear") or out_dim is None or in_dim is None:
        raise NotRunnable(f"{' x '.join(sorted(others))}: the runtime splits two dimensions besides the batch only "
                          "as output x input channels of a conv or linear, or output channels x rows of a conv")
    if not _plain(layer):
        raise NotRunnable(f"output x input channel splits of grouped or transposed {layer['op']} layers have no "
                          "runtime")
    if out_dim not in layer["tensors"]["output"]:
        fused = ", ".join(layer.get("fused_ops", []))
        raise NotRunnable(f"its output channels are regrouped by ops fused after it ({fused}): the runtime splits "
                          "output channels only where the output keeps them")
    out_factor, in_factor = others[out_dim], others[in_dim]
    if batch * out_factor * in_factor != devices:
        raise NotRunnable(f"output x input channel split {out_factor} x {in_factor} x batch split {batch} uses "
                          f"{batch * out_factor * in_factor} of {devices} ranks: the runtime needs the batch split "
                          "over the rest")
    return LayerRun("grid", out_factor, out_dim, inner=in_factor, inner_dim=in_dim)


def _replicated_run(layer: Mapping[str, Any], batch: int, devices: int) -> LayerRun:
    """A batch split over fewer ranks than the world: each group of ``devices / batch`` consecutive ranks runs its
    batch chunk as replicas (``strategies.replication``), for a layer that is one module's whole forward (or an
    attention computed by torch's SDPA), batch first in and out."""
    split = "unsplit" if batch == 1 else f"split {batch} ways"
    if devices % batch:
        raise NotRunnable(f"its batch is {split} on {devices} ranks, which do not form equal groups")
    tensors = layer["tensors"]
    batch_dim = _batch_dim(layer)
    if layer["op"] == "attention":
        if layer.get("attrs", {}).get("attention_of"):
            raise NotRunnable(f"its batch is {split} on {devices} ranks: replicas of attention computed as "
                              f"{layer['attrs']['attention_of']} have no runtime (the runtime gathers torch's {SDPA})")
    elif layer.get("module_class") not in REPLICABLE_MODULES or len(tensors.get("inputs", [])) != 1:
        raise NotRunnable(f"its batch is {split} on {devices} ranks: replicas run only layers that are a whole "
                          f"Conv2d, Linear, GroupNorm or LayerNorm (or an SDPA attention), not {layer['op']} of "
                          f"{layer.get('module_class') or 'no module'}")
    if any(names[:1] != [batch_dim] for names in (*tensors.get("inputs", []), tensors["output"])):
        raise NotRunnable(f"its batch is {split} on {devices} ranks: replicas need the batch first in and out")
    return LayerRun("replicated", devices // batch)


def _out_spatial_run(layer: Mapping[str, Any], others: dict[str, int], out_dim: str, rows_dim: str, batch: int,
                     devices: int, fsdp: bool) -> LayerRun:
    """A plain Conv2d split over its output channels ``f`` ways and its rows ``s`` ways (``strategies.spatial``:
    ``OutSpatialConv``), on ``f x s`` ranks of the group's batch."""
    if not _plain(layer):
        raise NotRunnable("output channel x row splits of grouped or transposed convolutions have no runtime")
    if out_dim not in layer["tensors"]["output"]:
        fused = ", ".join(layer.get("fused_ops", []))
        raise NotRunnable(f"its output channels are regrouped by ops fused after it ({fused}): the runtime splits "
                          "output channels only where the output keeps them")
    out_factor, rows = others[out_dim], others[rows_dim]
    _check_spatial(layer, rows_dim, rows)
    if batch * out_factor * rows != devices:
        raise NotRunnable(f"output channel x row split {out_factor} x {rows} x batch split {batch} uses "
                          f"{batch * out_factor * rows} of {devices} ranks: the runtime needs the batch split over the "
                          "rest")
    if fsdp:
        raise NotRunnable("output channel x row splits have no FSDP runtime (their weight gradients are summed over "
                          "rows and batch peers at once)")
    return LayerRun("outspatial", out_factor, out_dim, inner=rows, inner_dim=rows_dim)


def _check_spatial(layer: Mapping[str, Any], dim: str, factor: int) -> None:
    """A spatial split runs on the rows of this rank's part of the group's batch: a convolution with stride 1 and
    "same" zero padding along the split dimension (its neighbours' boundary rows exchanged, the halo), a group
    norm (its statistics summed over the group)."""
    if layer["op"] != "conv":
        return
    attrs = layer.get("attrs", {})
    spatial = [d for d, role in layer["roles"].items() if role == "spatial"]
    kernels = [d for d, role in layer["roles"].items() if role == "kernel"]
    axis = spatial.index(dim)
    kernel = int(layer["dims"][kernels[axis]]) if axis < len(kernels) else 1

    def along(value: Any) -> int:
        return int(value[axis] if isinstance(value, (list, tuple)) else value)

    stride, padding, dilation = (along(attrs.get(key, default)) for key, default in
                                 (("stride", 1), ("padding", 0), ("dilation", 1)))
    if attrs.get("transposed") or stride != 1 or dilation != 1 or kernel % 2 == 0 or padding != kernel // 2:
        raise NotRunnable(f"spatial splits run convolutions of stride 1 and odd kernels with 'same' padding, not "
                          f"stride {stride}, kernel {kernel}, padding {padding}, dilation {dilation}")
    if layer["dims"][dim] // factor < kernel // 2:
        raise NotRunnable(f"{layer['dims'][dim] // factor} rows per rank are fewer than its halo of {kernel // 2}")


def _check_channel_norm(layer: Mapping[str, Any], dim: str) -> None:
    """A channel-split layer norm is a whole ``nn.LayerNorm`` over the last axis (the split one), batch first, so
    that the runtime can exchange the channel parts of its one input and output (``ChannelLayerNorm``)."""
    tensors = layer["tensors"]
    batch = _batch_dim(layer)
    if layer.get("module_class") != LAYER_NORM_MODULE or len(tensors.get("inputs", [])) != 1:
        raise NotRunnable(f"channel splits of layer norms run whole nn.LayerNorm modules of one input, not "
                          f"{layer.get('module_class') or 'a function'}")
    if any(names[:1] != [batch] or names[-1:] != [dim] for names in (*tensors["inputs"], tensors["output"])):
        raise NotRunnable(f"channel splits of layer norms need the batch first and the channels {dim} last")


def _check_local(layer: Mapping[str, Any], dim: str, factor: int) -> None:
    """A local layer computes on its channel part alone: the split dimension runs through its output and
    every input unchanged, it owns no parameter but a group norm's affine ones, and a group norm keeps
    whole groups on each rank."""
    tensors = layer["tensors"]
    if dim not in tensors["output"] or any(dim not in m for m in tensors.get("inputs", [])):
        raise NotRunnable(f"channel {dim} does not run through every input and the output unchanged")
    if layer["op"] == "group_norm":
        groups = int(layer.get("attrs", {}).get("groups", 0) or 0)
        if not groups or groups % factor:
            raise NotRunnable(f"a channel split {factor} ways would cut its {groups} groups")
    elif any(p.get("trainable") for p in layer.get("params", {}).values()):
        raise NotRunnable(f"{layer['op']} layers with parameters have no channel-split runtime")


def edge_mode(edge: Mapping[str, Any], producer: Mapping[str, Any], source: LayerRun, consumer: Mapping[str, Any],
              target: LayerRun, producer_edges: int) -> str | None:
    """How the runtime carries the activation of ``edge`` from a layer run as ``source`` (with
    ``producer_edges`` outgoing edges) to one run as ``target``: "kept" (it stays channel-split, no
    collective), "batch" (through the batch layout: each side re-lays its part) or None (not runnable:
    a local layer on one side and no kept layout). Read by the search (edge prices) and the runtime
    (which re-layouts to skip), so both agree."""
    if _keeps(edge, producer, source, consumer, target, producer_edges):
        return "kept"
    if source.kind == "local" or target.kind == "local" or source.gated:  # none of these re-lays its activation
        return None
    return "batch"


def _keeps(edge: Mapping[str, Any], producer: Mapping[str, Any], source: LayerRun, consumer: Mapping[str, Any],
           target: LayerRun, producer_edges: int) -> bool:
    if source.kind not in GIVES_CHANNELS or target.kind not in TAKES_CHANNELS or source.factor != target.factor or \
            source.replicas > 1 or target.replicas > 1:
        return False
    if source.kind != "local" and producer_edges != 1:  # its one output cannot be both channel- and batch-split
        return False
    if "heads" in (source.kind, target.kind) and not all(
            layer.get("module_class") in KEEPING_ATTENTION for layer, run in ((producer, source), (consumer, target))
            if run.kind == "heads"):
        return False
    return _same_axis(edge, source.dim, target.dim) and _same_axis(edge, _batch_dim(producer), _batch_dim(consumer))


def _same_axis(edge: Mapping[str, Any], produced: str | None, read: str | None) -> bool:
    """Does part ``r`` of the producer's dimension ``produced`` hold exactly part ``r`` of the consumer's
    dimension ``read``? True when ``read`` is the same tensor axis, or the major part of it after a reshape
    (channels viewed as heads x head size, or heads x head size merged into channels), never a slice."""
    if produced is None or read is None:
        return False
    axes = [a for a, names in enumerate(edge["src_map"]) if list(names[:1]) == [produced]]
    reads = [j for j, name in enumerate(edge["dst_map"]) if name == read]
    if len(axes) != 1 or len(reads) != 1:
        return False
    a, j = axes[0], reads[0]
    axis_map, shape, dst_shape = edge["axis_map"], edge["shape"], edge["dst_shape"]
    merged = list(axis_map[j]) if j < len(axis_map) else []
    if not merged or merged[0] != a:
        return False
    if len(merged) > 1:  # source axes merged into ``read``, ``produced``'s axis the major one
        return int(np.prod([shape[x] for x in merged])) == dst_shape[j]
    sharing = [i for i, m in enumerate(axis_map) if list(m) == [a]]  # the consumer dims axis ``a`` is viewed as
    return sharing[0] == j and int(np.prod([dst_shape[i] for i in sharing])) == shape[a]


def _batch_dim(layer: Mapping[str, Any]) -> str | None:
    return next((d for d, role in layer["roles"].items() if role == "batch"), None)


def space_runs(layer: Mapping[str, Any], space: SplitSpace, devices: int, fsdp: bool = False) -> list[LayerRun | None]:
    """Per configuration of ``space``, how the runtime runs it (None: not runnable). O(K)."""
    runs: list[LayerRun | None] = []
    for k in range(len(space)):
        try:
            runs.append(layer_run(layer, space.config(k), devices, fsdp))
        except NotRunnable:
            runs.append(None)
    return runs


def edge_modes(edge: Mapping[str, Any], producer: Mapping[str, Any], sources: list[LayerRun | None],
               consumer: Mapping[str, Any], targets: list[LayerRun | None], producer_edges: int) -> np.ndarray:
    """``edge_mode`` for every (producer configuration, consumer configuration) pair, as an int8 matrix
    (K_src, K_dst): 1 kept, 0 batch, -1 not runnable. Only pairs with a local side or a channel-split
    pair are looked at one by one; the rest pass through the batch layout. O(K_src * K_dst)."""
    modes = np.zeros((len(sources), len(targets)), dtype=np.int8)
    codes = {"kept": 1, "batch": 0, None: -1}
    for i, source in enumerate(sources):
        for j, target in enumerate(targets):
            if source is None or target is None:
                continue
            if source.kind in GIVES_CHANNELS or target.kind == "local":
                modes[i, j] = codes[edge_mode(edge, producer, source, consumer, target, producer_edges)]
    return modes


REDUCING_RUNS = ("in", "grid")  # layer runs whose partial sums are reduce-scattered along the batch


def output_space(layer: Mapping[str, Any], space: SplitSpace, runs: list[LayerRun | None]) -> SplitSpace:
    """Per configuration, the split the layer's output leaves it with, on the way to the batch layout: a
    reduction split's partial sums are reduce-scattered along the batch (``REDUCING_RUNS``), so its output is
    split that many ways more along the batch and not at all along the reduction. The rest of the way is the
    edge's re-layout (none for an in-split, whose reduce-scatter gives batch chunks; a grid's all-to-all of
    its output-channel parts). O(K)."""
    batch = _batch_dim(layer)
    if batch is None:
        return space
    dims = space.dims if batch in space.dims else (*space.dims, batch)
    factors = np.ones((len(space), len(dims)), dtype=np.int64)
    factors[:, :len(space.dims)] = space.factors
    column = dims.index(batch)
    for k, run in enumerate(runs):
        if run is not None and run.kind in REDUCING_RUNS:
            reduction = run.inner_dim if run.kind == "grid" else run.dim
            j = dims.index(reduction)
            factors[k, column] *= factors[k, j]
            factors[k, j] = 1
    return SplitSpace(dims, factors)


def runnable_reason(layer: Mapping[str, Any], splits: Mapping[str, int], devices: int,
                    fsdp: bool = False) -> str | None:
    """None when the runtime runs ``splits`` as planned, else why not (one line)."""
    try:
        layer_run(layer, splits, devices, fsdp)
    except NotRunnable as exc:
        return str(exc)
    return None


def runnable_mask(layer: Mapping[str, Any], space: SplitSpace, devices: int, fsdp: bool = False) -> np.ndarray:
    """Per configuration of ``space``: does the runtime run it as planned. O(K)."""
    return np.array([runnable_reason(layer, space.config(k), devices, fsdp) is None for k in range(len(space))],
                    dtype=bool)


def restrict(space: SplitSpace, mask: np.ndarray) -> SplitSpace:
    """The configurations of ``space`` where ``mask`` holds."""
    return SplitSpace(space.dims, space.factors[mask].reshape(int(mask.sum()), len(space.dims)))


def interface_config(layer: Mapping[str, Any], space: SplitSpace, devices: int) -> int | None:
    """Index in ``space`` of the layout activations have between layers (the batch split over all
    ranks), or None when the space lacks it."""
    splits = {d: devices for d in space.dims if layer["roles"].get(d) == "batch"}
    return space.index_of(splits)


def _plain(layer: Mapping[str, Any]) -> bool:
    attrs = layer.get("attrs", {})
    return int(attrs.get("groups", 1) or 1) == 1 and not attrs.get("transposed", False)


def _tensor_kinds() -> str:
    return ", ".join([*(f"{role} of {op}" for op, role in TENSOR_LAYOUTS), f"channel of {'/'.join(LOCAL_OPS)}"])


__all__ = ["KEPT_RULE", "LayerRun", "NotRunnable", "REDUCING_RUNS", "SPACES", "TENSOR_RUNS", "edge_mode",
           "edge_modes", "interface_config", "layer_run", "output_space", "restrict", "runnable_mask",
           "runnable_reason", "space_runs"]
