"""Micro-steps (gradient accumulation) searched with the splits: the whole-step arithmetic, the joint search
against searching every count, the four baselines, plan files, and 2-process runs of such plans as planned.

Memory-bound cases come from unet-tiny on 2 H100s with a tiny memory fraction: the same search and cost model
as a real model that does not fit, at a size a test can search many times.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_cases import verify_on_two_processes as _verify
from typer.testing import CliRunner

from cost_models.cluster import parse_spec
from pase.cli import app
from pase.errors import PaseError
from pase.graph import extract_model
from pase.planning import PlanOptions, make_plan
from pase.planning.micro_steps import BASELINES, accumulated, micro_graph, micro_step_counts
from pase.planning.per_layer import plan_and_price
from pase.planning.plan import Plan, Prediction

REPO = Path(__file__).parent.parent
PROFILE = REPO / "tests" / "fixtures" / "calibration" / "cpu_gloo_2.json"
BATCH = 32


@pytest.fixture(scope="module")
def tiny() -> object:
    return extract_model("unet-tiny", BATCH, use_cache=True)


def _plan(graph, fraction: float, **kwargs) -> Plan:
    """unet-tiny on H100s priced as a CUDA-graphed stack: eagerly, every one of its layers waits on the host's
    dispatch, so what recomputing or sharding a block costs the GPU (what these tests are about) never shows."""
    options = PlanOptions(memory_fraction=fraction, stack="graphed")
    return make_plan(graph, parse_spec("2xH100-SXM"), options=options, **kwargs)[0]


def test_a_step_of_micro_steps_repeats_all_but_the_gradient_all_reduce() -> None:
    micro = Prediction(step_seconds=1.0, samples_per_second=8.0, memory_bytes_per_device=5.0, compute_seconds=0.7,
                       communication_seconds=0.3, gradient_sync_seconds=0.1, comm_bytes_per_device=100.0,
                       gradient_sync_bytes_per_device=40.0)
    step = accumulated(micro, 4, batch=32)
    assert step.step_seconds == pytest.approx(4 * 1.0 - 3 * 0.1)
    assert step.compute_seconds == pytest.approx(2.8) and step.communication_seconds == pytest.approx(1.2 - 0.3)
    assert step.comm_bytes_per_device == pytest.approx(400 - 3 * 40) and step.memory_bytes_per_device == 5.0
    assert step.samples_per_second == pytest.approx(32 / 3.7) and step.micro_steps == 4
    assert micro_step_counts(32, 2) == [1, 2, 4, 8, 16] and micro_step_counts(12, 8) == []


@pytest.mark.parametrize("fraction", [pytest.param(1e-3, marks=pytest.mark.slow),
                                      pytest.param(3e-4, marks=pytest.mark.slow),
                                      pytest.param(2e-4, marks=pytest.mark.slow), 1e-4])
def test_the_joint_search_fits_and_beats_every_baseline_and_every_count_searched_alone(tiny, fraction) -> None:
    """Brute force over the micro-step counts (each searched alone, with FSDP and checkpointing as the joint search
    may choose them too): the joint plan is as fast as the best, fits, and is never slower than a baseline."""
    plan = _plan(tiny, fraction)
    limit = parse_spec("2xH100-SXM").gpu.memory_bytes * fraction
    assert plan.predicted.memory_bytes_per_device <= limit and plan.micro_steps == plan.predicted.micro_steps
    assert set(plan.baselines) == set(BASELINES)
    for name, baseline in plan.baselines.items():
        if baseline is None:
            assert plan.baseline_notes[name]  # why it is missing
        else:
            assert plan.predicted.step_seconds <= baseline.step_seconds * (1 + 1e-9), name
    alone = []
    for k in micro_step_counts(BATCH, 2):
        for fsdp, checkpointing in ((False, False), (True, True), (True, False)):
            options = PlanOptions(memory_fraction=fraction, fsdp=fsdp, checkpointing=checkpointing, search_gap=0.0,
                                  micro_steps=k, baselines=False)
            try:
                found = plan_and_price(micro_graph(tiny, k), parse_spec("2xH100-SXM"), options=options)[0]
            except PaseError:
                continue
            alone.append(accumulated(found.predicted, k, BATCH).step_seconds)
    assert plan.predicted.step_seconds <= min(alone) * (1 + 5e-3)


def test_memory_decides_the_micro_steps_and_where_sharding_and_recomputing_pay(tiny) -> None:
    roomy, tight, tighter = (_plan(tiny, fraction) for fraction in (1e-2, 2e-4, 1e-4))
    assert roomy.micro_steps == 1 and roomy.baselines["ddp"] is not None
    assert not roomy.options["checkpointing"]  # not needed there: recomputing would only cost time
    assert tight.micro_steps > 1 and tight.baselines["ddp"] is None and tight.baselines["ddp_accum"].micro_steps > 1
    assert tighter.micro_steps > tight.micro_steps
    assert tighter.options["fsdp"] and tighter.options["checkpointing"]  # too tight for whole weights


def test_a_fixed_count_is_kept_and_a_count_the_batch_cannot_take_is_refused(tiny) -> None:
    plan = _plan(tiny, 1e-2, micro_steps=4)
    assert plan.micro_steps == 4 and plan.micro_batch == 8 and plan.batch == BATCH
    with pytest.raises(PaseError, match="--micro-steps 3: the global batch 32 must split into 3"):
        _plan(tiny, 1e-2, micro_steps=3)


def test_plan_files_keep_micro_steps_and_older_files_load_as_one(tiny, tmp_path) -> None:
    plan = _plan(tiny, 2e-4)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.micro_steps == plan.micro_steps > 1 and again.predicted == plan.predicted
    data = json.loads((tmp_path / "plan.json").read_text())
    del data["micro_steps"]
    for prediction in (data["predicted"], *filter(None, data["baselines"].values())):
        prediction.pop("micro_steps")
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = Plan.load(tmp_path / "old.json")
    assert old.micro_steps == 1 and old.micro_batch == BATCH
    data["micro_steps"] = 5
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PaseError, match="batch 32 is not a whole number of micro_steps"):
        Plan.load(tmp_path / "bad.json")


def test_the_cli_prints_the_micro_steps_and_the_baselines(tmp_path) -> None:
    result = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--cluster", "local", "--devices", "2",
                                      "--batch", "8", "--micro-steps", "2", "--profile", str(PROFILE)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "global batch 8 as 2 micro-steps of 4" in text
    assert all(name in text for name in BASELINES)
    bad = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--micro-steps", "two"])
    assert bad.exit_code != 0 and "--micro-steps 'two'" in str(bad.exception)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags", [["--only", "tensor"], ["--only", "dp"], ["--fsdp", "--checkpoint"]])
def test_two_processes_run_micro_steps_as_planned(tmp_path, flags) -> None:
    """Micro-steps with the gradient sync paused until the last (DDP's no_sync, a tensor plan's paused sync; FSDP2
    reduce-scatters each one): one step equals a single process's step on the whole batch, every layer runs as
    planned, and the collectives move the bytes the plan priced for the whole step."""
    path = tmp_path / "plan.json"
    made = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--cluster", "local", "--devices", "2", "--batch",
                                    "8", "--micro-steps", "2", *flags, "--profile", str(PROFILE), "--json", str(path)])
    assert made.exit_code == 0, made.output
    assert Plan.load(path).micro_steps == 2
    report = _verify(path)
    assert report["max_rel_error"] < 1e-5 and report["layers_as_planned"] == report["layers_total"]
    assert report["comm_bytes_measured"] == pytest.approx(report["comm_bytes_predicted"], rel=1e-3)


def test_where_memory_binds_the_search_checkpoints_some_blocks_and_not_others() -> None:
    """unet-tiny at one sample per device, with too little memory to keep every activation: the plan recomputes a
    selection of blocks (not all: recomputing every block, fsdp_accum_ckpt, is slower), records it per block, and
    fits."""
    from strategies.checkpointing import checkpointed_blocks

    graph = extract_model("unet-tiny", 2, use_cache=True)
    plan = _plan(graph, 1.2e-4)
    chosen = plan.options["checkpoint_blocks"]
    candidates = checkpointed_blocks(graph)
    assert plan.options["checkpointing"] and 0 < len(chosen) < len(candidates)
    assert [b.name for b in plan.blocks if b.checkpoint] == chosen and set(chosen) <= set(candidates)
    assert len(plan.blocks) == len({layer.block for layer in plan.layers})
    assert plan.predicted.memory_bytes_per_device <= parse_spec("2xH100-SXM").gpu.memory_bytes * 1.2e-4
    assert plan.predicted.step_seconds < plan.baselines["fsdp_accum_ckpt"].step_seconds
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.blocks == plan.blocks and again.options["checkpoint_blocks"] == chosen


@pytest.mark.slow  # 15 s; micro-steps + selective + ZeRO-2 on 2 processes stays in the default suite
@pytest.mark.timeout(300)
def test_two_processes_recompute_only_the_blocks_the_plan_selects(tmp_path) -> None:
    """A tensor plan that checkpoints every third block: one step matches a single process, and the forward
    collectives re-run in the backward are exactly those of the selected blocks (the bytes priced)."""
    from cost_models.local import target_cluster
    from strategies.checkpointing import checkpointed_blocks

    cluster, measured, precision = target_cluster("local", 2, PROFILE)
    graph = extract_model("unet-tiny", 8, use_cache=True)
    blocks = tuple(checkpointed_blocks(graph)[::3])
    options = PlanOptions(precision=precision, only="tensor", checkpointing=True, checkpoint_blocks=blocks)
    plan = make_plan(graph, cluster, profile=measured, options=options)[0]
    every = make_plan(graph, cluster, profile=measured, options=PlanOptions(precision=precision, only="tensor",
                                                                           checkpointing=True))[0]
    assert plan.predicted.comm_bytes_per_device < every.predicted.comm_bytes_per_device  # fewer blocks re-run
    plan.save(tmp_path / "plan.json")
    report = _verify(tmp_path / "plan.json")
    assert report["max_rel_error"] < 1e-5 and report["layers_as_planned"] == report["layers_total"]
    assert report["comm_bytes_measured"] == pytest.approx(report["comm_bytes_predicted"], rel=1e-3)


@pytest.mark.slow  # 7 s: two `pase plan` processes under different hash seeds
def test_the_same_command_selects_the_same_blocks_in_any_process(tmp_path) -> None:
    """Blocks that free memory at the same price rank in model order, not in the order string hashes give a set
    (which changes with PYTHONHASHSEED: the same `pase plan` once printed two different selections). The CLI
    prints the selection and the sharding per block."""
    cluster = tmp_path / "tiny-gpu.json"
    cluster.write_text(json.dumps({"gpu": {"id": "Tiny", "bf16_tflops": 10, "fp32_tflops": 5, "memory_gb": 0.010,
                                           "memory_bw_gbps": 100}, "gpus_per_node": 2}))
    chosen, printed = [], []
    for seed in ("1", "2"):
        out = tmp_path / f"plan{seed}.json"
        done = subprocess.run([sys.executable, "-m", "pase", "plan", "--model", "unet-tiny", "--cluster", str(cluster),
                               "--batch", "2", "--json", str(out)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONHASHSEED": seed, "COLUMNS": "200"}, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        chosen.append(Plan.load(out).options["checkpoint_blocks"])
        printed.append(next(line for line in done.stdout.splitlines() if "recompute" in line and "of" in line))
    assert chosen[0] and chosen[0] == chosen[1]
    assert f"recompute {len(chosen[0])} of" in printed[0] and chosen[0][0] in printed[0]
    assert "sharding" in printed[0]


def test_explain_a_block_prices_each_recompute_and_sharding_choice_around_the_plan(tmp_path) -> None:
    """`--explain BLOCK`: the plan's own choice reproduces the plan's step and memory; recomputing the block trades
    memory for time; sharding this block alone is a choice the runtime runs; a block
    the plan does not have is refused with the names it has."""
    from cost_models.rates import HardwareRates
    from pase.planning.explain import explain_block

    graph = extract_model("unet-tiny", 2, use_cache=True)
    cluster, options = parse_spec("2xH100-SXM"), PlanOptions(memory_fraction=1.2e-4, stack="graphed")
    plan, priced = make_plan(graph, cluster, options=options)
    rates = HardwareRates(cluster, None, options.precision)
    block = plan.options["checkpoint_blocks"][0]
    rows = explain_block(graph, plan, priced, cluster, rates, options, block)
    chosen = [row for row in rows if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["recompute"] and chosen[0]["runnable"]
    assert chosen[0]["step_seconds"] == pytest.approx(plan.predicted.step_seconds, rel=1e-9)
    kept = next(r for r in rows if not r["recompute"] and r["sharding"] == chosen[0]["sharding"])
    assert kept["block_memory_bytes"] > chosen[0]["block_memory_bytes"]  # recomputing frees this block's activations
    assert kept["step_seconds"] < chosen[0]["step_seconds"] and not kept["fits"]  # ... at a price the plan must pay
    assert all(row["runnable"] for row in rows)  # the runtime shards block by block
    assert {row["sharding"] for row in rows} == {"none", "gradients", "full"}
    with pytest.raises(PaseError, match="no block 'down_blocks.9'"):
        explain_block(graph, plan, priced, cluster, rates, options, "down_blocks.9")
    tiny_gpu = tmp_path / "tiny-gpu.json"  # the docs' made-up GPU: memory binds at the default memory fraction
    tiny_gpu.write_text(json.dumps({"gpu": {"id": "Tiny", "bf16_tflops": 10, "fp32_tflops": 5, "memory_gb": 0.010,
                                            "memory_bw_gbps": 100}, "gpus_per_node": 2}))
    shown = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--cluster", str(tiny_gpu), "--batch", "2",
                                     "--explain", "mid_block.attentions.0"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert "choices for block mid_block.attentions.0" in text and "chosen" in text


def test_zero2_gathers_once_and_holds_the_gathered_weights() -> None:
    """ZeRO-2 ("gradients": FSDP keeping the weights it gathered for the forward through the backward) against FSDP
    on the same splits: the backward's gather is gone, and each device holds its layers' whole weights in the
    compute precision on top of the sharded state."""
    from cost_models.rates import HardwareRates
    from pase.planning.per_layer import price_graph, search_cost_model

    graph = extract_model("unet-tiny", 8, use_cache=True)
    cluster = parse_spec("2xH100-SXM")
    rates = HardwareRates(cluster, None, "bf16")
    full_options = PlanOptions(fsdp=True, only="dp")
    zero2_options = PlanOptions(fsdp=True, reshard=False, only="dp")
    full = price_graph(graph, search_cost_model(cluster, rates, full_options), full_options)
    zero2 = price_graph(graph, search_cost_model(cluster, rates, zero2_options), zero2_options)
    v = full.ids.index("conv_in")
    params = graph["conv_in"]["param_count"]
    half = params * 2 / 2  # bf16 weights, sharded over 2 devices: one gather moves this much per device
    assert full.comm_bytes[v][0] - zero2.comm_bytes[v][0] == pytest.approx(half, rel=1e-6)
    assert zero2.memory[v][0] - full.memory[v][0] == pytest.approx(params * 2, rel=1e-6)


@pytest.mark.slow  # 12 s; micro-steps + selective + ZeRO-2 and FSDP per block on 2 processes stays in the default
@pytest.mark.timeout(300)  # suite (tests/test_block_sharding.py)
def test_two_processes_run_micro_steps_selective_checkpointing_and_zero2_as_planned(tmp_path) -> None:
    """The unet-tiny analogue of what issue 18 asks the planner to pick: 2 micro-steps, a third of the blocks
    recomputed, state sharded ZeRO-2-style. One step on 2 gloo processes equals a single process's step on the
    whole batch, every layer runs as planned, and the collectives move the bytes priced."""
    from cost_models.local import target_cluster
    from strategies.checkpointing import checkpointed_blocks

    cluster, measured, precision = target_cluster("local", 2, PROFILE)
    graph = extract_model("unet-tiny", 8, use_cache=True)
    blocks = tuple(checkpointed_blocks(graph)[::3])
    options = PlanOptions(precision=precision, only="dp", fsdp=True, reshard=False, checkpointing=True,
                          checkpoint_blocks=blocks)
    plan = make_plan(graph, cluster, profile=measured, options=options, micro_steps=2)[0]
    assert plan.micro_steps == 2 and plan.options["reshard"] is False
    assert {b.sharding for b in plan.blocks if not b.name.startswith("input:")} >= {"gradients"}
    assert [b.name for b in plan.blocks if b.checkpoint] == list(blocks)
    plan.save(tmp_path / "plan.json")
    report = _verify(tmp_path / "plan.json")
    assert report["max_rel_error"] < 1e-5 and report["layers_as_planned"] == report["layers_total"]
    assert report["comm_bytes_measured"] == pytest.approx(report["comm_bytes_predicted"], rel=1e-3)
