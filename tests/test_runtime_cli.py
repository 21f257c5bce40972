"""Plans for this machine (`--cluster local`), `--only` kinds, and `pase verify` under torchrun."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cost_models.calibrate import load_profile
from cost_models.local import cpu_cluster, host_memory_bytes
from cost_models.rates import profile_mismatch
from pase.cli import app
from pase.graph import extract_model
from pase.planning.per_layer import PlanOptions, plan_graph
from pase.planning.plan import Plan

PROFILE = Path(__file__).parent / "fixtures" / "calibration" / "cpu_gloo_2.json"
REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def local() -> tuple:
    profile = load_profile(PROFILE)
    return cpu_cluster(2, profile), profile, extract_model("unet-tiny", 8, use_cache=True)


def test_cpu_processes_are_priced_by_their_calibration(local) -> None:
    cluster, profile, _ = local
    assert cluster.world_size == 2 and cluster.gpu.id == "cpu"
    assert profile_mismatch(cluster, profile) is None
    assert cluster.gpu.memory_bytes == pytest.approx(host_memory_bytes() / 2, rel=1e-6)
    with pytest.raises(Exception, match="2 gloo processes|4 gloo"):
        from cost_models.local import cpu_profile

        cpu_profile(4, PROFILE)


@pytest.mark.parametrize("only", ["dp", "fsdp", "tensor"])
def test_only_restricts_the_plan_to_one_kind(local, only: str) -> None:
    cluster, profile, graph = local
    plan = plan_graph(graph, cluster, profile=profile, options=PlanOptions(precision="fp32", only=only))
    roles = {layer.id: graph[layer.id]["roles"] for layer in plan.layers}
    used = {roles[layer.id][d] for layer in plan.layers for d, f in layer.splits.items() if f > 1}
    if only in ("dp", "fsdp"):
        assert used == {"batch"}
        assert plan.options["fsdp"] is (only == "fsdp")
    else:
        assert used & {"out_channel", "reduction", "head"} and not used & {"spatial", "sequence"}
    assert all(layer.runnable for layer in plan.layers)


def test_only_pipeline_plans_stages_even_when_slower(local) -> None:
    from pase.planning.pipeline import plan_with_pipeline

    cluster, profile, graph = local
    plan, _ = plan_with_pipeline(graph, cluster, profile=profile, options=PlanOptions(precision="fp32",
                                                                                      only="pipeline"))
    assert len(plan.stages) >= 2 and plan.microbatches >= 1
    assert sorted(r for stage in plan.stages for r in stage.devices) == [0, 1]


def test_plan_cluster_local_on_the_command_line(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs: --cluster local probes them")
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--cluster", "local", "--devices", "2",
                                      "--batch", "8", "--only", "tensor", "--profile", str(PROFILE), "--json",
                                      str(out)])
    assert result.exit_code == 0, result.output
    plan = Plan.load(out)
    assert plan.devices == 2 and plan.precision == "fp32" and plan.cluster == "local:2xcpu"
    refused = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--cluster", "8xH100-SXM", "--devices", "2"])
    assert refused.exit_code != 0


def _plan(local: tuple, only: str) -> Plan:
    from pase.planning.pipeline import plan_with_pipeline

    cluster, profile, graph = local
    only, *extras = only.split("+")
    options = PlanOptions(precision="fp32", only=only, checkpointing="checkpoint" in extras, fsdp="fsdp" in extras)
    if only == "pipeline":
        return plan_with_pipeline(graph, cluster, profile=profile, options=options)[0]
    return plan_graph(graph, cluster, profile=profile, options=options)


@pytest.mark.timeout(240)
# the default suite keeps one plan per runtime path; "fsdp" and "tensor+checkpoint" (covered by tensor+fsdp+checkpoint)
# run with the slow tests
# tensor+fsdp and checkpointing also run in the default suite in tests/test_runtime_grid.py, pipelines in
# tests/test_pipeline_runtime.py; here through the CLI
@pytest.mark.slow  # 23 s; tests/test_layer_timing.py times the layers in one process in the default suite
@pytest.mark.timeout(300)
def test_verify_per_layer_times_each_layer_kind_against_its_prediction(local, tmp_path: Path) -> None:
    """`pase verify --per-layer` on 2 gloo processes: every conv, linear, norm and attention module is timed, forward
    and backward, and each kind's seconds per step come out beside the plan's for the same layers."""
    from pase.runtime.layer_timing import TIMED_KINDS

    _, _, graph = local
    plan = _plan(local, "dp")
    plan.save(tmp_path / "plan.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2", "-m", "pase",
               "verify", "--plan", str(tmp_path / "plan.json"), "--steps", "3", "--warmup", "1", "--per-layer",
               "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=200, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    kinds = json.loads(done.stdout.strip().splitlines()[-1])["per_kind"]
    assert set(kinds) == {"conv", "linear", "group_norm", "attention"} <= set(TIMED_KINDS)
    convs = sum(1 for _, data in graph.layers() if data["op"] == "conv")
    assert kinds["conv"]["layers"] == convs and kinds["attention"]["layers"] == 4
    for row in kinds.values():
        assert row["measured_seconds"] > 0 and row["predicted_seconds"] > 0
    planned = {layer.id: layer.seconds for layer in plan.layers}
    assert kinds["conv"]["predicted_seconds"] == pytest.approx(
        sum(planned[layer_id] for layer_id, data in graph.layers() if data["op"] == "conv"))


# all slow (18 s each): `pase verify --check` on 2 processes runs in the default suite in tests/test_block_sharding.py
@pytest.mark.parametrize("only", [pytest.param("dp", marks=pytest.mark.slow),
                                  pytest.param("fsdp", marks=pytest.mark.slow),
                                  pytest.param("tensor", marks=pytest.mark.slow),
                                  pytest.param("tensor+checkpoint", marks=pytest.mark.slow),
                                  pytest.param("tensor+fsdp+checkpoint", marks=pytest.mark.slow),
                                  pytest.param("pipeline", marks=pytest.mark.slow)])
def test_verify_runs_the_plan_and_updates_the_profile(local, tmp_path: Path, only: str) -> None:
    """`pase verify --check` under torchrun for per-layer plans (tensor splits with FSDP over each split's data-
    parallel peers too) and for pipeline stages (their schedule, not forwards): one step matches a single process,
    every layer runs as planned, and the bytes the collectives move are the bytes the plan priced; then the timed
    steps update the profile."""
    _, profile, _ = local
    plan = _plan(local, only)
    assert bool(plan.stages) == (only == "pipeline")
    plan_path, profile_path = tmp_path / "plan.json", tmp_path / "profile.json"
    plan.save(plan_path)
    shutil.copy(PROFILE, profile_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "pase", "verify", "--plan",
                           str(plan_path), "--steps", "3", "--warmup", "1", "--json", "--check", "--update-profile",
                           str(profile_path)], capture_output=True, text=True, timeout=200, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(summary) == ["predicted_step_seconds", "measured_step_seconds", "ratio", "predicted_memory_bytes",
                             "measured_memory_bytes", "layers_as_planned", "layers_total", "max_rel_error",
                             "comm_bytes_measured", "comm_bytes_predicted"]
    assert summary["max_rel_error"] <= 1e-4
    assert summary["layers_as_planned"] == summary["layers_total"] == len(plan.layers)
    assert summary["comm_bytes_predicted"] == pytest.approx(plan.predicted.comm_bytes_per_device)
    assert summary["comm_bytes_measured"] == pytest.approx(summary["comm_bytes_predicted"], rel=0.10)
    assert summary["predicted_step_seconds"] == pytest.approx(plan.predicted.step_seconds)
    assert summary["measured_step_seconds"] > 0 and summary["measured_memory_bytes"] > 0
    assert summary["ratio"] == pytest.approx(summary["measured_step_seconds"] / summary["predicted_step_seconds"])
    updated = load_profile(profile_path)
    record = updated["verify"][-1]
    factor = record["compute_rate_factor"]
    assert updated["compute"]["conv"]["flops_per_second"] == pytest.approx(
        profile["compute"]["conv"]["flops_per_second"] * factor)
    # the rates now price this plan's compute (and a pipeline's bubble, which waits on compute) as measured
    predicted = plan.predicted
    assert (predicted.compute_seconds + predicted.bubble_seconds) / factor + predicted.communication_seconds == \
        pytest.approx(summary["measured_step_seconds"], rel=1e-6)
    assert ("pipeline of 2 stages" in record["layout"]) == (only == "pipeline")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("only", [pytest.param("dp", marks=pytest.mark.slow),
                                  pytest.param("tensor", marks=pytest.mark.slow),  # by default: test_text_to_image
                                  pytest.param("seq", marks=pytest.mark.slow)])  # seq: also in tests/test_runtime.py
def test_verify_checks_a_text_conditioned_unet(local, tmp_path: Path, only: str) -> None:
    """sd-tiny (SD's architecture at test size: cross-attention transformer blocks, layer norms, GEGLU) under
    `pase verify --check` with text embeddings: the tensor plan keeps channels and heads split between layers
    (a ResNet block, attentions, a GEGLU feed-forward with interleaved rows), matches a single process, and
    moves exactly the bytes it priced; so does a plan with attentions split by their query sequence
    (self-attention and cross-attention to the text, keys and values gathered)."""
    from pase.runtime.layout import layer_layouts

    cluster, profile, _ = local
    graph = extract_model("sd-tiny", 8, use_cache=True)
    # the tensor plan with one ResNet block's norm2 and time-embedding add channel-split: the search must give
    # them kept neighbours (conv1 out-split, conv2 in-split)
    kept = {f"mid_block.resnets.0{layer}": {"c": 2} for layer in (".norm2", "/elementwise")}
    kept["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"] = {"c_out": 2}  # GEGLU rows, kept for net.2
    sequence = {f"{level}_blocks.*/attention": {"q": 2} for level in ("down", "up")}  # 256 queries (mid: 64)
    forced = kept if only == "tensor" else sequence if only == "seq" else None
    options = PlanOptions(precision="fp32", only=None if only == "seq" else only, force=forced)
    plan = plan_graph(graph, cluster, profile=profile, options=options)
    layouts = layer_layouts(plan, graph)
    kinds = {layout.kind for layout in layouts}
    attentions = sum(data["op"] == "attention" and layer_id.startswith(("down_", "up_")) for layer_id, data in
                     graph.layers())
    if only == "dp":
        assert kinds == {"batch"}
    elif only == "tensor":
        assert {"out", "in", "heads", "local"} <= kinds
    else:  # every self- and cross-attention outside the mid block
        assert sum(layout.kind == "seq" for layout in layouts) == attentions > 4
    assert any(layout.keep_output for layout in layouts) == (only == "tensor")
    assert any(layout.gated and layout.keep_output for layout in layouts) == (only == "tensor")
    _verify_check_passes(plan, tmp_path / "plan.json")


@pytest.mark.slow  # 17 s of torchrun
@pytest.mark.timeout(240)
def test_verify_checks_channel_split_layer_norms_and_replicas(local, tmp_path: Path) -> None:
    """sd-tiny's transformer layer norms split over their channels (statistics all-reduced over the group) and its
    attentions, projections and time-embedding linears run as replicas of the whole batch (batch unsplit on 2
    ranks), through `pase plan --force` and `pase verify --check`: the single process's step, every layer as
    planned, exactly the bytes priced."""
    from pase.runtime.layout import layer_layouts

    cluster, profile, _ = local
    graph = extract_model("sd-tiny", 8, use_cache=True)
    forced = {"*transformer_blocks.0.norm[123]": {"c": 2}, "*/attention": {}, "*attn[12].to_[qkv]": {},
              "*time_emb*": {}, "*.proj_in": {}}
    options = PlanOptions(precision="fp32", force=forced, min_chunk={"channel": 16})
    plan = plan_graph(graph, cluster, profile=profile, options=options)
    kinds = {}
    for layout in layer_layouts(plan, graph):
        kinds.setdefault(layout.applied, []).append(layout.op)
    assert kinds["norm/2"] == ["layer_norm"] * 3 * 4  # the 4 transformer blocks
    assert {"attention", "linear", "conv"} <= set(kinds["replicated/2"])
    _verify_check_passes(plan, tmp_path / "plan.json")


@pytest.mark.slow  # 21 s; a text-conditioned pipeline plan also trains in the default suite (test_text_to_image)
@pytest.mark.timeout(240)
def test_verify_checks_pipeline_stages_of_a_text_conditioned_unet(local, tmp_path: Path) -> None:
    """sd-tiny in 2 pipeline stages: the text embeddings enter stage 0 and are sent on to the stage whose
    cross-attentions read them (priced as a crossing tensor without a gradient); one step equals a single
    process's and moves the bytes priced."""
    from pase.planning.pipeline import plan_with_pipeline

    cluster, profile, _ = local
    graph = extract_model("sd-tiny", 8, use_cache=True)
    plan, _ = plan_with_pipeline(graph, cluster, profile=profile, options=PlanOptions(precision="fp32",
                                                                                      only="pipeline"))
    stage_of = {layer_id: s for s, stage in enumerate(plan.stages) for layer_id in stage.layers}
    text_readers = {stage_of[dst] for dst in graph.graph.successors("input:encoder_hidden_states/input")}
    assert len(plan.stages) == 2 and text_readers == {0, 1}  # cross-attention on both sides of the cut
    _verify_check_passes(plan, tmp_path / "plan.json")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_strided_convolution_split_by_output_channels_moves_the_bytes_priced(local, tmp_path: Path) -> None:
    """The downsampler (stride 2) split by its output channels: its input, twice its output grid on each axis, is
    gathered and its partial gradient reduce-scattered at that size, as priced (it was priced at the output grid's
    size before, 10% short of the measured bytes)."""
    cluster, profile, graph = local
    forced = {"*": {"n": 2}, "down_blocks.0.downsamplers.0.conv": {"c_out": 2}}
    plan = plan_graph(graph, cluster, profile=profile, options=PlanOptions(precision="fp32", force=forced,
                                                                             min_chunk={"out_channel": 16}))
    assert next(layer for layer in plan.layers if layer.id == "down_blocks.0.downsamplers.0.conv").splits == \
        {"c_out": 2}
    _verify_check_passes(plan, tmp_path / "plan.json")


def _verify_check_passes(plan: Plan, plan_path: Path) -> None:
    """`pase verify --check` of ``plan`` on 2 torchrun processes: the single process's step, every layer as planned,
    the priced bytes."""
    plan.save(plan_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "pase", "verify", "--plan",
                           str(plan_path), "--steps", "2", "--warmup", "1", "--json", "--check"],
                          capture_output=True, text=True, timeout=200, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["max_rel_error"] <= 1e-4
    assert summary["layers_as_planned"] == summary["layers_total"] == len(plan.layers)
    assert summary["comm_bytes_measured"] == pytest.approx(summary["comm_bytes_predicted"], rel=1e-3)


def test_verify_refuses_a_plan_for_another_world(local, tmp_path: Path) -> None:
    """Under a world of one (no torchrun), a 2-device plan is refused before any work starts."""
    cluster, profile, graph = local
    plan = plan_graph(graph, cluster, profile=profile, options=PlanOptions(precision="fp32", only="dp"))
    plan.save(tmp_path / "plan.json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "pase", "verify", "--plan", str(tmp_path / "plan.json"), "--steps",
                           "3"], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.returncode == 2
    assert "made for 2 devices" in done.stderr and "1 processes" in done.stderr


def test_update_profile_refuses_a_run_whose_layers_ran_differently(local) -> None:
    from pase.errors import PaseError
    from pase.train.verify import VerifyResult, apply_to_profile

    cluster, profile, graph = local
    plan = plan_graph(graph, cluster, profile=profile, options=PlanOptions(precision="fp32", only="dp"))
    result = VerifyResult(0.1, 0.2, 2.0, 1, 1, [0.2, 0.2], [1, 1], [1.0], "ddp", "test", layers_as_planned=100,
                          layers_total=104)
    with pytest.raises(PaseError, match="4 of 104 layers ran differently"):
        apply_to_profile(profile, plan, result)
    result.layers_as_planned = 104
    assert apply_to_profile(profile, plan, result)["verify"][-1]["compute_rate_factor"] > 0


@pytest.mark.slow  # 4 processes on 2 cores: about 30 s
@pytest.mark.timeout(300)
def test_verify_runs_a_4_process_1f1b_plan_with_few_microbatches(tmp_path: Path) -> None:
    """`pase plan --only pipeline` at 4 devices offered few microbatches: the search never emits 1F1B with fewer
    microbatches than stages (torch's Schedule1F1B refuses them), and what it emits runs under `pase verify`."""
    from cost_models.local import cpu_cluster
    from pase.planning.pipeline import PipelineOptions, plan_with_pipeline

    profile = load_profile(PROFILE)
    graph = extract_model("unet-tiny", 16, use_cache=True)
    plan, _ = plan_with_pipeline(graph, cpu_cluster(4, profile), profile=profile,
                                 options=PlanOptions(precision="fp32", only="pipeline"),
                                 pipeline=PipelineOptions(microbatches=(1, 2)))
    assert plan.schedule == "1f1b" and len(plan.stages) >= 2 and plan.microbatches >= len(plan.stages)
    plan.save(tmp_path / "plan.json")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "4", "-m", "pase", "verify", "--plan",
                           str(tmp_path / "plan.json"), "--steps", "3", "--warmup", "1", "--json"],
                          capture_output=True, text=True, timeout=280, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["measured_step_seconds"] > 0
