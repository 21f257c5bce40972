"""Helpers shared by the tests that train tiny Stable-Diffusion pipeline folders: a 2-process ``pase`` run under
torchrun, and the relative distance between two sets of weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun_pase(*args: str, timeout: float = 240) -> dict:
    """``torchrun --nproc-per-node 2 -m pase ARGS`` (one thread per process), its ``--json`` report."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "pase", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def max_rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest relative distance of one tensor from its counterpart (same names required)."""
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)) for k in want)
