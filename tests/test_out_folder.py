"""One run per --out folder: the lock, an earlier run's folder, stray temporary files, and two runs at once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pase.atomic import TEMP_SUFFIX, write_text
from pase.cli import app
from pase.train.out_folder import LOCK, OutFolderError, claim, owned_out

REPO = Path(__file__).parent.parent
HOLD = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": 1, \"host\": \"elsewhere\", \"started\": 0}'); "
        "print('held', flush=True); time.sleep(60)")


def _hold(lock: Path) -> subprocess.Popen:
    """Another process holding the lock, as a running pase job does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_folder_in_use_is_refused_and_free_again_when_its_holder_dies(tmp_path) -> None:
    holder = _hold(tmp_path / LOCK)
    try:
        with pytest.raises(OutFolderError, match=r"is in use by another run \(pid 1 on elsewhere"):
            claim(tmp_path, resume=False, overwrite=False)
    finally:
        holder.kill()  # as SIGKILL would: the kernel drops its lock
        holder.wait()
    claim(tmp_path, resume=False, overwrite=False).release()
    with owned_out(tmp_path, False, False):
        record = json.loads((tmp_path / LOCK).read_text())
        assert record["pid"] == os.getpid()
    assert (tmp_path / LOCK).read_text() == ""  # released and emptied


def test_an_earlier_run_needs_resume_or_overwrite_and_temporaries_go(tmp_path) -> None:
    (tmp_path / "checkpoints").mkdir()
    write_text(tmp_path / "checkpoints" / "step-00000002.safetensors", "x")
    write_text(tmp_path / "log.jsonl", "{}\n")
    stray = tmp_path / "checkpoints" / f".step-00000004.safetensors.abc123{TEMP_SUFFIX}"
    stray.write_text("half")
    with pytest.raises(OutFolderError, match="holds an earlier run \\(checkpoints, log.jsonl\\); continue it with "
                                             "--resume, replace it with --overwrite"):
        claim(tmp_path, resume=False, overwrite=False)
    assert stray.exists()  # nothing touched by a refusal
    with pytest.raises(OutFolderError, match="choose one"):
        claim(tmp_path, resume=True, overwrite=True)
    claim(tmp_path, resume=True, overwrite=False).release()
    assert not stray.exists() and (tmp_path / "checkpoints" / "step-00000002.safetensors").exists()
    claim(tmp_path, resume=False, overwrite=True).release()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "log.jsonl").exists()


def test_bad_out_folders_get_one_line(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutFolderError, match="is a file; give a folder"):
        claim(tmp_path / "file", False, False)
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(OutFolderError, match="cannot write in --out"):
            claim(tmp_path / "ro" / "run", False, False)


def test_the_cli_refuses_an_earlier_run_and_a_busy_folder(tmp_path) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", "unet-tiny", "--image-size", "8", "--steps", "1", "--batch", "2", "--no-progress",
            "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, OutFolderError) and "--resume" in str(again.exception)
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    holder = _hold(out / LOCK)
    try:
        busy = CliRunner().invoke(app, [*args, "--resume"])
        assert isinstance(busy.exception, OutFolderError) and "in use by another run" in str(busy.exception)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # 6 s of 2 processes; a busy folder's refusal runs by default in the CLI and holder tests above
@pytest.mark.timeout(120)
def test_two_processes_stop_together_when_the_folder_is_busy(tmp_path) -> None:
    """Rank 0 decides, every rank stops with its line at once (no rank waits in a collective)."""
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold(out / LOCK)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    try:
        done = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node",
                               "2", "-m", "pase", "train", "--model", "unet-tiny", "--image-size", "8", "--steps", "1",
                               "--batch", "2", "--out", str(out)], capture_output=True, text=True, timeout=90,
                              env=env, cwd=REPO)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0 and done.stderr.count("in use by another run") == 2  # one line from each rank
    assert f'File "{REPO / "pase"}' not in done.stderr, done.stderr[-3000:]  # no traceback through pase (torchrun's
    # own report of its failed children may follow)
