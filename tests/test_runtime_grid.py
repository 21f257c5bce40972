"""Output x input channel grids (2-D tensor parallelism) on 4 gloo ranks: every conv and linear of unet-tiny wide
enough split 2 x 2 gives the single-process model's loss and gradients, with activation checkpointing and under
FSDP too, its weight blocks gather back into full tensors and cut again exactly (checkpoints), and its collectives
move the bytes the cost model prices for the plan."""
from __future__ import annotations

import json

import pytest
import runtime_cases

TOLERANCE = 1e-5
CASES = ["grid", "grid:checkpoint", "grid_fsdp"]


@pytest.fixture(scope="module")
def results() -> dict:
    return runtime_cases.run_ranks(CASES, world=4, timeout_s=280)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow  # 34 s of 2-process runs: the default suite stays under 10 minutes
def test_grid_split_layers_match_a_single_process(results, case: str) -> None:
    per_rank = runtime_cases.matching_ranks(results, case, TOLERANCE)
    assert all(result["round_trip"] == 0.0 for result in per_rank)
    applied = per_rank[0]["applied"]
    assert "grid/2x2" in applied and set(applied) == {"batch", "grid/2x2"}
    assert per_rank[0]["kind"] == ("fsdp+tensor" if case == "grid_fsdp" else "tensor")
    if case.endswith(":checkpoint"):
        assert per_rank[0]["checkpointed"]
    predicted = _predicted_bytes(per_rank[0]["splits"], fsdp=case == "grid_fsdp", checkpointing=":" in case)
    assert max(r["comm_bytes"] for r in per_rank) == pytest.approx(predicted, rel=0.02)


def _predicted_bytes(splits: dict, fsdp: bool, checkpointing: bool) -> float:
    from cost_models.cluster import parse_spec
    from pase.graph import extract_model
    from pase.planning.per_layer import PlanOptions, plan_graph

    graph = extract_model("unet-tiny", runtime_cases.GLOBAL_BATCH, use_cache=True)
    options = PlanOptions(precision="fp32", force=splits, baselines=False, fsdp=fsdp, checkpointing=checkpointing)
    return plan_graph(graph, parse_spec("4xL40S"), options=options).predicted.comm_bytes_per_device


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_grids_of_unequal_sides_on_8_ranks(tmp_path) -> None:
    """2 x 4 and 4 x 2 grids (and 2 x 2 with a batch split of 2) of one Conv2d and one Linear on 8 ranks: each
    rank's output rows, input gradient and summed weight and bias gradients equal the layer alone on the whole
    batch (the rows a grid reorders before its reduce-scatter depend on both sides)."""
    from pase.process_group import free_port, spawn

    out = tmp_path / "errors.json"
    spawn(runtime_cases.grid_layer, (8, free_port(), [(2, 4), (4, 2), (2, 2)], str(out)), 8, 280)
    errors = json.loads(out.read_text())
    assert set(errors) == {"2x4", "4x2", "2x2"}
    assert max(errors.values()) <= TOLERANCE, errors
