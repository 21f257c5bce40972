"""Full-size views of a parallelized model's trainable state, so checkpoints do not depend on the plan.

After ``parallelize`` a parameter may be a whole tensor (DDP, batch-parallel layers), an FSDP2 shard
(a DTensor) or a channel shard of a ``ChannelSplit``, ``ChannelGroupNorm`` or ``GridSplit`` (split along one
or two dimensions, each over its own group). ``ShardMap`` knows
which, per parameter name (the original model's names), and turns any tensor shaped like a parameter's local part (the
parameter, its gradient, its optimizer state, its EMA) into the full tensor (a collective: every
rank calls it in the same order) and a full tensor back into this rank's part. Checkpoints written
through it hold full tensors, so a run resumes under the same plan or another one, or alone.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from strategies.collectives import gather
from strategies.tensor import holds_shards, ordered_rows, rows_of


@dataclass(frozen=True)
class _Shard:
    kind: str  # "whole", "dtensor", "channels" or "dtensor+channels" (an FSDP shard of a channel shard)
    cuts: tuple[tuple[int, Any], ...] = ()  # a channel shard's (dimension, tensor-parallel group) per split
    halves: int = 1  # a channel shard's rows interleaved from this many halves (GEGLU: 2; ``rows_of``)


class ShardMap:
    """Trainable parameters of ``model`` (DDP-wrapped or not) under their original names, with how each is held."""
    def __init__(self, model: nn.Module) -> None:
        self.pipeline = hasattr(model, "pase_step")  # a pipeline stage: each parameter lives on one rank per replica
        self.group: Any = getattr(model, "pipeline_group", None)  # the replica's stages (None: the world)
        if self.pipeline:
            self.named = [(model.original_names[n], p) for n, p in model.stage_module.named_parameters()
                          if p.requires_grad]
            self.shards = {name: _Shard("stage") for name, _ in self.named}
            return
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        splits = {name: module for name, module in inner.named_modules() if holds_shards(module)}
        self.named: list[tuple[str, nn.Parameter]] = []
        self.shards: dict[str, _Shard] = {}
        for name, param in inner.named_parameters():
            if not param.requires_grad:
                continue
            self.named.append((name, param))
            owner, _, leaf = name.rpartition(".")
            split = splits.get(owner)
            cuts = split.shard_cuts(leaf) if split is not None else ()
            if cuts:  # FSDP may shard the channel shard again
                kind = "dtensor+channels" if _is_dtensor(param) else "channels"
                self.shards[name] = _Shard(kind, cuts, split.shard_halves)
            elif _is_dtensor(param):
                self.shards[name] = _Shard("dtensor")
            else:
                self.shards[name] = _Shard("whole")

    @property
    def sharded(self) -> bool:
        return any(shard.kind != "whole" for shard in self.shards.values())

    def full(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The full tensor of a tensor laid out like parameter ``name`` (collective over its shard group)."""
        shard = self.shards[name]
        if _is_dtensor(tensor):
            tensor = tensor.full_tensor()
        if shard.kind in ("channels", "dtensor+channels") and tensor.dim() > 0:
            return _gather_cuts(tensor, shard.cuts, shard.halves)
        return tensor

    def local(self, name: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``full``, laid out like ``like`` (the parameter or a tensor of its state)."""
        full = full.to(device=like.device, dtype=like.dtype)
        shard = self.shards[name]
        if shard.kind in ("channels", "dtensor+channels") and like.dim() > 0:
            for dim, group in shard.cuts:
                size, rank = dist.get_world_size(group), dist.get_rank(group)
                full = rows_of(full.movedim(dim, 0), size, rank, shard.halves if dim == 0 else 1).movedim(0, dim)
            full = full.contiguous()
        if _is_dtensor(like):
            return distribute_tensor(full, like.device_mesh, like.placements)
        return full.clone()

    def full_named(self, tensors: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: full tensor}`` for tensors given in parameter order (collective)."""
        if self.pipeline:
            return _gather_stages({name: t.detach() for (name, _), t in zip(self.named, tensors)}, self.group)
        return {name: self.full(name, t.detach()) for (name, _), t in zip(self.named, tensors)}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state with full tensors, indexed by the position of each parameter in name order
        of the whole model (collective)."""
        names = {id(param): name for name, param in self.named}
        order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
        state = optimizer.state_dict()
        if not self.pipeline:
            return {"state": {index: {key: self.full(order[index], value) if isinstance(value, torch.Tensor)
                                      else value for key, value in values.items()}
                              for index, values in sorted(state["state"].items())},
                    "param_groups": state["param_groups"]}
        mine = {f"{order[index]}\x00{key}": value for index, values in state["state"].items()
                for key, value in values.items() if isinstance(value, torch.Tensor)}
        everything = _gather_stages(mine, self.group)
        all_names = sorted({key.split("\x00")[0] for key in everything})
        full: dict[int, dict[str, Any]] = {}
        for key, value in everything.items():
            name, field = key.split("\x00")
            full.setdefault(all_names.index(name), {})[field] = value
        groups = [{**group, "params": list(range(len(all_names))), "pase_names": all_names}
                  for group in state["param_groups"][:1]]
        return {"state": full, "param_groups": groups}

    def local_optimizer_state(self, saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """A full optimizer state (``full_optimizer_state``'s form) as this rank's ``optimizer.state_dict()``."""
        params = dict(self.named)
        names = {id(param): name for name, param in self.named}
        order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
        saved_names = saved["param_groups"][0].get("pase_names") if saved["param_groups"] else None
        saved_index = {name: i for i, name in enumerate(saved_names or order)}
        state = {}
        for index, name in enumerate(order):
            values = saved["state"].get(saved_index[name])
            if values is not None:
                state[index] = {key: self.local(name, value, params[name])
                                if isinstance(value, torch.Tensor) and value.dim() > 0 else value
                                for key, value in values.items()}
        current = optimizer.state_dict()["param_groups"]
        groups = [{**{k: v for k, v in saved["param_groups"][min(i, len(saved["param_groups"]) - 1)].items()
                      if k != "pase_names"}, "params": group["params"]} for i, group in enumerate(current)]
        return {"state": state, "param_groups": groups}

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients by their global norm over every shard (the same factor on every rank). Each group of
        gradients spread alike is summed with one foreach norm, not one kernel chain per parameter: on an eager
        stack the host dispatches every operator, and a UNet has hundreds of parameters."""
        params = [p for _, p in self.named if p.grad is not None]
        kinds = {shard.kind for shard in self.shards.values()}
        if not self.pipeline and (kinds <= {"whole"} or kinds == {"dtensor"}):  # replicated, or FSDP2: torch's own
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        device = params[0].device if params else torch.device("cpu")
        # a part's sum of squares is summed over the groups it is spread over (a whole gradient is the same on
        # every rank: counted once); a pipeline stage's gradients are summed over the replica's stages
        by_groups: dict[tuple[int, ...], tuple[list[Any], list[torch.Tensor]]] = {}
        if self.pipeline:  # every stage reduces once, with or without gradients of its own
            by_groups[(id(self.group),)] = ([self.group], [])
        for name, param in self.named:
            if param.grad is None:
                continue
            grad = param.grad.detach()
            groups = [self.group] if self.pipeline else [group for _, group in self.shards[name].cuts]
            if _is_dtensor(grad):
                if not self.pipeline:
                    groups.append(grad.device_mesh.get_group())
                grad = grad.to_local()
            by_groups.setdefault(tuple(id(group) for group in groups), (groups, []))[1].append(grad)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for groups, grads in by_groups.values():
            partial = torch.zeros_like(total)
            for dtype in {g.dtype for g in grads}:  # one foreach norm per dtype (fp32 gradients: one in all)
                norms = torch.stack(torch._foreach_norm([g for g in grads if g.dtype == dtype], 2.0))
                partial = partial + norms.double().pow(2).sum()
            for group in groups:
                dist.all_reduce(partial, group=group)
            total = total + partial
        norm = total.sqrt()
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for dtype in {p.grad.dtype for p in params}:
            grads = [p.grad for p in params if p.grad.dtype == dtype]
            plain = [g for g in grads if not _is_dtensor(g)]
            if plain:
                torch._foreach_mul_(plain, factor.to(dtype))
            for grad in (g for g in grads if _is_dtensor(g)):
                grad.mul_(factor.to(dtype))
        return norm.float()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_tensors(model: nn.Module, what: str = "param") -> dict[str, torch.Tensor]:
    """Every parameter (``what="param"``) or gradient (``"grad"``) at full size on every rank, under the
    original model's names: FSDP shards and channel shards are gathered (collective: call on all ranks)."""
    inner = unwrap(model)
    splits = {name: module for name, module in inner.named_modules() if holds_shards(module)}
    result: dict[str, torch.Tensor] = {}
    for name, param in inner.named_parameters():
        tensor = param if what == "param" else param.grad
        if tensor is None:
            continue
        tensor = tensor.detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        owner, _, leaf = name.rpartition(".")
        split = splits.get(owner)
        cuts = split.shard_cuts(leaf) if split is not None else ()
        if cuts:
            tensor = _gather_cuts(tensor, cuts, split.shard_halves)
        result[name] = tensor
    return result


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict at full size under the original names (collective: call on every rank)."""
    model = getattr(model, "pase_pipeline", model)  # a model split into stages: its stages hold the current weights
    if hasattr(model, "pase_step"):  # pipeline stages: every rank's parameters and buffers, gathered
        names = model.original_names
        return _gather_stages({names.get(k, k): v.detach() for k, v in model.stage_module.state_dict().items()},
                              model.pipeline_group)
    inner = unwrap(model)
    params = full_tensors(inner, "param")
    state = {}
    for name, value in inner.state_dict().items():
        if name in params:
            value = params[name]
        elif isinstance(value, DTensor):
            value = value.full_tensor()
        state[name] = value.detach()
    return state


def _gather_stages(local: dict[str, torch.Tensor], group: Any = None) -> dict[str, torch.Tensor]:
    """Every stage's ``{name: tensor}`` merged, on every rank (the stages of a pipeline replica, ``group``,
    hold disjoint parameters; the replicas hold equal copies after each step's gradient average)."""
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()}, group=group)
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged


def _gather_cuts(part: torch.Tensor, cuts: tuple[tuple[int, Any], ...], halves: int) -> torch.Tensor:
    """The full tensor of channel shards split along each cut's dimension over its group (collectives, last cut
    first), rows interleaved from ``halves`` put back along dimension 0."""
    for dim, group in reversed(cuts):
        gathered = gather(part, dim, group)
        part = ordered_rows(gathered.movedim(dim, 0), dist.get_world_size(group), halves if dim == 0 else 1
                            ).movedim(0, dim)
    return part


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard; a plain tensor itself)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _is_dtensor(tensor: Any) -> bool:
    return isinstance(tensor, DTensor)


__all__ = ["ShardMap", "full_state_dict", "full_tensors", "local_part", "unwrap"]
