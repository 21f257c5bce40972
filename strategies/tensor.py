"""Channel (out/in) splits of Conv2d and Linear and head splits of attention, applied to a live model.

The runtime half of the channel/head dimensions of ``strategies.splits``. Between layers every
activation is batch-sharded over all ranks; a split layer runs on a tensor-parallel group of ``t``
consecutive ranks (its data-parallel peers are the ranks with the same position in other groups)
and re-lays its input and output with ``strategies.collectives``, each re-layout with the collective
that moves only what the layer lacks (what the cost model prices for the edge):

- out-channel split (column parallel): the group's batch all-gathered (the layer needs every input
  channel of it), the local weight rows applied, the output's channel parts exchanged all-to-all
  for batch chunks;
- in-channel split (row parallel): the input's channel parts exchanged all-to-all (each rank gets
  its input channels of the group's batch), the local weight columns applied, partial sums
  reduce-scattered to batch chunks, the bias added once;
- head split: inside the attention module (a diffusers ``Attention`` through ``HeadSplitProcessor``,
  any other module by intercepting its ``scaled_dot_product_attention``), q, k and v are exchanged
  all-to-all so that attention runs on the local heads of the group's batch, and its output is
  exchanged back to batch chunks;
- kept layouts (``strategies.runnable.edge_mode``): an out-split whose one consumer takes a
  channel-split input returns its channel part of the group's batch as it is (``keep_output``),
  an in-split fed that way skips its all-to-all in (``kept_input``), and the local layers between
  them (a ``ChannelGroupNorm`` on whole groups, elementwise ops) compute on their channel part; a
  head-split ``Attention`` takes kept q, k, v and gives its output kept to an in-split ``to_out``.

Weight shards' gradients are summed over their data-parallel peers, replicated parameters' over
all ranks, both divided by the world size (each rank's loss is its chunk's mean), so gradients
equal the single-process model's on the global batch; ``GradientSync`` runs those all-reduces in
buckets during the backward, as DDP does.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.overrides import TorchFunctionMode

from cost_models.layer_costs import GRADIENT_BUCKET_BYTES
from strategies.collectives import batch_to_split, gather_batch, reduce_scatter_batch, split_to_batch, sum_over
from strategies.data import GRADIENT_DTYPES, mixed_precision_policy
from strategies.sharding import owner_block

SHARD_GROUP = "_pase_replica_group"  # attribute naming the group a sharded parameter's gradient is summed over
REPLICA_GROUPS = "pase_replica_groups"  # attribute of a module run replicated (strategies.replication): its groups


@dataclass
class TensorGroups:
    """The process groups of one tensor-parallel degree ``t``: a 2-D device mesh (dp = p / t, tp = t)."""
    tp: Any
    dp: Any
    tp_size: int
    mesh: Any = None

    @classmethod
    def build(cls, device_type: str, world: int, t: int) -> TensorGroups:
        mesh = init_device_mesh(device_type, (world // t, t), mesh_dim_names=("dp", "tp"))
        return cls(tp=mesh.get_group("tp"), dp=mesh.get_group("dp"), tp_size=t, mesh=mesh)


class ChannelSplit(nn.Module):
    """A Conv2d or Linear whose output (``"out"``) or input (``"in"``) channels are split over ``groups.tp``."""
    def __init__(self, module: nn.Conv2d | nn.Linear, split: str, groups: TensorGroups, keep_output: bool = False,
                 kept_input: bool = False, gated: bool = False) -> None:
        super().__init__()
        if split not in ("out", "in"):
            raise ValueError(f"split must be 'out' or 'in', not {split!r}")
        self.split, self.groups = split, groups
        self.keep_output = keep_output and split == "out"  # return this rank's channels of the group's batch
        self.kept_input = kept_input and split == "in"  # the input arrives as this rank's channels already
        # a GEGLU projection split by rows: this rank holds its part of both halves (h_r, g_r), so that the
        # module's chunk(2) and product give its part of the output, kept for an in-split consumer (returned
        # to batch chunks it would move the 2F channels before the product, twice what the pair moves)
        self.halves = 2 if gated and split == "out" else 1
        if self.halves > 1 and not self.keep_output:
            raise ValueError("an out-split GEGLU projection runs only with its output kept for an in-split")
        self.is_conv = isinstance(module, nn.Conv2d)
        if self.is_conv:
            if module.groups != 1 or module.padding_mode != "zeros":
                raise ValueError("only ungrouped, zero-padded convolutions can be channel-split")
            self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation
        t, rank = groups.tp_size, dist.get_rank(groups.tp)
        weight = module.weight.detach()
        part = (rows_of(weight, t, rank, self.halves) if split == "out" else weight.chunk(t, dim=1)[rank]).clone()
        self.weight = nn.Parameter(part, requires_grad=module.weight.requires_grad)
        setattr(self.weight, SHARD_GROUP, groups.dp)
        self.bias: nn.Parameter | None = None
        if module.bias is not None:
            bias = module.bias.detach()
            self.bias = nn.Parameter(rows_of(bias, t, rank, self.halves).clone() if split == "out" else bias.clone(),
                                     requires_grad=module.bias.requires_grad)
            if split == "out":
                setattr(self.bias, SHARD_GROUP, groups.dp)

    def _apply_op(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, self.weight, bias, self.stride, self.padding, self.dilation)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = 1 if self.is_conv else -1
        if self.split == "out":  # needs every input channel of the group's batch
            out = self._apply_op(gather_batch(x, self.groups.tp), self.bias)
            return out if self.keep_output else split_to_batch(out, channel, self.groups.tp)
        part = x if self.kept_input else batch_to_split(x, channel, self.groups.tp)
        partial = self._apply_op(part, None)
        out = reduce_scatter_batch(partial, self.groups.tp)
        if self.bias is not None:
            out = out + (self.bias.view(-1, 1, 1) if self.is_conv else self.bias)
        return out

    def shard_cuts(self, leaf: str) -> tuple[tuple[int, Any], ...]:
        """(dimension, group) per split of parameter ``leaf`` (none: whole on every rank)."""
        if self.split == "out":
            return ((0, self.groups.tp),)
        return ((1, self.groups.tp),) if leaf == "weight" else ()

    @property
    def shard_halves(self) -> int:
        """Rows interleaved from this many halves (``rows_of``): 2 for a GEGLU projection, else 1."""
        return self.halves

    def extra_repr(self) -> str:
        kept = ", kept output" if self.keep_output else ", kept input" if self.kept_input else ""
        return f"{'Conv2d' if self.is_conv else 'Linear'}, {self.split}-channels / {self.groups.tp_size}{kept}"


@dataclass
class GridGroups:
    """The process groups of a 2-D tensor-parallel grid: a 3-D device mesh (dp, out, in) of ``p / (t * u)`` x
    ``t`` x ``u`` ranks (``in`` consecutive), and ``bias`` the ranks holding the same output-channel part
    (dp x in: an output part's bias gradient is summed over them)."""
    out: Any
    inp: Any
    dp: Any
    bias: Any
    out_size: int
    in_size: int
    mesh: Any = None

    @property
    def tp_size(self) -> int:
        return self.out_size * self.in_size

    @classmethod
    def build(cls, device_type: str, world: int, t: int, u: int) -> GridGroups:
        mesh = init_device_mesh(device_type, (world // (t * u), t, u), mesh_dim_names=("dp", "out", "in"))
        bias = mesh["dp", "in"]._flatten(f"dp_in_{t}x{u}").get_group()
        return cls(out=mesh.get_group("out"), inp=mesh.get_group("in"), dp=mesh.get_group("dp"), bias=bias,
                   out_size=t, in_size=u, mesh=mesh)


class GridSplit(nn.Module):
    """A Conv2d or Linear split over its output channels ``t`` ways and its input channels ``u`` ways at once,
    on a ``t x u`` grid of ranks: the rank at (k, j) holds weight block ``W[k, j]`` (output part k, input part
    j). From the batch layout the input's channel parts are exchanged all-to-all over the ``in`` axis and the
    result all-gathered over the ``out`` axis (this rank's input channels of the grid's batch, ``(t*u - 1) /
    (t*u)`` of it received); the partial sums are reduce-scattered along the batch over ``in`` (rows ordered
    so that each rank's share is the batch chunks of its ``out`` peers), the bias part added, and the output's
    channel parts exchanged all-to-all over ``out`` back to batch chunks: with ``out`` alone an out-split's
    collectives, with ``in`` alone an in-split's."""
    def __init__(self, module: nn.Conv2d | nn.Linear, groups: GridGroups) -> None:
        super().__init__()
        self.groups = groups
        self.is_conv = isinstance(module, nn.Conv2d)
        if self.is_conv:
            if module.groups != 1 or module.padding_mode != "zeros":
                raise ValueError("only ungrouped, zero-padded convolutions can be channel-split")
            self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation
        t, u = groups.out_size, groups.in_size
        k, j = dist.get_rank(groups.out), dist.get_rank(groups.inp)
        weight = module.weight.detach()
        self.weight = nn.Parameter(weight.chunk(t, dim=0)[k].chunk(u, dim=1)[j].clone(),
                                   requires_grad=module.weight.requires_grad)
        setattr(self.weight, SHARD_GROUP, groups.dp)
        self.bias: nn.Parameter | None = None
        if module.bias is not None:
            self.bias = nn.Parameter(module.bias.detach().chunk(t)[k].clone(), requires_grad=module.bias.requires_grad)
            setattr(self.bias, SHARD_GROUP, groups.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = 1 if self.is_conv else -1
        t, u = self.groups.out_size, self.groups.in_size
        part = gather_batch(batch_to_split(x, channel, self.groups.inp), self.groups.out)  # rows (out, in, chunk)
        if self.is_conv:
            partial = F.conv2d(part, self.weight, None, self.stride, self.padding, self.dilation)
        else:
            partial = F.linear(part, self.weight)
        rows = partial.shape[0] // (t * u)  # reorder rows to (in, out, chunk): in-peer j's share holds chunks (*, j)
        partial = partial.reshape(t, u, rows, *partial.shape[1:]).transpose(0, 1).reshape(partial.shape)
        out = reduce_scatter_batch(partial, self.groups.inp)
        if self.bias is not None:
            out = out + (self.bias.view(-1, 1, 1) if self.is_conv else self.bias)
        return split_to_batch(out, channel, self.groups.out)

    def shard_cuts(self, leaf: str) -> tuple[tuple[int, Any], ...]:
        """(dimension, group) per split of parameter ``leaf``: gathered over each group along its dimension."""
        if leaf == "weight":
            return ((0, self.groups.out), (1, self.groups.inp))
        return ((0, self.groups.out),)

    @property
    def shard_halves(self) -> int:
        return 1

    def extra_repr(self) -> str:
        return f"{'Conv2d' if self.is_conv else 'Linear'}, out x in channels / {self.groups.out_size} x " \
               f"{self.groups.in_size}"


def rows_of(full: torch.Tensor, t: int, rank: int, halves: int = 1) -> torch.Tensor:
    """Rank ``rank``'s rows (dim 0) of ``full`` split ``t`` ways: its chunk of each of ``halves`` equal halves,
    concatenated (halves=1: its plain chunk)."""
    return torch.cat([half.chunk(t)[rank] for half in full.chunk(halves)])


def ordered_rows(gathered: torch.Tensor, t: int, halves: int = 1) -> torch.Tensor:
    """The ranks' ``rows_of`` parts concatenated in rank order (dim 0), back in the full tensor's row order."""
    if halves == 1:
        return gathered
    rows = gathered.shape[0] // (t * halves)
    return gathered.reshape(t, halves, rows, *gathered.shape[1:]).transpose(0, 1).reshape(gathered.shape)


class ChannelGroupNorm(nn.GroupNorm):
    """A GroupNorm on this rank's channels of the group's batch: whole groups, so the statistics need no
    communication; its affine parameters are the matching channel shard (gradients summed over
    ``groups.dp``)."""
    def __init__(self, module: nn.GroupNorm, groups: TensorGroups) -> None:
        t, rank = groups.tp_size, dist.get_rank(groups.tp)
        if module.num_groups % t:
            raise ValueError(f"a GroupNorm of {module.num_groups} groups does not split {t} ways")
        super().__init__(module.num_groups // t, module.num_channels // t, module.eps, module.affine,
                         device=module.weight.device if module.affine else None)
        self.groups = groups
        if module.affine:
            with torch.no_grad():
                self.weight.copy_(module.weight.detach().chunk(t)[rank])
                self.bias.copy_(module.bias.detach().chunk(t)[rank])
            for param, full in ((self.weight, module.weight), (self.bias, module.bias)):
                param.requires_grad_(full.requires_grad)
                setattr(param, SHARD_GROUP, groups.dp)

    def shard_cuts(self, leaf: str) -> tuple[tuple[int, Any], ...]:
        return ((0, self.groups.tp),)

    @property
    def shard_halves(self) -> int:
        return 1


class ChannelLayerNorm(nn.Module):
    """A LayerNorm on this rank's part of the normalised (last) dimension of the group's batch: the input's channel
    parts exchanged all-to-all from batch chunks, each position's mean and squared deviations summed over the group
    (two all-reduces of ``group batch x positions`` floats, forward and backward: the statistics exchange the cost
    model prices), the matching shard of the affine parameters applied (gradients summed over ``groups.dp``), and
    the output exchanged back to batch chunks."""
    def __init__(self, module: nn.LayerNorm, groups: TensorGroups) -> None:
        super().__init__()
        t, rank = groups.tp_size, dist.get_rank(groups.tp)
        if len(module.normalized_shape) != 1 or module.normalized_shape[0] % t:
            raise ValueError(f"a LayerNorm over {tuple(module.normalized_shape)} does not split its last dimension "
                             f"{t} ways")
        self.groups, self.eps, self.channels = groups, module.eps, module.normalized_shape[0]
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        for leaf in ("weight", "bias"):
            full = getattr(module, leaf)
            if full is not None:
                part = nn.Parameter(full.detach().chunk(t)[rank].clone(), requires_grad=full.requires_grad)
                setattr(part, SHARD_GROUP, groups.dp)
                setattr(self, leaf, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.groups.tp
        part = batch_to_split(x, -1, group)
        local = part.float()
        mean = sum_over(local.sum(-1, keepdim=True), group) / self.channels
        centred = local - mean
        variance = sum_over(centred.pow(2).sum(-1, keepdim=True), group) / self.channels
        out = (centred * torch.rsqrt(variance + self.eps)).to(part.dtype)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return split_to_batch(out, -1, group)

    def shard_cuts(self, leaf: str) -> tuple[tuple[int, Any], ...]:
        return ((0, self.groups.tp),)

    @property
    def shard_halves(self) -> int:
        return 1

    def extra_repr(self) -> str:
        return f"LayerNorm({self.channels}), channels / {self.groups.tp_size}"


class _HeadSplitAttention(TorchFunctionMode):
    """Runs ``scaled_dot_product_attention`` on this rank's heads of the group's batch (``split="heads"``), or on
    its part of the query sequence of the group's batch against every key and value of it (``split="seq"``:
    q exchanged all-to-all, k and v all-gathered; their backward reduce-scatters the partial gradients)."""
    def __init__(self, groups: TensorGroups, split: str = "heads") -> None:
        super().__init__()
        if split not in ("heads", "seq"):
            raise ValueError(f"split must be 'heads' or 'seq', not {split!r}")
        self.groups, self.split = groups, split
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if mask is not None:
            raise NotImplementedError(f"{self.split}-split attention with an attention mask")
        group = self.groups.tp
        self.calls += 1
        if self.split == "seq":  # (batch, heads, sequence, head dim): queries split, keys and values whole
            q, k, v = batch_to_split(args[0], 2, group), gather_batch(args[1], group), gather_batch(args[2], group)
            return split_to_batch(func(q, k, v, *args[3:], **kwargs), 2, group)
        q, k, v = (batch_to_split(t, 1, group) for t in args[:3])
        return split_to_batch(func(q, k, v, *args[3:], **kwargs), 1, group)


def split_heads(module: nn.Module, groups: TensorGroups, kept_inputs: tuple[str, ...] = (),
                keep_output: bool = False) -> _HeadSplitAttention | HeadSplitProcessor:
    """Make ``module``'s attention run on this rank's heads; parameter names and the module tree stay as
    they were. A diffusers ``Attention`` gets a ``HeadSplitProcessor`` (which can keep q, k, v and the
    output head-split: ``kept_inputs`` names the projections, "to_q", "to_k", "to_v", whose output arrives
    head-split); any other module runs its forward under a mode that splits its
    ``scaled_dot_product_attention``, and a forward that never calls it is an error, not an unsplit run.
    Returns the processor or mode, whose ``calls`` counts applications."""
    if hasattr(module, "set_processor") and hasattr(module, "to_q"):
        processor = HeadSplitProcessor(groups, kept_inputs, keep_output)
        module.set_processor(processor)
        return processor
    if kept_inputs or keep_output:
        raise ValueError(f"only a diffusers Attention keeps its layout head-split, not a {type(module).__name__}")
    return forward_under(module, _HeadSplitAttention(groups), "a head split")


def split_sequence(module: nn.Module, groups: TensorGroups) -> _HeadSplitAttention:
    """Make ``module``'s ``scaled_dot_product_attention`` run on this rank's part of the query sequence of the
    group's batch (keys and values gathered whole); a forward that never calls it is an error. Returns the mode,
    whose ``calls`` counts applications."""
    return forward_under(module, _HeadSplitAttention(groups, "seq"), "a query-sequence split")


def forward_under(module: nn.Module, mode: Any, planned: str) -> Any:
    """``module``'s forward run under ``mode``; a forward that never calls the attention ``mode`` splits fails
    (it would run unsplit, not as planned)."""
    forward = module.forward

    def split_forward(*args: Any, **kwargs: Any) -> Any:
        before = mode.calls
        with mode:
            result = forward(*args, **kwargs)
        if mode.calls == before:
            raise RuntimeError(f"a {type(module).__name__} planned as {planned} never called "
                               "scaled_dot_product_attention: it cannot run split as planned")
        return result

    module.forward = split_forward
    return mode


class HeadSplitProcessor:
    """diffusers' ``AttnProcessor2_0`` on this rank's heads of the tensor-parallel group's batch.

    q, k and v whose projection is an out-split keeping its output (``kept_inputs``) arrive as this rank's
    head channels of the group's batch; the others arrive batch-split and are exchanged all-to-all into
    that layout. Attention runs on ``heads / t`` local heads; its output goes to ``to_out`` as it is when
    ``to_out`` is an in-split taking it kept (``keep_output``), else exchanged back to batch chunks. The
    residual connection and rescaling run on the batch layout, as the single-process model's do."""
    def __init__(self, groups: TensorGroups, kept_inputs: tuple[str, ...] = (), keep_output: bool = False) -> None:
        self.groups, self.kept_inputs, self.keep_output = groups, set(kept_inputs), keep_output
        self.calls = 0

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("head-split attention with an attention mask")
        group, t = self.groups.tp, self.groups.tp_size
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        projected = {"to_q": attn.to_q(hidden_states), "to_k": attn.to_k(encoder_hidden_states),
                     "to_v": attn.to_v(encoder_hidden_states)}
        heads = attn.heads // t
        q, k, v = (x if name in self.kept_inputs else batch_to_split(x, -1, group)  # (group batch, L, local heads x d)
                   for name, x in projected.items())
        group_batch, head_dim = q.shape[0], q.shape[-1] // heads
        q, k, v = (x.view(group_batch, -1, heads, head_dim).transpose(1, 2) for x in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        self.calls += 1
        out = out.transpose(1, 2).reshape(group_batch, -1, heads * head_dim).to(q.dtype)
        if not self.keep_output:
            out = split_to_batch(out, -1, group)
        out = attn.to_out[1](attn.to_out[0](out))  # this rank's batch chunk again
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(out.shape[0], channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@dataclass
class _Bucket:
    """Gradients of some parameters of one replica group, all-reduced as one flat tensor."""
    group: Any
    params: list[nn.Parameter]
    waiting: int = 0  # parameters whose gradient this backward has not accumulated yet
    flat: torch.Tensor | None = None
    work: Any = None


@dataclass
class GradientSync:
    """During each backward: every parameter's gradient summed over its replica group, divided by the world.

    Overlapped with the backward as DDP does (and as the cost model prices it): parameters are put in
    buckets of ``GRADIENT_BUCKET_BYTES`` per replica group at install time, in reverse registration
    order (roughly the order the backward produces their gradients); a post-accumulate-grad hook
    counts a bucket's gradients and, once all have arrived, launches its flat all-reduce
    (``async_op=True``) while the backward goes on. Buckets launch strictly in bucket order (a ready
    bucket waits for every earlier one), so every rank issues the same collectives in the same order.
    An autograd-engine callback, queued by the first hook of a backward, launches the buckets still
    waiting (a parameter this rank's graph did not reach takes part with zeros), waits for all of
    them and copies the sums, divided by the world, back into the gradients. (So a parameter that
    never gets a gradient holds its bucket, and every later one, back to the end of the backward.)
    """
    buckets: list[_Bucket]
    world: int
    dtype: torch.dtype = torch.float32  # gradients are reduced in the plan's precision (the bytes it priced)
    _bucket_of: dict[int, int] = field(default_factory=dict, init=False)
    _arrived: set[int] = field(default_factory=set, init=False)
    _next: int = field(default=0, init=False)  # the first bucket not launched in this backward
    _queued: bool = field(default=False, init=False)
    launched_in_backward: int = field(default=0, init=False)  # buckets the last backward launched before its end
    _paused: bool = field(default=False, init=False)

    @classmethod
    def install(cls, model: nn.Module, world: int, bucket_bytes: int = GRADIENT_BUCKET_BYTES,
                dtype: torch.dtype = torch.float32, only: list[nn.Parameter] | None = None) -> GradientSync:
        """Buckets for every trainable parameter of ``model`` (``only``: these of them)."""
        chosen = None if only is None else {id(p) for p in only}
        params = [p for p in model.parameters() if p.requires_grad and (chosen is None or id(p) in chosen)]
        open_buckets: dict[int, _Bucket] = {}  # per replica group, the bucket being filled
        filled: dict[int, int] = {}
        closed: list[tuple[int, _Bucket]] = []  # (position of its last parameter, bucket)
        for position, param in enumerate(reversed(params)):
            group = getattr(param, SHARD_GROUP, None)
            key = id(group)
            if key not in open_buckets:
                open_buckets[key], filled[key] = _Bucket(group, []), 0
            open_buckets[key].params.append(param)
            filled[key] += param.numel() * param.element_size()
            if filled[key] >= bucket_bytes:
                closed.append((position, open_buckets.pop(key)))
        closed += [(len(params), bucket) for bucket in open_buckets.values()]  # the last ones, in group order
        sync = cls([bucket for _, bucket in sorted(closed, key=lambda item: item[0])], world, dtype)
        for index, bucket in enumerate(sync.buckets):
            for param in bucket.params:
                sync._bucket_of[id(param)] = index
                param.register_post_accumulate_grad_hook(sync._on_grad)
        return sync

    def _start_backward(self) -> None:
        self._queued, self._next, self._arrived, self.launched_in_backward = True, 0, set(), 0
        for bucket in self.buckets:
            bucket.waiting, bucket.flat, bucket.work = len(bucket.params), None, None
        torch.autograd.Variable._execution_engine.queue_callback(self.synchronize)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Backward passes inside leave their gradients local, to be added to (gradient accumulation); the next
        backward outside reduces the sums."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _on_grad(self, param: nn.Parameter) -> None:
        if self._paused:
            return
        if not self._queued:
            self._start_backward()
        if id(param) in self._arrived:
            return
        self._arrived.add(id(param))
        self.buckets[self._bucket_of[id(param)]].waiting -= 1
        while self._next < len(self.buckets) and self.buckets[self._next].waiting == 0:
            self._launch(self._next)
            self.launched_in_backward += 1

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        for param in bucket.params:  # a parameter this rank's graph did not reach still takes part, with zeros
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        bucket.flat = torch.cat([param.grad.reshape(-1) for param in bucket.params]).to(self.dtype)
        if dist.get_world_size(bucket.group) > 1:
            bucket.work = dist.all_reduce(bucket.flat, group=bucket.group, async_op=True)
        self._next = index + 1

    def synchronize(self) -> None:
        self._queued = False
        while self._next < len(self.buckets):
            self._launch(self._next)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            flat = bucket.flat
            assert flat is not None
            flat /= self.world
            offset = 0
            for param in bucket.params:
                assert param.grad is not None
                param.grad.copy_(flat[offset:offset + param.numel()].view_as(param.grad))
                offset += param.numel()
            bucket.flat = bucket.work = None


def shard_parameters(model: nn.Module, device_type: str, world: int, precision: str = "fp32", reshard: bool = True,
                     sharding: Mapping[str, str] | None = None) -> list[nn.Parameter]:
    """FSDP2 (``fully_shard``) on every module that owns trainable parameters, for a plan with both tensor splits
    and ``--fsdp``: a channel-split module's shards are sharded again over its data-parallel peers (the "dp"
    axis of its 2-D mesh), a replicated module's (``strategies.replication``) over the same peers of its replica
    groups, every other module's parameters over all ranks. Each unit all-gathers its
    parameters before its forward and again for its backward, and reduce-scatters its gradients, summed and
    divided by the world as ``GradientSync`` would (each rank's loss is its chunk's mean): per layer, the
    collectives the cost model prices for FSDP. An in-split's bias, whose gradient is summed over every rank
    (it is added to each rank's batch chunk), is left out of its module's unit, and so is a module split over
    every rank (no peer to shard it with); the returned parameters (those) need ``GradientSync``. (A grid's bias
    is left out likewise: it is summed over its output part's dp x in ranks.)

    ``sharding`` (block -> "none", "gradients" or "full"; ``strategies.sharding``): each module as its block is
    sharded (a module of a block left whole, or of none, keeps its parameters whole), instead of every module
    alike (``reshard``)."""
    world_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    policy = mixed_precision_policy(GRADIENT_DTYPES[precision])
    whole: list[nn.Parameter] = []
    for name, module in list(model.named_modules()):
        if not any(param.requires_grad for param in module.parameters(recurse=False)):
            continue
        if sharding is not None:
            how = sharding.get(owner_block(name, sharding) or "", "none")
            if how == "none":
                whole.extend(param for param in module.parameters(recurse=False) if param.requires_grad)
                continue
            reshard = how == "full"
        if holds_shards(module) and not isinstance(module, SPLIT_MODULES):
            raise ValueError(f"a {type(module).__name__} has no FSDP runtime")
        groups = module.groups if isinstance(module, SPLIT_MODULES) else getattr(module, REPLICA_GROUPS, None)
        if groups is not None and groups.tp_size == world:  # split or replicated over every rank: no peer to shard
            whole.extend(param for param in module.parameters(recurse=False) if param.requires_grad)
            continue
        reduced = isinstance(module, GridSplit) or isinstance(module, ChannelSplit) and module.split == "in"
        ignored = {module.bias} if reduced and module.bias is not None else set()
        whole.extend(ignored)
        # every unit is its own root (there is no enclosing one): reshard after forward explicitly, as FSDP does for
        # non-root units, so that the backward gathers again (the memory FSDP saves, the bytes priced); under
        # ZeRO-2 (``reshard=False``) the gathered weights stay until the backward (one gather, the bytes priced)
        fully_shard(module, mesh=groups.mesh["dp"] if groups is not None else world_mesh, mp_policy=policy,
                    reshard_after_forward=reshard, ignored_params=ignored or None)
        module.set_gradient_divide_factor(float(world))  # type: ignore[operator]
        if dist.get_backend() != "nccl":  # gloo has no pre-scaled sum: sum, then divide by the world
            module.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
    return whole


# modules holding channel shards of a model's parameters that FSDP can shard again (``strategies.spatial``'s
# OutSpatialConv holds shards too, without an FSDP runtime: ``holds_shards`` finds them all)
SPLIT_MODULES = (ChannelSplit, ChannelGroupNorm, ChannelLayerNorm, GridSplit)


def holds_shards(module: nn.Module) -> bool:
    """Does ``module`` hold parts of a model's parameters (``shard_cuts`` says how to gather them)?"""
    return callable(getattr(module, "shard_cuts", None))

__all__ = ["ChannelGroupNorm", "ChannelLayerNorm", "ChannelSplit", "GradientSync", "GridGroups", "GridSplit",
           "HeadSplitProcessor", "REPLICA_GROUPS", "SHARD_GROUP", "SPLIT_MODULES", "TensorGroups", "forward_under",
           "holds_shards", "ordered_rows", "rows_of", "shard_parameters", "split_heads", "split_sequence"]
