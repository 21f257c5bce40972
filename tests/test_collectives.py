"""The runtime's re-layouts and gradient sync on 2 gloo ranks: values against the single-process computation,
and the bytes each collective moves (recorded from the c10d ops a TorchDispatchMode sees) against what the
cost model prices for the edge: the consumer's block minus its overlap with the producer's, so no
all-gather-then-slice. Gradient buckets are all-reduced during the backward, not after it."""
from __future__ import annotations

import copy
import json
import tempfile
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

WORLD = 2
ITEM = 4  # float32 bytes


def _received(func: str, args: tuple, size: int) -> int:
    """Bytes a rank receives from the other ranks of a ``size``-rank group in one c10d op (ring algorithms)."""
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    if func == "alltoall_base_":  # (output, input, ...): all but its own block of the output
        return nbytes(args[0]) * (size - 1) // size
    if func == "allgather_":  # ([[outputs]], [input], ...)
        return sum(nbytes(t) for t in args[1]) * (size - 1)
    if func == "_allgather_base_":  # (output, input, ...)
        return nbytes(args[1]) * (size - 1)
    if func == "_reduce_scatter_base_":  # (output, input, ...)
        return nbytes(args[1]) * (size - 1) // size
    if func == "allreduce_":  # ([tensors], ...): reduce-scatter + all-gather
        return 2 * sum(nbytes(t) for t in args[0]) * (size - 1) // size
    raise AssertionError(f"unexpected collective c10d.{func}")


def _recorder() -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        """Records (op, bytes received) for c10d ops and the names of other ops, in order."""
        def __init__(self) -> None:
            super().__init__()
            self.events: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            namespace, name = func.namespace, func._schema.name.split("::")[-1]
            self.events.append((name, _received(name, args, WORLD)) if namespace == "c10d" else (name, 0))
            return func(*args, **(kwargs or {}))

        def collectives(self) -> list[list]:
            return [[name, size] for name, size in self.events if name in _COLLECTIVES]

    return Recorder()


_COLLECTIVES = {"alltoall_base_", "allgather_", "_allgather_base_", "_reduce_scatter_base_", "allreduce_"}


def _per_rank(seed: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """One tensor per rank, the same on every rank (each rank can compute the others')."""
    return [torch.randn(shape, generator=torch.Generator().manual_seed(seed + r)) for r in range(WORLD)]


def _relayout_checks(rank: int) -> dict[str, Any]:
    from strategies.collectives import batch_to_split, gather_batch, reduce_scatter_batch, split_to_batch

    group = None  # the world: one group of t = 2
    b, t = 3, WORLD
    results: dict[str, Any] = {}
    for label, shape, dim in (("channels", (b, 6, 4, 4), 1), ("features", (b, 5, 8), -1), ("heads", (b, 4, 5, 3), 1)):
        part = shape[dim] // t
        rows = slice(rank * b, (rank + 1) * b)

        def cut(x: torch.Tensor, dim: int = dim, part: int = part) -> torch.Tensor:
            """This rank's part of ``dim``."""
            return x.narrow(dim, rank * part, part)

        # batch chunks -> the group's batch, my part of dim
        xs = _per_rank(10, shape)
        whole = torch.cat(xs)
        grads = _per_rank(20, (t * b, *[s // t if i == dim % len(shape) else s for i, s in enumerate(shape[1:], 1)]))
        x = xs[rank].clone().requires_grad_()
        with _recorder() as rec:
            y = batch_to_split(x, dim, group)
            forward = rec.collectives()
            y.backward(grads[rank])
        full_grad = torch.cat(grads, dim=dim)  # the gradient of the whole batch, every part of dim
        results[f"batch_to_split/{label}"] = {
            "forward": torch.equal(y, cut(whole)), "backward": torch.equal(x.grad, full_grad[rows]),
            "ops": rec.collectives(), "forward_ops": forward, "input_bytes": x.numel() * ITEM}

        # the group's batch, my part of dim -> batch chunks
        ys = _per_rank(30, (t * b, *shape[1:]))[0]  # the whole layer output, all parts
        grads = _per_rank(40, shape)
        y = cut(ys).contiguous().requires_grad_()
        with _recorder() as rec:
            out = split_to_batch(y, dim, group)
            forward = rec.collectives()
            out.backward(grads[rank])
        results[f"split_to_batch/{label}"] = {
            "forward": torch.equal(out, ys[rows]), "backward": torch.equal(y.grad, cut(torch.cat(grads))),
            "ops": rec.collectives(), "forward_ops": forward, "output_bytes": y.numel() * ITEM}

    # gather_batch (out-channel entry) and reduce_scatter_batch (in-channel exit)
    xs, grads = _per_rank(50, (b, 6)), _per_rank(60, (t * b, 6))
    x = xs[rank].clone().requires_grad_()
    with _recorder() as rec:
        y = gather_batch(x, group)
        y.backward(grads[rank])
    rows = slice(rank * b, (rank + 1) * b)
    results["gather_batch"] = {"forward": torch.equal(y, torch.cat(xs)),
                               "backward": torch.allclose(x.grad, (grads[0] + grads[1])[rows], atol=1e-6),
                               "ops": rec.collectives(), "input_bytes": x.numel() * ITEM}
    partials, grads = _per_rank(70, (t * b, 6)), _per_rank(80, (b, 6))
    p = partials[rank].clone().requires_grad_()
    with _recorder() as rec:
        y = reduce_scatter_batch(p, group)
        y.backward(grads[rank])
    results["reduce_scatter_batch"] = {"forward": torch.allclose(y, (partials[0] + partials[1])[rows], atol=1e-6),
                                       "backward": torch.equal(p.grad, torch.cat(grads)),
                                       "ops": rec.collectives(), "output_bytes": y.numel() * ITEM}
    return results


def _layer_checks(rank: int) -> dict[str, Any]:
    """ChannelSplit (out and in) and head-split attention against the unsplit layer on the global batch."""
    import torch.nn.functional as F
    from torch import nn

    from strategies.tensor import ChannelSplit, TensorGroups, split_heads

    groups = TensorGroups.build("cpu", WORLD, WORLD)
    b = 2
    rows = slice(rank * b, (rank + 1) * b)
    results: dict[str, Any] = {}
    torch.manual_seed(0)
    for split in ("out", "in"):
        for kind, layer, shape in (("conv", nn.Conv2d(4, 6, 3, padding=1), (WORLD * b, 4, 5, 5)),
                                   ("linear", nn.Linear(4, 6), (WORLD * b, 7, 4))):
            x = torch.randn(shape, requires_grad=True)
            want = layer(x)
            want.square().sum().backward()
            split_layer = ChannelSplit(layer, split, groups)
            mine = x.detach()[rows].clone().requires_grad_()
            with _recorder() as rec:
                got = split_layer(mine)
                forward = rec.collectives()
                got.square().sum().backward()
            weight_dim = 0 if split == "out" else 1
            results[f"{split}/{kind}"] = {
                "forward": torch.allclose(got, want[rows], atol=1e-5),
                "input_grad": torch.allclose(mine.grad, x.grad[rows], atol=1e-5),
                "weight_grad_rank_sum": split_layer.weight.grad.tolist(),
                "want_weight_grad": layer.weight.grad.chunk(WORLD, weight_dim)[rank].tolist(),
                "forward_ops": forward, "ops": rec.collectives(),
                "input_bytes": mine.numel() * ITEM, "output_bytes": got.numel() * ITEM}

    class Attention(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(WORLD * b, 4, 6, 3) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v)
    module = Attention()
    mode = split_heads(module, groups)
    local = [t[rows].clone().requires_grad_() for t in (q, k, v)]
    with _recorder() as rec:
        got = module(*local)
        forward = rec.collectives()
    results["heads"] = {"forward": torch.allclose(got, want[rows], atol=1e-6), "calls": mode.calls,
                        "forward_ops": forward, "input_bytes": local[0].numel() * ITEM,
                        "output_bytes": got.numel() * ITEM}

    class MatmulAttention(nn.Module):  # attention without scaled_dot_product_attention: no head split can apply
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v

    unsplit = MatmulAttention()
    split_heads(unsplit, groups)
    try:
        unsplit(*local)
        results["heads_without_sdpa"] = "ran"
    except RuntimeError as exc:
        results["heads_without_sdpa"] = str(exc)
    return results


def _gradient_sync_checks(rank: int) -> dict[str, Any]:
    from torch import nn

    from strategies.tensor import GradientSync

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(3, 3)  # never reached by the forward: takes part with zeros (last bucket)
            self.layers = nn.Sequential(*(nn.Linear(16, 16) for _ in range(6)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    torch.manual_seed(0)
    model = Stack()
    reference = copy.deepcopy(model.layers)
    x = torch.randn(WORLD * 4, 16, generator=torch.Generator().manual_seed(3))
    reference(x).square().mean().backward()
    rows = slice(rank * 4, (rank + 1) * 4)
    sync = GradientSync.install(model, WORLD, bucket_bytes=2 * 16 * 16 * ITEM)  # ~2 layers a bucket
    results: dict[str, Any] = {}
    for step in range(2):
        model.zero_grad()
        with _recorder() as rec:
            loss = model(x[rows]).square().mean()
            loss.backward()
        names = [name for name, _ in rec.events]
        reduces = [i for i, name in enumerate(names) if name == "allreduce_"]
        last_compute = max(i for i, name in enumerate(names) if name in ("mm", "addmm"))
        results[f"step{step}"] = {
            "grads": all(torch.allclose(p.grad, q.grad, atol=1e-6) for p, q in
                         zip(model.layers.parameters(), reference.parameters(), strict=True)),
            "unused_zero": all(float(p.grad.abs().sum()) == 0.0 for p in model.unused.parameters()),
            "reduces": [size for name, size in rec.collectives() if name == "allreduce_"],
            "buckets": len(sync.buckets), "launched_in_backward": sync.launched_in_backward,
            "reduce_before_last_compute": bool(reduces) and reduces[0] < last_compute}
    return results


def _counter_checks(rank: int) -> dict[str, Any]:
    """``pase.runtime.comm_count.CommCounter`` on known buffers: bytes per rank in the cost model's convention."""
    import torch.distributed as dist

    from pase.runtime.comm_count import CommCounter

    with CommCounter() as counter:
        dist.all_reduce(torch.ones(1000))  # 4000 bytes x 2 (g - 1) / g = 4000
        dist.all_gather_into_tensor(torch.empty(2000), torch.ones(1000))  # output 8000 x 1/2 = 4000
        dist.reduce_scatter_tensor(torch.empty(500), torch.ones(1000))  # input 4000 x 1/2 = 2000
        dist.all_to_all_single(torch.empty(1000), torch.ones(1000))  # 4000 x 1/2 = 2000
        parts = [torch.empty(10) for _ in range(WORLD)]
        dist.all_gather(parts, torch.ones(10))  # outputs 80 x 1/2 = 40
        if rank == 0:
            dist.send(torch.ones(100), 1)  # 400, counted by the sender only
        else:
            dist.recv(torch.empty(100), 0)
    return {"bytes": dict(counter.bytes), "calls": dict(counter.calls), "total": counter.total_bytes}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from pase.process_group import Launch, process_group

    results: dict[str, Any] = {}
    with process_group(Launch.local(rank, WORLD, port), "gloo", timeout_s=60):
        for name, check in (("relayout", _relayout_checks), ("layers", _layer_checks),
                            ("sync", _gradient_sync_checks), ("counter", _counter_checks)):
            try:
                results[name] = check(rank)
            except Exception:  # reported to the test, which fails with the traceback
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    Path(out, f"{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results() -> list[dict]:
    from pase.process_group import free_port, spawn

    with tempfile.TemporaryDirectory(prefix="pase-collectives-test-") as tmp:
        spawn(_worker, (free_port(), tmp), WORLD, timeout_s=90)
        return [json.loads((Path(tmp) / f"{rank}.json").read_text()) for rank in range(WORLD)]


def _section(results: list[dict], name: str) -> list[dict]:
    for result in results:
        assert "error" not in result[name], result[name]["error"]
    return [result[name] for result in results]


T = WORLD


@pytest.mark.timeout(120)
def test_relayouts_match_single_process_and_move_only_what_is_missing(results) -> None:
    for checks in _section(results, "relayout"):
        for label, check in checks.items():
            assert check["forward"] and check["backward"], label
        for label in ("channels", "features", "heads"):
            entry, exit_ = checks[f"batch_to_split/{label}"], checks[f"split_to_batch/{label}"]
            # batch chunks -> parts: (t - 1) / t of the input each way, one all-to-all each way
            assert entry["ops"] == [["alltoall_base_", entry["input_bytes"] * (T - 1) // T]] * 2, label
            # parts -> batch chunks: (t - 1) / t of the local output block, not the (t - 1) x it of an all-gather
            assert exit_["forward_ops"] == [["alltoall_base_", exit_["output_bytes"] * (T - 1) // T]], label
            assert exit_["ops"] == [["alltoall_base_", exit_["output_bytes"] * (T - 1) // T]] * 2, label
        gather = checks["gather_batch"]
        assert [op for op, _ in gather["ops"]] == ["allgather_", "_reduce_scatter_base_"]
        assert gather["ops"][0][1] == gather["input_bytes"] * (T - 1)  # every other rank's chunk
        scatter = checks["reduce_scatter_batch"]
        assert [op for op, _ in scatter["ops"]] == ["_reduce_scatter_base_", "allgather_"]
        assert scatter["ops"][0][1] == scatter["output_bytes"] * (T - 1)  # (t - 1) / t of the partial sums


@pytest.mark.timeout(120)
def test_split_layers_use_the_cheapest_collective_for_each_relayout(results) -> None:
    for checks in _section(results, "layers"):
        for kind in ("conv", "linear"):
            out, in_ = checks[f"out/{kind}"], checks[f"in/{kind}"]
            for check in (out, in_):
                assert check["forward"] and check["input_grad"], kind
                assert torch.allclose(torch.tensor(check["weight_grad_rank_sum"]),
                                      torch.tensor(check["want_weight_grad"]), atol=1e-4), kind
            # out split: the group's batch gathered (it needs every input channel), the output's
            # channel parts exchanged for batch chunks: (t - 1) / t of the local output block
            local_output = out["output_bytes"]  # the layer's block (group's batch x C_out / t) is as big as a chunk's
            assert out["forward_ops"] == [["allgather_", out["input_bytes"] * (T - 1)],
                                          ["alltoall_base_", local_output * (T - 1) // T]], kind
            # in split: only this rank's input channels of the group's batch, partial sums reduce-scattered
            assert in_["forward_ops"] == [["alltoall_base_", in_["input_bytes"] * (T - 1) // T],
                                          ["_reduce_scatter_base_", in_["output_bytes"] * (T - 1)]], kind
        heads = checks["heads"]
        assert heads["forward"] and heads["calls"] == 1
        assert heads["forward_ops"] == [["alltoall_base_", heads["input_bytes"] * (T - 1) // T]] * 3 + \
            [["alltoall_base_", heads["output_bytes"] * (T - 1) // T]]
        assert "never called scaled_dot_product_attention" in checks["heads_without_sdpa"]  # refused, not run whole


@pytest.mark.timeout(120)
def test_gradient_sync_overlaps_the_backward_in_the_same_order_on_every_rank(results) -> None:
    per_rank = _section(results, "sync")
    for checks in per_rank:
        for step in ("step0", "step1"):
            check = checks[step]
            assert check["grads"] and check["unused_zero"], step
            assert check["buckets"] >= 3
            assert len(check["reduces"]) == check["buckets"]
            assert check["launched_in_backward"] >= 1  # all but the one holding the unused layer's parameters
            assert check["reduce_before_last_compute"], step  # an all-reduce ran while the backward computed
    assert per_rank[0]["step0"]["reduces"] == per_rank[1]["step0"]["reduces"]  # same collectives, same order


@pytest.mark.timeout(120)
def test_comm_counter_counts_bytes_per_rank_in_the_cost_model_convention(results) -> None:
    first, second = _section(results, "counter")
    assert first["bytes"] == {"all_reduce": 4000, "all_gather": 4040, "reduce_scatter": 2000, "all_to_all": 2000,
                              "send_recv": 400}
    assert first["calls"]["all_gather"] == 2 and first["calls"]["send_recv"] == 1
    assert second["total"] == first["total"] - 400  # the receiver moves nothing of its own
