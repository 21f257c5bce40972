"""pase.process_group: the backend rule, torchrun's environment, a free port, and a 2-process gloo group that
opens and closes under a timeout, also when a rank never reaches the final barrier."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import pase.process_group as pg
from pase.errors import PaseError
from pase.process_group import Launch

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_nccl_on_gpus_gloo_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pg.pick_backend() == "gloo" and pg.pick_device(3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pg.pick_backend() == "nccl" and pg.pick_device(3) == torch.device("cuda", 1)


def test_torchrun_environment(no_torchrun: pytest.MonkeyPatch) -> None:
    assert Launch.from_torchrun() is None
    no_torchrun.setenv("WORLD_SIZE", "4")
    no_torchrun.setenv("RANK", "3")
    no_torchrun.setenv("LOCAL_RANK", "1")
    assert Launch.from_torchrun() == Launch(3, 4, 1, None)
    with pytest.raises(PaseError, match="WORLD_SIZE is 4 but MASTER_ADDR and MASTER_PORT are not both set"):
        pg.open_group(Launch.from_torchrun() or Launch())
    no_torchrun.setenv("MASTER_ADDR", "10.0.0.1")
    no_torchrun.setenv("MASTER_PORT", "29500")
    assert Launch.from_torchrun() == Launch(3, 4, 1, "env://")
    assert Launch.local(1, 2, 1234) == Launch(1, 2, 1, "tcp://127.0.0.1:1234")


def test_a_world_of_one_from_the_environment_needs_no_rendezvous(no_torchrun: pytest.MonkeyPatch) -> None:
    no_torchrun.setenv("WORLD_SIZE", "1")
    launch = Launch.from_torchrun()
    assert launch is not None and launch.world_size == 1 and launch.init_method.startswith("tcp://127.0.0.1:")


def test_free_port_is_bindable() -> None:
    port = pg.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_a_world_of_one_opens_and_closes_in_process(no_torchrun: pytest.MonkeyPatch) -> None:
    pg.close_group()  # no group: nothing to do
    with pg.process_group(Launch.local(), "gloo", timeout_s=30) as device:
        assert device == torch.device("cpu") and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="inside"), pg.process_group(Launch.local(), "gloo", timeout_s=30):
        raise ValueError("inside")
    assert not dist.is_initialized()


def _all_reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    with pg.process_group(Launch.local(rank, world, port), "gloo", timeout_s=30) as device:
        total = torch.tensor([rank + 1.0], device=device)
        dist.all_reduce(total)
        Path(out, f"{rank}.json").write_text(json.dumps({"sum": total.item(), "backend": dist.get_backend(),
                                                         "world": dist.get_world_size()}))
    Path(out, f"{rank}.closed").write_text(str(dist.is_initialized()))


@pytest.mark.timeout(90)
def test_two_gloo_ranks_open_and_close_cleanly(tmp_path: Path) -> None:
    pg.spawn(_all_reduce_worker, (2, pg.free_port(), str(tmp_path)), 2, timeout_s=60)
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == {"sum": 3.0, "backend": "gloo", "world": 2}
        assert (tmp_path / f"{rank}.closed").read_text() == "False"


def _late_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 reaches the end 6 s late; rank 0 waits for it at most 2 s."""
    torch.set_num_threads(1)
    pg.open_group(Launch.local(rank, world, port), "gloo", timeout_s=60)
    if rank == 1:
        time.sleep(6)
        pg.close_group(60, barrier=False)
        return
    started = time.monotonic()
    try:
        pg.close_group(2)
        message = None
    except PaseError as exc:
        message = str(exc)
    Path(out, "0.json").write_text(json.dumps({"message": message, "seconds": time.monotonic() - started,
                                               "initialized": dist.is_initialized()}))


@pytest.mark.timeout(90)
def test_teardown_gives_up_on_a_late_rank_after_its_timeout(tmp_path: Path) -> None:
    pg.spawn(_late_rank_worker, (2, pg.free_port(), str(tmp_path)), 2, timeout_s=60)
    result = json.loads((tmp_path / "0.json").read_text())
    assert result["message"] and result["message"].startswith("not every rank reached the end of the run within 2 s")
    assert "\n" not in result["message"] and "1 failed to pass" in result["message"]
    assert result["seconds"] < 5 and not result["initialized"]  # destroyed without waiting for rank 1


def _sleeping_worker(rank: int) -> None:
    time.sleep(60)


@pytest.mark.timeout(60)
def test_spawn_kills_processes_that_outlive_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="2 processes did not finish within 3 s"):
        pg.spawn(_sleeping_worker, (), 2, timeout_s=3)
    assert time.monotonic() - started < 30


def _failing_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 fails inside a sampling session; it must leave at once with its own error, not wait at the
    final barrier for rank 0 (which finishes, waits its 10 s and reports rank 1 missing)."""
    import os

    from pase.sampling import distributed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    started = time.monotonic()
    try:
        with distributed.session(timeout_s=10):
            if rank == 1:
                raise ValueError("rank 1 failed")
        error = None
    except (ValueError, PaseError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    Path(out, f"{rank}.json").write_text(json.dumps({"error": error, "seconds": time.monotonic() - started,
                                                     "initialized": dist.is_initialized()}))


@pytest.mark.timeout(90)
def test_a_failing_sampling_rank_leaves_with_its_own_error(tmp_path: Path) -> None:
    pg.spawn(_failing_rank_worker, (2, pg.free_port(), str(tmp_path)), 2, timeout_s=60)
    failed = json.loads((tmp_path / "1.json").read_text())
    assert failed["error"] == "ValueError: rank 1 failed" and failed["seconds"] < 5 and not failed["initialized"]
    waited = json.loads((tmp_path / "0.json").read_text())
    assert waited["error"].startswith("PaseError: not every rank reached the end of the run within 10 s")
