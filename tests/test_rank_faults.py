"""Plans for a user's `package.module:factory` run under `pase train --plan` and `pase verify --check` when the
command line names the factory; and when one rank of such a torchrun job fails, the other stops within the test's
bound with one line naming the failed rank and its error (pase.rank_faults): a rank that raises, and one SIGKILLed
mid-step (no record: named by its process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pase.cli import app

REPO = Path(__file__).parent.parent
TESTS = REPO / "tests"
PROFILE = TESTS / "fixtures" / "calibration" / "cpu_gloo_2.json"
FACTORY = "user_models:fails_on_one_rank"


@pytest.fixture(scope="module")
def user_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plans") / "user.json"
    result = CliRunner().invoke(app, ["plan", "--model", FACTORY, "--input-shape", "4,3,8,8", "--input-shape", "4",
                                      "--cluster", "local", "--devices", "2", "--profile", str(PROFILE), "--json",
                                      str(path)])
    assert result.exit_code == 0, result.output
    return path


def _torchrun(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1", "COLUMNS": "1000",
                   **env}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(key, None)
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
               "--local-ranks-filter", "0", "-m", "pase", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=100, env=environment, cwd=REPO)


def _train(plan: Path, **env: str) -> subprocess.CompletedProcess:
    return _torchrun("train", "--plan", str(plan), "--model", FACTORY, "--steps", "4", "--no-progress", **env)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow  # (the fault tests below train such a plan up to their failing step)
@pytest.mark.timeout(150)
def test_a_user_factory_plan_trains_on_two_ranks(user_plan: Path) -> None:
    done = _train(user_plan)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final loss" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_verify_checks_a_user_factory_plan_named_on_the_command_line(user_plan: Path) -> None:
    checked = _torchrun("verify", "--plan", str(user_plan), "--model", FACTORY, "--steps", "3", "--warmup", "1",
                        "--check", "--json")
    assert checked.returncode == 0, checked.stderr[-3000:]
    result = json.loads(checked.stdout.strip().splitlines()[-1])
    assert result["max_rel_error"] < 1e-5 and result["layers_as_planned"] == result["layers_total"]
    assert result["comm_bytes_measured"] == pytest.approx(result["comm_bytes_predicted"], rel=0.1)
    unnamed = _torchrun("verify", "--plan", str(user_plan), "--steps", "3")
    assert unnamed.returncode != 0 and f"name it yourself, `--model {FACTORY}`" in unnamed.stderr


@pytest.mark.timeout(150)
def test_the_other_rank_names_the_rank_that_raised(user_plan: Path) -> None:
    done = _train(user_plan, PASE_TEST_FAIL_RANK="1")
    assert done.returncode != 0
    assert _error_lines(done.stderr) == ["error: rank 0 stopped because rank 1 failed: ValueError: forward failed on "
                                         "purpose"], done.stderr[-3000:]
    assert f'File "{REPO / "pase"}' not in done.stderr  # rank 0 (the only one shown) printed no traceback


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_the_other_rank_names_a_rank_killed_without_a_word(user_plan: Path) -> None:
    done = _train(user_plan, PASE_TEST_FAIL_RANK="1", PASE_TEST_FAIL_KILL="1")
    assert done.returncode != 0
    lines = _error_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 stopped because rank 1 left the job without an "
                                                   "error message"), done.stderr[-3000:]
    assert f'File "{REPO / "pase"}' not in done.stderr
