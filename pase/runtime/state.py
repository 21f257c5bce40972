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
        """Clip the gradients by their global norm over every shard (the same factor on every rank)."""
        params = [p for _, p in self.named if p.grad is not None]
        if self.pipeline:  # every stage's gradients: one sum of squares over the replica's stages
            total = sum((p.grad.detach().double().pow(2).sum() for p in params), torch.zeros((), dtype=torch.float64))
            dist.all_reduce(total, group=self.group)
            factor = torch.clamp(max_norm / (total.sqrt() + 1e-6), max=1.0)
            for param in params:
                param.grad.mul_(factor.to(param.grad.dtype))
            return total.sqrt().float()
        kinds = {shard.kind for shard in self.shards.values()}
        if kinds <= {"whole"} or kinds == {"dtensor"}:  # replicated, or FSDP2 throughout: torch's own
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        # a mix (channel shards, FSDP2 shards and whole gradients): each part's sum of squares summed over the
        # groups it is spread over (a whole gradient is the same on every rank: counted once)
        total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
        by_groups: dict[tuple[int, ...], tuple[list[Any], torch.Tensor]] = {}  # summed over each group in turn
        for name, param in self.named:
            if param.grad is None:
                continue
            grad = param.grad.detach()
            shard = self.shards[name]
            groups = [group for _, group in shard.cuts]
            if _is_dtensor(grad):
                groups.append(grad.device_mesh.get_group())
                grad = grad.to_local()
            squares = grad.double().pow(2).sum()
            if groups:
                key = tuple(id(group) for group in groups)
                _, partial = by_groups.get(key, (groups, torch.zeros_like(total)))
                by_groups[key] = (groups, partial + squares)
            else:
                total = total + squares
        for groups, partial in by_groups.values():
            for group in groups:
                dist.all_reduce(partial, group=group)
            total = total + partial
        norm = total.sqrt()
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for param in params:
            param.grad.mul_(factor.to(param.grad.dtype))
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
