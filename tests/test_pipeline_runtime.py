"""Pipeline stages from a plan (torch.distributed.pipelining, 2 gloo ranks): one training step's loss and every
gradient equal the single-process model's on the same global batch (fp32, 1e-5 relative), for GPipe and 1F1B,
with the split inside the decoder so the time embedding and skip tensors cross the stage boundary."""
from __future__ import annotations

import pytest
import runtime_cases

TOLERANCE = 1e-5
SPLIT = "up_blocks.0.attentions.0"  # where `pase plan --only pipeline` splits unet-tiny for 2 devices
CASES = [f"pipeline:gpipe:{SPLIT}", f"pipeline:1f1b:{SPLIT}"]


@pytest.fixture(scope="module")
def results() -> dict:
    return runtime_cases.run_ranks(CASES, world=2, timeout_s=280)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
def test_two_stage_pipeline_matches_single_process(results, case: str) -> None:
    per_rank = [results[rank][case] for rank in sorted(results)]
    for result in per_rank:
        assert "error" not in result, result.get("error")
        assert result["loss"] == pytest.approx(result["ref_loss"], rel=TOLERANCE)
        assert result["missing_grads"] == []
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] <= TOLERANCE, (worst, result["errors"][worst])
    stage0, stage1 = (set(r["names"]) for r in per_rank)
    assert not stage0 & stage1 and len(stage0 | stage1) == len(list(runtime_cases.build_model().parameters()))
    assert any(name.startswith("up_blocks.0.resnets.0") for name in stage0)  # the split is inside up_blocks.0
    assert any(name.startswith("up_blocks.0.attentions.0") for name in stage1)
    assert per_rank[1]["inputs"] > 3  # the main path, the time embedding and skip tensors cross the boundary
