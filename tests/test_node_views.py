"""Two simulated nodes (two torchrun agents on this host, one rank each, each given its own --out): when they see
different checkpoints to resume from, or different --init files, both stop at start-up with the same line instead
of training from different steps and then waiting in a collective (pase.train.node_views)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pase.process_group import free_port
from pase.train.node_views import describe_view

REPO = Path(__file__).parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
TRAIN = ["-m", "pase", "train", "--model", "unet-tiny", "--image-size", "8", "--batch", "4", "--data-count", "16",
         "--no-progress"]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _two_nodes(per_node: list[list[str]]) -> list[subprocess.CompletedProcess]:
    port = str(free_port())
    agents = [subprocess.Popen([str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                                "--master-addr", "127.0.0.1", "--master-port", port, *TRAIN, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
              for node, args in enumerate(per_node)]
    done = []
    try:
        for agent in agents:
            stdout, stderr = agent.communicate(timeout=60)  # the bound the issue sets: never a hang
            done.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    finally:
        for agent in agents:
            agent.kill()
    return done


def _errors(run: subprocess.CompletedProcess) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nodes") / "node0"
    done = subprocess.run([sys.executable, *TRAIN, "--steps", "1", "--out", str(out)], capture_output=True,
                          text=True, timeout=120, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_nodes_that_see_different_checkpoints_stop_at_start_up(trained: Path, tmp_path: Path) -> None:
    runs = _two_nodes([["--steps", "3", "--resume", "--out", str(trained)],
                       ["--steps", "3", "--resume", "--out", str(tmp_path / "node1")]])
    for run in runs:
        assert run.returncode != 0
        lines = _errors(run)
        assert len(lines) == 1 and "ranks see different --resume: rank 0 on" in lines[0], run.stderr[-3000:]
        assert "step-00000001.safetensors" in lines[0] and "sees " + str(tmp_path / "node1") + ": no checkpoints" \
            in lines[0]
        assert f'File "{REPO / "pase"}' not in run.stderr


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_nodes_with_the_same_files_at_different_paths_agree(trained: Path, tmp_path: Path) -> None:
    """A copy of the folder on the other node (or the same share mounted elsewhere) is the same view."""
    shutil.copytree(trained, tmp_path / "copy")
    init_copy = tmp_path / "init.safetensors"
    shutil.copy(trained / "model.safetensors", init_copy)
    assert describe_view(trained, trained / "model.safetensors", True)["--resume"][1] == \
        describe_view(tmp_path / "copy", init_copy, True)["--resume"][1]
    runs = _two_nodes([["--steps", "2", "--init", str(trained / "model.safetensors")],
                       ["--steps", "2", "--init", str(init_copy)]])
    assert all(run.returncode == 0 for run in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(init_copy.read_bytes()[:-4] + b"\0\0\0\1")
    refused = _two_nodes([["--steps", "2", "--init", str(trained / "model.safetensors")],
                          ["--steps", "2", "--init", str(changed)]])
    assert all(run.returncode != 0 and "ranks see different --init" in "".join(_errors(run)) for run in refused)
