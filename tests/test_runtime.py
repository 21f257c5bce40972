"""pase.parallelize on 2 gloo ranks: DDP, FSDP2, channel splits, head splits, kept channel layouts and replicated
layouts give
the single-process model's loss and gradients (same seed, same global batch), with and without activation
checkpointing (whose blocks really recompute); plans for another world or model are refused."""
from __future__ import annotations

import pytest
import runtime_cases

TOLERANCE = 1e-5
KINDS = ["dp", "fsdp", "channels", "heads", "seq", "kept", "replicated"]
# checkpointed in the default suite: one DDP, two tensor (channels; heads, whose split attention recomputes) and
# the kept layouts; the others' checkpointed runs share a second launch, with the slow tests
CHECKPOINTED = ["dp", "channels", "heads", "kept"]
CASES = [*KINDS, *(f"{kind}:checkpoint" for kind in CHECKPOINTED), "refusals"]
SLOW_CASES = [f"{kind}:checkpoint" for kind in KINDS if kind not in CHECKPOINTED]


@pytest.fixture(scope="module")
def results() -> dict:
    return runtime_cases.run_ranks(CASES, world=2, timeout_s=280)


@pytest.fixture(scope="module")
def slow_results() -> dict:
    return runtime_cases.run_ranks(SLOW_CASES, world=2, timeout_s=280)


def _case(results: dict, name: str) -> list[dict]:
    per_rank = [results[rank][name] for rank in sorted(results)]
    for result in per_rank:
        assert "error" not in result, result.get("error")
    return per_rank


def _assert_matches_single_process(per_rank: list[dict]) -> None:
    assert [r["unwrapped_on_this_rank"] for r in per_rank] == [True] + [False] * (len(per_rank) - 1)
    assert per_rank[0]["plain_is_plain"] and per_rank[0]["plain_output_error"] <= 1e-5
    for result in per_rank:
        assert result["state_keys_match"] and result["state_error"] == 0.0  # run.state_dict(): full tensors
        assert result["missing"] == []
        assert result["loss"] == pytest.approx(result["ref_loss"], rel=TOLERANCE)
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] <= TOLERANCE, (worst, result["errors"][worst])
        assert len(result["errors"]) > 50  # every parameter of unet-tiny was compared
        # the global norm over every shard (each part counted once) and the clipped gradients, as one process clips
        assert result["clip_norm"] == pytest.approx(result["ref_clip_norm"], rel=TOLERANCE)
        assert result["clip_norm"] > 10 * runtime_cases.CLIP_NORM
        assert max(result["clip_errors"].values()) <= TOLERANCE


@pytest.mark.timeout(300)
def test_pure_data_parallel_plan_runs_as_ddp(results) -> None:
    per_rank = _case(results, "dp")
    assert {r["kind"] for r in per_rank} == {"ddp"}
    _assert_matches_single_process(per_rank)
    for result in per_rank:  # no checkpointing: every layer runs its forward once
        assert result["checkpointed"] == [] and set(result["calls"].values()) == {1}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,layout", [
    pytest.param(kind, layout, marks=() if kind in CHECKPOINTED else pytest.mark.slow)
    for kind, layout in [("dp", "ddp"), ("fsdp", "fsdp"), ("channels", "tensor"), ("heads", "tensor"),
                         ("seq", "tensor"), ("kept", "tensor"), ("replicated", "tensor")]])
def test_checkpointed_plans_recompute_blocks_and_match(request, kind: str, layout: str) -> None:
    """A plan made with --checkpoint runs its blocks under activation checkpointing: the same loss and
    gradients, and the layers inside a block run their forward twice per step (forward, then recomputed)."""
    results = request.getfixturevalue("results" if kind in CHECKPOINTED else "slow_results")
    per_rank = _case(results, f"{kind}:checkpoint")
    assert {r["kind"] for r in per_rank} == {layout}
    _assert_matches_single_process(per_rank)
    for result in per_rank:
        assert {"down_blocks.0.resnets.0", "down_blocks.1.attentions.0"} <= set(result["checkpointed"])
        assert not {"conv_in", "conv_out", "<root>", "up_blocks.0"} & set(result["checkpointed"])
        assert result["calls"] == {"down_blocks.0.resnets.0.norm1": 2, "down_blocks.1.attentions.0.group_norm": 2}
        assert f"activation checkpointing on {len(result['checkpointed'])} blocks" in result["summary"]
    if kind in ("heads", "seq", "replicated"):  # the split attention is what recomputes: split again in backward
        assert all(r["head_calls"] == 8 for r in per_rank)


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
def test_query_sequence_split_attention(results) -> None:
    """Each attention on its half of the queries of both ranks' batch, keys and values gathered: the single-process
    result, and the bytes the cost model prices (an all-to-all of q and the output, an all-gather of k and v and
    the reduce-scatter of their gradients)."""
    per_rank = _case(results, "seq")
    assert "seq/2" in per_rank[0]["applied"]
    assert all(r["head_calls"] == 4 for r in per_rank)  # each of unet-tiny's 4 attentions ran split
    _assert_matches_single_process(per_rank)
    assert max(r["comm_bytes"] for r in per_rank) == pytest.approx(_predicted_bytes(per_rank[0]["splits"]), rel=0.02)


@pytest.mark.timeout(300)
def test_kept_channel_layouts_between_resnet_layers(results) -> None:
    """ResNet blocks as Megatron pairs (conv1 out-split, the time-embedding add and norm2 on their channel
    part, conv2 in-split) and attentions too (q, k, v out-split, attention on the kept heads, to_out in-split):
    the single-process result, and exactly the bytes the cost model prices for the plan,
    which are fewer than for the same splits passing through the batch layout between layers."""
    per_rank = _case(results, "kept")
    assert {"out/2", "local/2", "in/2", "heads/2"} <= set(per_rank[0]["applied"])
    assert all(r["head_calls"] == 4 for r in per_rank)  # unet-tiny's 4 attentions ran on their kept heads
    _assert_matches_single_process(per_rank)
    kept = per_rank[0]["splits"]
    measured = max(r["comm_bytes"] for r in per_rank)
    assert measured == pytest.approx(_predicted_bytes(kept), rel=0.02)
    split_roles = ("out_channel", "reduction", "head")  # the same conv, linear and head splits; norms and adds
    through_batch = {layer: splits if any(r in split_roles for r in _roles(layer, splits)) else {"n": 2}
                     for layer, splits in kept.items()}  # batch-parallel (attention keeps its heads still)
    assert measured < 0.9 * _predicted_bytes(through_batch)


@pytest.mark.timeout(300)
def test_replicated_layers_run_on_sub_groups(results) -> None:
    """Every conv, linear, group norm and attention with its batch unsplit on 2 ranks (``{n: 1}``: PaSE's
    configurations that leave devices idle) runs on both ranks as replicas of the whole batch: the input gathered,
    each rank's chunk of the output kept, and no gradient all-reduce (every replica holds the whole batch's
    gradient already). The single-process result, and exactly the bytes the cost model prices."""
    per_rank = _case(results, "replicated")
    assert {"batch", "replicated/2"} == set(per_rank[0]["applied"])
    assert all(r["head_calls"] == 4 for r in per_rank)  # unet-tiny's 4 attentions ran replicated
    _assert_matches_single_process(per_rank)
    assert all(set(r["comm_by_op"]) == {"all_gather"} for r in per_rank)
    assert max(r["comm_bytes"] for r in per_rank) == pytest.approx(_predicted_bytes(per_rank[0]["splits"]), rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replicas_on_4_ranks_with_and_without_fsdp() -> None:
    """On 4 ranks, layers unsplit (4 replicas) and split 2 ways (2 replica groups of 2, gradients summed over the 2
    groups), with DDP-style gradient sync and with FSDP2 sharding each replicated module over its groups' peers."""
    cases = ["replicated", "replicated_fsdp"]
    results = runtime_cases.run_ranks(cases, world=4, timeout_s=280)
    for case in cases:
        per_rank = runtime_cases.matching_ranks(results, case, TOLERANCE)
        assert {"batch", "replicated/2", "replicated/4"} == set(per_rank[0]["applied"])
        assert ("reduce_scatter" if case.endswith("fsdp") else "all_reduce") in per_rank[0]["comm_by_op"]
        predicted = _predicted_bytes(per_rank[0]["splits"], world=4, fsdp=case.endswith("fsdp"))
        assert max(r["comm_bytes"] for r in per_rank) == pytest.approx(predicted, rel=1e-3)


@pytest.mark.slow  # 28 s on 4 processes
@pytest.mark.timeout(300)
def test_output_channel_splits_on_replica_groups() -> None:
    """Every conv and linear split 2 ways by output channels with the batch unsplit on 4 ranks: 2 replicas per
    output part gather their input over the replicas, the split gathers over the parts, and each output part goes to
    its batch chunks' ranks by one all-to-all (its gradient gathered back over the replicas); the single-process
    result, and exactly the bytes priced."""
    case = "replica_out"
    results = runtime_cases.run_ranks([case], world=4, timeout_s=280)
    per_rank = runtime_cases.matching_ranks(results, case, TOLERANCE)
    assert set(per_rank[0]["applied"]) == {"batch", "out/2+replicas/2"}
    assert all(r["round_trip"] == 0.0 for r in per_rank)  # checkpoints gather the parts
    predicted = _predicted_bytes(per_rank[0]["splits"], world=4, min_chunk={"out_channel": 8})
    assert max(r["comm_bytes"] for r in per_rank) == pytest.approx(predicted, rel=1e-3)


def _roles(layer: str, splits: dict) -> list[str]:
    from pase.graph import extract_model

    data = extract_model("unet-tiny", runtime_cases.GLOBAL_BATCH, use_cache=True)[layer]
    return [data["roles"][d] for d, f in splits.items() if f > 1]


def _predicted_bytes(splits: dict, world: int = 2, fsdp: bool = False, min_chunk: dict | None = None) -> float:
    from cost_models.cluster import parse_spec
    from pase.graph import extract_model
    from pase.planning.per_layer import PlanOptions, plan_graph

    graph = extract_model("unet-tiny", runtime_cases.GLOBAL_BATCH, use_cache=True)
    options = PlanOptions(precision="fp32", force=splits, baselines=False, fsdp=fsdp, min_chunk=min_chunk)
    return plan_graph(graph, parse_spec(f"{world}xL40S"), options=options).predicted.comm_bytes_per_device


@pytest.mark.timeout(300)
def test_plans_for_another_world_or_model_are_refused(results) -> None:
    for messages in _case(results, "refusals"):
        assert "made for 4 devices" in messages["world"] and "--nproc-per-node 4" in messages["world"]
        assert "another model" in messages["model"]
        assert "another model" in messages["other_model"]
        assert "made for 4 devices" in messages["pipeline_world"]
        assert "another model" in messages["pipeline_model"]
        refusal = messages["norm_channels"]  # refused by name, never run batch-parallel instead
        assert "as planned" in refusal and "down_blocks.0.resnets.0.norm1 (local/2, next to" in refusal
        assert "keep its layout" in refusal


def test_checkpointed_blocks_are_those_priced_as_recomputing() -> None:
    """The runtime checkpoints exactly the blocks whose inner layers the cost model prices as recomputed."""
    import torch
    from torch import nn

    from pase.graph import extract, extract_model
    from pase.planning.per_layer import block_output_layers
    from strategies.checkpointing import checkpointed_blocks, recomputed_layers

    graph = extract_model("unet-tiny", 8, use_cache=True)
    blocks, recomputed, saved = checkpointed_blocks(graph), recomputed_layers(graph), block_output_layers(graph)
    assert recomputed and not recomputed & saved and recomputed | saved == {layer_id for layer_id, _ in graph.layers()}
    assert {graph[layer_id]["block"] for layer_id in recomputed} == set(blocks)
    assert {"down_blocks.0.resnets.0", "mid_block.attentions.0", "time_embedding"} <= set(blocks)
    assert not {"<root>", "conv_in", "conv_out", "up_blocks.0", "down_blocks.0.downsamplers.0"} & set(blocks)
    chain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    flat = extract(chain, (torch.zeros(2, 3, 8, 8, device="meta"),), name="chain")
    assert checkpointed_blocks(flat) == [] and recomputed_layers(flat) == set()  # one-layer blocks: nothing to save
