"""Spatial splits on gloo ranks: convolutions exchange their boundary rows with their neighbours (halo), group
norms sum their statistics over the group, and the result is the single-process model's; the bytes are what
the cost model prices (2 ranks: every convolution and group norm of unet-tiny split by rows, with and without
activation checkpointing; 4 ranks: interior ranks with two neighbours, and convolutions split by output channels
and rows at once)."""
from __future__ import annotations

import json

import pytest
import runtime_cases

TOLERANCE = 1e-5
CASES = ["spatial", "spatial:checkpoint"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["spatial", pytest.param("spatial:checkpoint", marks=pytest.mark.slow)])
def test_spatially_split_layers_match_a_single_process(case: str) -> None:
    results = runtime_cases.run_ranks([case], world=2, timeout_s=280)
    per_rank = runtime_cases.matching_ranks(results, case, TOLERANCE)
    assert all(result["comm_by_op"]["send_recv"] > 0 for result in per_rank)  # halos were exchanged
    assert set(per_rank[0]["applied"]) == {"batch", "spatial/2"}
    splits = per_rank[0]["splits"]
    assert sum(any(d in ("h", "w") for d in s) for s in splits.values()) >= 10  # convolutions by height and width
    assert any("l" in s for s in splits.values())  # an attention's norm over its flattened positions
    predicted = _predicted_bytes(splits, checkpointing=":" in case)
    assert max(r["comm_bytes"] for r in per_rank) == pytest.approx(predicted, rel=0.01)


@pytest.mark.slow  # 21 s on 4 processes
@pytest.mark.timeout(300)
def test_convolutions_split_by_output_channels_and_rows_on_4_ranks() -> None:
    """Every convolution of unet-tiny that can, split 2 ways by output channels and 2 ways by rows (height or width)
    on a 2 x 2 grid of ranks: the input's rows exchanged and gathered, halos between row neighbours, the output's
    cells exchanged back to batch chunks; the single-process result and exactly the bytes priced."""
    results = runtime_cases.run_ranks(["outspatial"], world=4, timeout_s=280)
    per_rank = runtime_cases.matching_ranks(results, "outspatial", TOLERANCE)
    assert set(per_rank[0]["applied"]) == {"batch", "outspatial/2x2"}
    splits = per_rank[0]["splits"]
    assert sum(len(s) == 2 and bool({"h", "w"} & set(s)) for s in splits.values()) > 20
    assert all(r["comm_by_op"]["send_recv"] > 0 and r["round_trip"] == 0.0 for r in per_rank)  # halos; checkpoints
    predicted = _predicted_bytes(splits, checkpointing=False, world=4)
    assert max(r["comm_bytes"] for r in per_rank) == pytest.approx(predicted, rel=1e-6)


def _predicted_bytes(splits: dict, checkpointing: bool, world: int = 2) -> float:
    from cost_models.cluster import parse_spec
    from pase.graph import extract_model
    from pase.planning.per_layer import PlanOptions, plan_graph

    graph = extract_model("unet-tiny", runtime_cases.GLOBAL_BATCH, use_cache=True)
    options = PlanOptions(precision="fp32", force=splits, baselines=False, checkpointing=checkpointing,
                          min_chunk={"out_channel": 16, "spatial": 8})
    return plan_graph(graph, parse_spec(f"{world}xL40S"), options=options).predicted.comm_bytes_per_device


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_halos_and_statistics_on_4_ranks(tmp_path) -> None:
    """3x3 and 5x5 convolutions and a group norm split 4 ways by height and by width: each rank's output and
    gradients equal the layer's on the whole batch; an edge rank sends its 5x5 halo (2 rows) to one neighbour and an
    interior rank to two, forward and backward."""
    from pase.process_group import free_port, spawn

    out = tmp_path / "spatial.json"
    spawn(runtime_cases.spatial_layers, (4, free_port(), str(out)), 4, 180)
    found = json.loads(out.read_text())
    assert len(found["errors"]) == 6 and max(found["errors"].values()) <= TOLERANCE, found["errors"]
    height, width = zip(*found["send_bytes"])  # per rank: (split by height, split by width)
    rows = 2 * 4 * 4 * 4  # 2 halo rows x 4 channels x the group's 4 samples, per element along the other axis, fp32
    across = (4 * 4 + 4, 4 * 4)  # the other axis: width (20) when split by height, height (16) when by width
    for sent, other in zip((height, width), across):
        assert list(sent) == [2 * sides * rows * other for sides in (1, 2, 2, 1)]
