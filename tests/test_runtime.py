"""pase.parallelize on 2 gloo ranks: DDP, FSDP2, channel splits and head splits give the single-process
model's loss and gradients (same seed, same global batch); plans for another world or model are refused."""
from __future__ import annotations

import pytest
import runtime_cases

TOLERANCE = 1e-5
CASES = ["dp", "fsdp", "channels", "heads", "refusals"]


@pytest.fixture(scope="module")
def results() -> dict:
    return runtime_cases.run_ranks(CASES, world=2, timeout_s=280)


def _case(results: dict, name: str) -> list[dict]:
    per_rank = [results[rank][name] for rank in sorted(results)]
    for result in per_rank:
        assert "error" not in result, result.get("error")
    return per_rank


def _assert_matches_single_process(per_rank: list[dict]) -> None:
    for result in per_rank:
        assert result["missing"] == []
        assert result["loss"] == pytest.approx(result["ref_loss"], rel=TOLERANCE)
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] <= TOLERANCE, (worst, result["errors"][worst])
        assert len(result["errors"]) > 50  # every parameter of unet-tiny was compared


@pytest.mark.timeout(300)
def test_pure_data_parallel_plan_runs_as_ddp(results) -> None:
    per_rank = _case(results, "dp")
    assert {r["kind"] for r in per_rank} == {"ddp"}
    _assert_matches_single_process(per_rank)


@pytest.mark.timeout(300)
def test_fsdp_plan_runs_fully_sharded(results) -> None:
    per_rank = _case(results, "fsdp")
    assert {r["kind"] for r in per_rank} == {"fsdp"}
    _assert_matches_single_process(per_rank)


@pytest.mark.timeout(300)
def test_channel_splits_of_conv_and_linear(results) -> None:
    per_rank = _case(results, "channels")
    assert {r["kind"] for r in per_rank} == {"tensor"}
    assert {"out/2", "in/2"} <= set(per_rank[0]["applied"])
    _assert_matches_single_process(per_rank)


@pytest.mark.timeout(300)
def test_head_split_attention(results) -> None:
    per_rank = _case(results, "heads")
    assert "heads/2" in per_rank[0]["applied"]
    assert all(r["head_calls"] == 4 for r in per_rank)  # each of unet-tiny's 4 attentions ran split
    _assert_matches_single_process(per_rank)


@pytest.mark.timeout(300)
def test_plans_for_another_world_or_model_are_refused(results) -> None:
    for messages in _case(results, "refusals"):
        assert "made for 4 devices" in messages["world"] and "--nproc-per-node 4" in messages["world"]
        assert "another model" in messages["model"]
        assert "another model" in messages["other_model"]
        assert "made for 4 devices" in messages["pipeline_world"]
        assert "another model" in messages["pipeline_model"]
        refusal = messages["norm_channels"]  # refused by name, never run batch-parallel instead
        assert "as planned" in refusal and "down_blocks.0.resnets.0.norm1 (group_norm, c=2)" in refusal
