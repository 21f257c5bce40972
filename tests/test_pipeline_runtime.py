"""Pipeline stages from a plan (torch.distributed.pipelining, gloo): one training step's loss and every gradient
equal the single-process model's on the same global batch (fp32, 1e-5 relative), for GPipe and 1F1B on 2 ranks,
with the split inside the decoder so the time embedding and skip tensors cross the stage boundary, and for 2
pipeline replicas x 2 stages on 4 ranks (each replica on its half of the batch, gradients averaged per stage),
and with activation checkpointing (the stage's blocks recompute). Which rank runs which stage of which replica
(the mesh), and the refusal of what the runtime would run otherwise than planned, are checked without processes."""
from __future__ import annotations

import dataclasses

import pytest
import runtime_cases

from pase.errors import PaseError
from pase.graph import extract_model
from pase.planning.plan import StagePlan
from pase.runtime.pipeline import pipeline_mesh

TOLERANCE = 1e-5
SPLIT = "up_blocks.0.attentions.0"  # where `pase plan --only pipeline` splits unet-tiny for 2 devices
CASES = [f"pipeline:gpipe:{SPLIT}", f"pipeline:1f1b:{SPLIT}", f"pipeline:1f1b:{SPLIT}:checkpoint"]
DEFAULT_CASES = CASES[2:]  # 1F1B with checkpointing (its schedule and recomputation); the others run when slow


_LAUNCHES: dict[tuple[str, ...], dict] = {}


def _results(case: str) -> dict:
    """The default case runs in one launch; the slow ones share another, only when the slow tests run."""
    cases = tuple(DEFAULT_CASES) if case in DEFAULT_CASES else tuple(c for c in CASES if c not in DEFAULT_CASES)
    if cases not in _LAUNCHES:
        _LAUNCHES[cases] = runtime_cases.run_ranks(list(cases), world=2, timeout_s=280)
    return _LAUNCHES[cases]


def _assert_matches(per_rank: list[dict]) -> None:
    for result in per_rank:
        assert "error" not in result, result.get("error")
        assert result["loss"] == pytest.approx(result["ref_loss"], rel=TOLERANCE)
        assert result["missing_grads"] == []
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] <= TOLERANCE, (worst, result["errors"][worst])
        assert result["clip_norm"] == pytest.approx(result["ref_clip_norm"], rel=TOLERANCE)  # over both stages
        assert max(result["clip_errors"].values()) <= TOLERANCE


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [*(pytest.param(c, marks=pytest.mark.slow) for c in CASES if c not in DEFAULT_CASES),
                                  *DEFAULT_CASES])
def test_two_stage_pipeline_matches_single_process(case: str) -> None:
    results = _results(case)
    per_rank = [results[rank][case] for rank in sorted(results)]
    _assert_matches(per_rank)
    stage0, stage1 = (set(r["names"]) for r in per_rank)
    assert not stage0 & stage1 and len(stage0 | stage1) == len(list(runtime_cases.build_model().parameters()))
    assert any(name.startswith("up_blocks.0.resnets.0") for name in stage0)  # the split is inside up_blocks.0
    assert any(name.startswith("up_blocks.0.attentions.0") for name in stage1)
    assert per_rank[1]["inputs"] > 3  # the main path, the time embedding and skip tensors cross the boundary
    checkpointing = case.endswith(":checkpoint")
    for result in per_rank:  # under checkpointing a layer inside a block runs twice per microbatch (recomputed)
        assert result["calls_per_microbatch"] == (2 if checkpointing else 1)
        assert bool(result["checkpointed"]) == checkpointing
        assert ("activation checkpointing on" in result["summary"]) == checkpointing
    if checkpointing:
        assert "down_blocks.0.resnets.0" in per_rank[0]["checkpointed"]
        assert "up_blocks.0.attentions.0" in per_rank[1]["checkpointed"]


@pytest.mark.slow  # 4 processes on 2 cores: about a minute
@pytest.mark.timeout(420)
def test_pipeline_replicas_match_single_process() -> None:
    case = f"pipeline:1f1b:{SPLIT}"
    results = runtime_cases.run_ranks([case], world=4, timeout_s=400)
    per_rank = [results[rank][case] for rank in sorted(results)]
    _assert_matches(per_rank)
    assert [(r["replica"], r["stage"]) for r in per_rank] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all("2 stages x 2 replicas" in r["summary"] for r in per_rank)
    for stage in (0, 1):  # both replicas of a stage hold the same parameters, and together the stages hold all
        assert per_rank[stage]["names"] == per_rank[2 + stage]["names"]
    assert len(set(per_rank[0]["names"]) | set(per_rank[1]["names"])) == \
        len(list(runtime_cases.build_model().parameters()))


@pytest.fixture(scope="module")
def graph():
    return extract_model("unet-tiny", runtime_cases.GLOBAL_BATCH, use_cache=True)


def test_mesh_of_pipeline_replicas(graph) -> None:
    """The planner's PP x DP form: replica r runs its stages on ranks [r S, (r + 1) S)."""
    plan = runtime_cases.pipeline_plan(graph, 4, SPLIT, "1f1b", 2, replicas=2)
    mesh = pipeline_mesh(plan)
    assert mesh.ranks == ((0, 1), (2, 3)) and mesh.position(3) == (1, 1) and mesh.stage_ranks(0) == [0, 2]


def test_stage_groups_that_split_only_the_batch_are_replicas(graph) -> None:
    """Stages on groups of devices that split only the batch (what `--only pipeline` plans at 4 devices) run
    as replicas: stage s's j-th device is stage s of replica j."""
    plan = runtime_cases.pipeline_plan(graph, 4, SPLIT, "1f1b", 2)
    plan.stages = [dataclasses.replace(plan.stages[0], devices=[0, 1]), dataclasses.replace(plan.stages[1],
                                                                                             devices=[2, 3])]
    batch = {layer.id: {d: 2 for d, role in graph[layer.id]["roles"].items() if role == "batch"}
             for layer in plan.layers}
    plan.layers = [dataclasses.replace(layer, splits=batch[layer.id]) for layer in plan.layers]
    assert pipeline_mesh(plan, graph).ranks == ((0, 2), (1, 3))
    with pytest.raises(PaseError, match="LayerGraph"):
        pipeline_mesh(plan)  # without the graph the roles of the splits are unknown
    conv = next(layer for layer in plan.layers if layer.op == "conv" and layer.id in plan.stages[1].layers)
    out = next(d for d, role in graph[conv.id]["roles"].items() if role == "out_channel")
    plan.layers = [dataclasses.replace(layer, splits={out: 2}) if layer.id == conv.id else layer
                   for layer in plan.layers]
    with pytest.raises(PaseError, match=f"stage 1 runs on groups of 2 devices and plans layer {conv.id} as"):
        pipeline_mesh(plan, graph)


def test_stages_on_unequal_groups_are_refused(graph) -> None:
    plan = runtime_cases.pipeline_plan(graph, 3, SPLIT, "1f1b", 2)
    plan.stages = [dataclasses.replace(plan.stages[0], devices=[0]),
                   StagePlan(plan.stages[1].layers, [1, 2], 0.0, 0.0, plan.stages[1].blocks)]
    with pytest.raises(PaseError, match=r"^pipeline stage 1 runs on 2 devices and stage 0 on 1: .*re-plan") as refused:
        pipeline_mesh(plan, graph)
    assert "\n" not in str(refused.value)


def test_1f1b_with_fewer_microbatches_than_stages_is_refused(graph) -> None:
    """torch's Schedule1F1B needs a microbatch per stage: the runtime refuses such a plan in one line before any
    work (GPipe, which has no such limit, runs it)."""
    plan = runtime_cases.pipeline_plan(graph, 2, SPLIT, "1f1b", 1)
    with pytest.raises(PaseError, match=r"^pipeline stage 1 cannot run: .*1F1B schedule runs 1 microbatch"):
        pipeline_mesh(plan, graph)
    assert pipeline_mesh(runtime_cases.pipeline_plan(graph, 2, SPLIT, "gpipe", 1), graph).stages == 2
    assert pipeline_mesh(runtime_cases.pipeline_plan(graph, 2, SPLIT, "1f1b", 2), graph).stages == 2


def test_stage_groups_must_split_the_batch_over_the_whole_group(graph) -> None:
    """A layer of a 2-device stage group left unsplit (each device computing the whole microbatch) would run
    batch-split by the runtime's replicas: refused, naming the stage and the layer."""
    plan = runtime_cases.pipeline_plan(graph, 4, SPLIT, "1f1b", 2)
    plan.stages = [dataclasses.replace(plan.stages[0], devices=[0, 1]),
                   dataclasses.replace(plan.stages[1], devices=[2, 3])]
    batch = {layer.id: {d: 2 for d, role in graph[layer.id]["roles"].items() if role == "batch"}
             for layer in plan.layers}
    first = plan.stages[0].layers[1]
    plan.layers = [dataclasses.replace(layer, splits={} if layer.id == first else batch[layer.id])
                   for layer in plan.layers]
    with pytest.raises(PaseError, match=f"^pipeline stage 0 runs on groups of 2 devices and plans layer {first} as "
                                        "no split on them"):
        pipeline_mesh(plan, graph)
    single = runtime_cases.pipeline_plan(graph, 2, SPLIT, "1f1b", 2)  # one device per stage: nothing may split
    last = single.stages[1].layers[-1]
    single.layers = [dataclasses.replace(layer, splits=batch[layer.id]) if layer.id == last else layer
                     for layer in single.layers]
    with pytest.raises(PaseError, match=f"^pipeline stage 1 runs on one device per replica but plans layer {last}"):
        pipeline_mesh(single)


def test_a_step_under_another_autocast_than_the_trace_is_refused_in_one_line() -> None:
    """torch.export fixed the stages' dtypes when they were traced: a step under another autocast would fail deep in
    the traced graph, so pase_step refuses it first, naming both."""
    import torch
    from torch import nn

    from pase.runtime.pipeline import PipelineModel

    stage = PipelineModel.__new__(PipelineModel)  # the check comes before any stage work
    nn.Module.__init__(stage)
    stage.autocast, stage.device_type = None, "cpu"
    with torch.autocast("cpu", dtype=torch.float16), \
            pytest.raises(PaseError, match="traced for no autocast but the step runs under torch.float16 autocast"):
        stage.pase_step(None, None, torch.Generator())


def test_a_plan_checkpointing_blocks_the_model_lacks_is_refused() -> None:
    from strategies.checkpointing import checkpointed_blocks, planned_blocks

    graph = extract_model("unet-tiny", 2, use_cache=True)
    every = checkpointed_blocks(graph)
    assert planned_blocks({"checkpointing": True}, graph) == every
    assert planned_blocks({"checkpointing": True, "checkpoint_blocks": every[:2]}, graph) == every[:2]
    assert planned_blocks({"checkpointing": False, "checkpoint_blocks": every[:2]}, graph) == []
    with pytest.raises(PaseError, match="the plan checkpoints nope, which this model's layer graph does not have"):
        planned_blocks({"checkpointing": True, "checkpoint_blocks": ["nope"]}, graph)
