"""Gradient accumulation on 2 gloo ranks: micro-steps under ``gradient_sync_paused`` run no collective and keep
their gradients local; the last micro-step's backward reduces the sums, giving every rank the gradient of the
mean loss over all ranks' micro-batches. For DDP (``no_sync``) and a tensor plan's ``GradientSync``."""
from __future__ import annotations

import copy
import json
import tempfile
import traceback
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

WORLD, MICRO = 2, 3


def _batch(rank: int, micro: int) -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(100 * rank + micro))


def _worker(rank: int, port: int, kind: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pase.runtime.accumulation import gradient_sync_paused
    from pase.runtime.comm_count import CommCounter
    from strategies.tensor import GradientSync

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        reference = copy.deepcopy(model)
        if kind == "ddp":
            wrapped: torch.nn.Module = DistributedDataParallel(model)
        else:  # as the runtime installs it for a tensor plan
            model.pase_sync = GradientSync.install(model, WORLD)
            wrapped = model
        calls, local = [], True
        for micro in range(MICRO):
            last = micro == MICRO - 1
            with CommCounter() as count, gradient_sync_paused(wrapped) if not last else nullcontext():
                (wrapped(_batch(rank, micro)).square().mean() / MICRO).backward()
            calls.append(sum(count.calls.values()))
            if not last:  # still this rank's own sum: the ranks differ
                grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                both = [torch.zeros_like(grads) for _ in range(WORLD)]
                dist.all_gather(both, grads)
                local = local and not torch.allclose(both[0], both[1])
        loss = sum(reference(_batch(r, m)).square().mean() for r in range(WORLD) for m in range(MICRO))
        (loss / (WORLD * MICRO)).backward()
        error = max(float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(), reference.parameters()))
        Path(out, f"{rank}.json").write_text(json.dumps({"calls": calls, "local": local, "error": error}))
        dist.barrier()
    except Exception:
        Path(out, f"{rank}.json").write_text(json.dumps({"failed": traceback.format_exc()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", [pytest.param("ddp", marks=pytest.mark.slow), "tensor"])  # dp: test_block_sharding
def test_paused_micro_steps_stay_local_and_the_last_reduces_their_sum(kind) -> None:
    from pase.process_group import free_port, spawn

    with tempfile.TemporaryDirectory() as out:
        spawn(_worker, (free_port(), kind, out), WORLD, timeout_s=90)
        results = [json.loads(Path(out, f"{rank}.json").read_text()) for rank in range(WORLD)]
    for result in results:
        assert "failed" not in result, result.get("failed")
        assert result["calls"][:-1] == [0] * (MICRO - 1) and result["calls"][-1] > 0
        assert result["local"] and result["error"] < 1e-6
