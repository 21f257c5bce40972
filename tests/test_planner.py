"""The planner's cost model (hand-computed cases), the memory limit, plan JSON and `pase plan`."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from cost_models.cluster import cluster_from_dict, parse_spec
from cost_models.layer_costs import GRADIENT_BUCKET_BYTES, CostModel, CostOptions
from cost_models.rates import HardwareRates
from pase.errors import PaseError
from pase.graph import extract, extract_model
from pase.planning.per_layer import PlanDoesNotFit, PlanOptions, PricedGraph, plan_graph, search_under_memory
from pase.planning.plan import Plan
from strategies.splits import SplitSpace, split_space


def one_layer(module: nn.Module, *shape: int):
    with torch.device("meta"):
        module = module
    graph = extract(module, (torch.zeros(*shape, device="meta"),))
    return next(data for _, data in graph.layers() if data["op"] != "input")


def model_for(spec: str, overlap: bool = False) -> CostModel:
    cluster = parse_spec(spec)
    return CostModel(cluster, HardwareRates(cluster), CostOptions(precision="fp32", overlap_gradients=overlap))


def test_batch_split_conv_costs_a_pth_of_compute_plus_its_gradient_all_reduce() -> None:
    with torch.device("meta"):
        conv = nn.Conv2d(256, 256, 3, padding=1)
    layer = one_layer(conv, 64, 256, 64, 64)
    model = model_for("8xH100-SXM")
    space = SplitSpace(("n",), np.array([[1], [8]]))
    parts: dict[str, np.ndarray] = {}
    compute, comm, _ = model.layer_costs(layer, space, parts=parts)
    # neither the launches nor AdamW over the (replicated) weights shrink with the batch; 4,096 and 512 tiles fill
    # 97% of their waves
    fixed = model.kernel_floor(layer) + parts["optimizer"]
    assert (fixed > 0).all() and parts["optimizer"][0] == parts["optimizer"][1]
    assert compute[1] - fixed[1] == pytest.approx((compute[0] - fixed[0]) / 8, rel=1e-3)
    assert comm[0] == 0.0
    weight_bytes = (256 * 256 * 9 + 256) * 4  # fp32 gradients of weight and bias, one bucketed all-reduce each
    # the algorithm NCCL would pick for a full bucket: on one node of H100s, NVLS over the NVSwitch
    rate = min(model.rates.collective_algorithms("all_reduce", list(range(8))),
               key=lambda r: r.seconds("all_reduce", GRADIENT_BUCKET_BYTES, 8))
    assert rate.algorithm == "nvls"
    expected = sum(rate.alpha_s * min(1.0, b / GRADIENT_BUCKET_BYTES) + b * 2 * 7 / 8 / (rate.busbw_gbps * 1e9)
                   for b in (256 * 256 * 9 * 4, 256 * 4))
    assert comm[1] == pytest.approx(expected)
    assert weight_bytes == 256 * 256 * 9 * 4 + 256 * 4


def test_gradient_all_reduce_hides_behind_the_layers_backward() -> None:
    """With overlap, only the part of the weight all-reduce longer than the backward compute is charged."""
    with torch.device("meta"):
        conv = nn.Conv2d(256, 256, 3, padding=1)
    space = SplitSpace(("n",), np.array([[8]]))
    for batch in (8, 512):  # comm-bound, then compute-bound
        layer = one_layer(conv, batch, 256, 64, 64)
        bare = model_for("8xH100-SXM")
        parts: dict[str, np.ndarray] = {}
        compute, sync, _ = bare.layer_costs(layer, space, parts=parts)
        _, exposed, _ = model_for("8xH100-SXM", overlap=True).layer_costs(layer, space)
        kernels = compute[0] - parts["optimizer"][0]  # the optimizer runs after the backward: it hides nothing
        backward = kernels * layer["flops_bwd"] / (layer["flops_fwd"] + layer["flops_bwd"])
        assert exposed[0] == pytest.approx(max(0.0, sync[0] - backward))
    assert exposed[0] == 0.0 and sync[0] > 0  # at batch 512 the backward hides the all-reduce entirely


def test_split_input_channel_linear_pays_the_reduce_of_its_output() -> None:
    with torch.device("meta"):
        linear = nn.Linear(1024, 512)
    layer = one_layer(linear, 8, 77, 1024)
    model = model_for("8xH100-SXM")
    space = SplitSpace(("c_in",), np.array([[1], [2]]))
    _, comm, memory = model.layer_costs(layer, space)
    ring = model.rates.collective("all_reduce", [0, 1])
    out_bytes = 8 * 77 * 512 * 4  # the whole output is a partial sum on each of the 2 devices
    assert comm[0] == 0.0
    assert comm[1] == pytest.approx(ring.alpha_s + out_bytes * 2 * 1 / 2 / (ring.busbw_gbps * 1e9))
    assert memory[1] < memory[0]  # the weight is sharded over c_in


def test_relayout_is_free_only_between_matching_layouts() -> None:
    graph = extract_model("unet-tiny", 8)
    model = model_for("4xL40S")
    src, dst, edge = next((s, d, e) for s, d, e in graph.graph.edges(data=True)
                          if graph[s]["op"] == "conv" and graph[d]["op"] == "group_norm")
    s_space, d_space = split_space(graph[src], 4), split_space(graph[dst], 4)
    costs = model.edge_costs(edge, graph[src], s_space, graph[dst], d_space)
    same = costs[s_space.index_of({"n": 4}), d_space.index_of({"n": 4})]
    different = costs[s_space.index_of({"n": 4}), d_space.index_of({"n": 2, "h": 2})]
    replicate_to_split = costs[s_space.index_of({}), d_space.index_of({"n": 4})]
    split_to_replicate = costs[s_space.index_of({"n": 4}), d_space.index_of({})]
    assert same == 0.0 and different > 0.0
    # forward is free from a replicated producer, but its backward gathers the whole gradient:
    # the same volume as gathering a split tensor into a replicated consumer
    assert replicate_to_split > 0.0 and replicate_to_split == pytest.approx(split_to_replicate)


@pytest.mark.parametrize("largest", [64, 2**40])  # packed int64 keys, and the row-sorting fallback
def test_distinct_rows_group_configurations_by_the_columns_that_matter(largest: int) -> None:
    from cost_models.layer_costs import _distinct_rows

    rng = np.random.default_rng(5)
    factors = rng.choice([1, 2, 4, largest], size=(200, 4))
    first, of = _distinct_rows(factors, [0, 2])
    picked = factors[:, [0, 2]]
    assert np.array_equal(picked[first][of], picked)  # each row maps to a representative equal on the columns
    assert len({tuple(row) for row in picked[first]}) == len(first) == len({tuple(row) for row in picked})
    first, of = _distinct_rows(factors, [])
    assert first.tolist() == [0] and not of.any()


def test_concat_inputs_cover_part_of_the_split_channel() -> None:
    graph = extract_model("sd15-unet", 2)
    model = model_for("4xL40S")
    checked = 0
    for src, dst, edge in graph.graph.edges(data=True):
        if graph[dst]["op"] != "concat" or graph[src]["op"] == "input":
            continue
        s_space, d_space = split_space(graph[src], 4), split_space(graph[dst], 4)
        channel = next((d for d in s_space.dims if graph[src]["roles"][d] in ("channel", "out_channel")), None)
        k_src = s_space.index_of({channel: 2}) if channel else None
        k_dst = d_space.index_of({"c": 2})
        if k_src is None or k_dst is None:
            continue
        assert edge["dst_shape"][1] < graph[dst]["dims"]["c"]  # this input is part of the concat's channels
        costs = model.edge_costs(edge, graph[src], s_space, graph[dst], d_space)
        assert costs[k_src, k_dst] > 0.0  # channel shards do not line up across a concat
        checked += 1
    assert checked


def test_norm_statistics_follow_what_is_normalised() -> None:
    graph = extract_model("sd15-unet", 2)
    model = model_for("8xH100-SXM")
    layer_norm = next(d for _, d in graph.layers() if d["op"] == "layer_norm")
    space = SplitSpace(("s",), np.array([[1], [8]]))
    _, comm, _ = model.layer_costs(layer_norm, space)
    # LayerNorm normalises each token over channels: a sequence split needs no statistics all-reduce
    # (which would cost at least one collective latency, ~10 us); only the scale/shift gradients
    # (2 x 320 values, summed over tokens) are reduced, in a shared gradient bucket
    assert 0.0 < comm[1] < 1e-6
    group_norm = next(d for _, d in graph.layers() if d["op"] == "group_norm" and d["dims"].get("h", 0) >= 32)
    _, comm, _ = model.layer_costs(group_norm, SplitSpace(("h",), np.array([[1], [2]])))
    assert comm[1] > 0.0  # GroupNorm reduces over height and width


@pytest.fixture(scope="module")
def tiny_plan():
    graph = extract_model("unet-tiny", 16)
    return graph, plan_graph(graph, parse_spec("4xL40S"))


def test_plan_is_never_worse_than_its_baselines(tiny_plan) -> None:
    """``plan_graph`` searches the options as given, whose space holds DDP; FSDP (which hides its collectives
    behind forward and backward) is a setting only the joint search tries (test_micro_steps holds that one)."""
    _, plan = tiny_plan
    assert plan.devices == 4 and len(plan.layers) == 104
    for name, baseline in plan.baselines.items():
        assert baseline is not None
        if name in ("ddp", "ddp_accum"):
            assert plan.predicted.step_seconds <= baseline.step_seconds * (1 + 1e-9)
    assert plan.predicted.samples_per_second == pytest.approx(16 / plan.predicted.step_seconds)
    assert plan.baselines["fsdp"].memory_bytes_per_device < plan.baselines["ddp"].memory_bytes_per_device


def test_plan_json_round_trip(tiny_plan, tmp_path) -> None:
    _, plan = tiny_plan
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["predicted"]["step_seconds"] > 0
    assert set(data["baselines"]) == {"ddp", "fsdp"}
    assert Plan.load(path) == plan


def test_baselines_are_priced_on_their_own_terms() -> None:
    graph = extract_model("unet-tiny", 16)
    fsdp_plan = plan_graph(graph, parse_spec("4xL40S"), options=PlanOptions(fsdp=True))
    ddp, fsdp = fsdp_plan.baselines["ddp"], fsdp_plan.baselines["fsdp"]
    assert ddp.memory_bytes_per_device > fsdp.memory_bytes_per_device  # --fsdp must not turn DDP into FSDP
    tensor_plan = plan_graph(graph, parse_spec("4xL40S"), options=PlanOptions(only="tensor"))
    assert tensor_plan.baselines["ddp"].compute_seconds == pytest.approx(ddp.compute_seconds)
    with pytest.raises(PaseError, match=r"batch \(6\) does not divide into 4 equal chunks"):
        plan_graph(extract_model("unet-tiny", 6), parse_spec("4xL40S"))  # the runtime needs equal batch chunks
    odd = plan_graph(extract_model("unet-tiny", 6), parse_spec("4xL40S"), options=PlanOptions(space="all"))
    assert odd.baselines["ddp"] is None and "does not divide" in odd.baseline_notes["ddp"]


def test_plan_files_ignore_unknown_keys_and_reject_broken_ones(tiny_plan, tmp_path) -> None:
    from pase.errors import PaseError

    _, plan = tiny_plan
    data = plan.to_dict()
    data["written_by_a_newer_pase"] = True
    assert Plan.from_dict(data) == plan
    del data["predicted"]["step_seconds"]
    with pytest.raises(PaseError, match="predicted: .step_seconds. is a required property"):
        Plan.from_dict(data)


def test_only_dp_splits_only_the_batch() -> None:
    graph = extract_model("unet-tiny", 16)
    plan = plan_graph(graph, parse_spec("4xL40S"), options=PlanOptions(only="dp"))
    for layer in plan.layers:
        assert set(layer.splits) <= {"n"}, layer


def test_a_plan_that_cannot_fit_says_what_would() -> None:
    graph = extract_model("unet-tiny", 16)
    tiny_gpu = cluster_from_dict({"gpu": {"id": "Tiny", "bf16_tflops": 10, "fp32_tflops": 5, "memory_gb": 0.01,
                                          "memory_bw_gbps": 100}, "gpus_per_node": 2})
    with pytest.raises(PlanDoesNotFit) as info:
        plan_graph(graph, tiny_gpu)
    message = str(info.value)
    assert "MiB per device" in message and "--checkpoint" in message and "--fsdp" in message
    assert info.value.least_bytes > info.value.limit_bytes > 0


def test_pase_plan_that_cannot_fit_points_to_pipeline_stages(tmp_path) -> None:
    from typer.testing import CliRunner

    from pase.cli import app

    system = tmp_path / "tiny.json"
    system.write_text(json.dumps({"gpu": {"id": "Tiny", "bf16_tflops": 10, "fp32_tflops": 5, "memory_gb": 0.01,
                                          "memory_bw_gbps": 100}, "gpus_per_node": 2}))
    result = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--cluster", str(system), "--batch", "16",
                                      "--micro-steps", "1", "--no-pipeline"])
    assert isinstance(result.exception, PlanDoesNotFit)
    message = str(result.exception)
    assert message.startswith("no plan fits") and "--fsdp" in message and "drop --no-pipeline" in message
    accumulating = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--cluster", str(system), "--batch", "16"])
    assert accumulating.exit_code == 0, accumulating.output  # by default, micro-steps make it fit
    assert "global batch 16 as" in " ".join(accumulating.output.split())


def test_memory_limit_is_enforced() -> None:
    graph = extract_model("unet-tiny", 64)
    roomy = cluster_from_dict({"gpu": {"id": "Roomy", "bf16_tflops": 10, "fp32_tflops": 5, "memory_gb": 80,
                                       "memory_bw_gbps": 100}, "gpus_per_node": 4})
    free = plan_graph(graph, roomy)
    limit_gb = free.predicted.memory_bytes_per_device * 0.8 / 0.9 / 1e9
    tight = cluster_from_dict({"gpu": {"id": "Tight", "bf16_tflops": 10, "fp32_tflops": 5, "memory_gb": limit_gb,
                                       "memory_bw_gbps": 100}, "gpus_per_node": 4})
    try:
        constrained = plan_graph(graph, tight)
    except PlanDoesNotFit:
        return  # nothing fits in 80%: the limit was enforced by refusing
    assert constrained.predicted.memory_bytes_per_device <= tight.gpu.memory_bytes * 0.9 + 1
    assert constrained.predicted.step_seconds >= free.predicted.step_seconds - 1e-12


def test_memory_priced_search_keeps_its_certificate() -> None:
    """Under a binding limit the plan fits, and its proved gap bounds it against the best plan that fits."""
    import itertools

    rng = np.random.default_rng(5)
    cluster = parse_spec("4xH100-SXM")
    checked = 0
    for _ in range(40):
        n, k = int(rng.integers(3, 6)), int(rng.integers(2, 4))
        memory = [rng.random(k) * 10 for _ in range(n)]
        compute = [rng.random(k) for _ in range(n)]
        edges = [(v - 1, v, rng.random((k, k)) * 0.3) for v in range(1, n)]
        priced = PricedGraph([f"v{v}" for v in range(n)], [SplitSpace(("batch",), np.arange(1, k + 1)[:, None])] * n,
                             compute, [np.zeros(k)] * n, memory, edges)

        def cost(assignment: tuple[int, ...], priced: PricedGraph = priced) -> float:
            c, m, r, _ = priced.totals(list(assignment))
            return c + m + r

        every = list(itertools.product(range(k), repeat=n))
        fastest = min(every, key=cost)
        limit = priced.totals(list(fastest))[3] * float(rng.uniform(0.6, 0.95))
        fits = [a for a in every if priced.totals(list(a))[3] <= limit]
        if not fits:
            continue
        best = min(cost(a) for a in fits)
        assignment, stats, _, _ = search_under_memory(priced, limit, cluster, PlanOptions(search_gap=0.0))
        assert priced.totals(assignment)[3] <= limit + 1e-9
        assert best - 1e-9 <= cost(tuple(assignment)) <= best * (1 + stats.proved_gap) + 1e-9
        checked += 1
    assert checked > 20


@pytest.mark.parametrize("restricted_calls", ["first", "after_first", "alternate"])
def test_the_certificate_holds_when_some_searches_leave_idle_configurations_out(
        monkeypatch: pytest.MonkeyPatch, restricted_calls: str) -> None:
    """A search over the restricted space bounds only that space's plans: mixed with full searches (its table budget
    crossed at some memory prices only), the proved gap must still hold against every plan that fits."""
    import itertools

    import pase.planning.per_layer as planner
    from pase.search.elimination import TableBudgetExceeded

    real_solve, calls = planner.solve, []

    def solve(graph, *args, **kwargs):  # the budgeted (full-space) call fails on the chosen searches
        if "max_table_entries" in kwargs:
            calls.append(len(calls))
            index = calls[-1]
            if {"first": index == 0, "after_first": index > 0, "alternate": index % 2 == 1}[restricted_calls]:
                raise TableBudgetExceeded("budget", 1e9)
        return real_solve(graph, *args, **kwargs)

    monkeypatch.setattr(planner, "solve", solve)
    rng = np.random.default_rng(11)
    cluster = parse_spec("4xH100-SXM")
    space = SplitSpace(("batch",), np.array([[1], [2], [4], [4]]))  # splitting 2 ways leaves 2 devices idle
    checked = noted = 0
    for _ in range(30):
        calls.clear()
        n = int(rng.integers(3, 6))
        priced = PricedGraph([f"v{v}" for v in range(n)], [space] * n, [rng.uniform(0, 10, 4) for _ in range(n)],
                             [rng.uniform(0, 3, 4) for _ in range(n)], [rng.uniform(1, 10, 4) for _ in range(n)],
                             [(v - 1, v, rng.uniform(0, 3, (4, 4))) for v in range(1, n)])
        every = [list(a) for a in itertools.product(range(4), repeat=n)]
        memory = np.array([priced.totals(a)[3] for a in every])
        cost = np.array([sum(priced.totals(a)[:3]) for a in every])
        limit = float(np.quantile(memory, rng.uniform(0.05, 0.6)))
        best = float(cost[memory <= limit].min())
        assignment, stats, price, note = search_under_memory(priced, limit, cluster, PlanOptions(search_gap=0.0))
        assert priced.totals(assignment)[3] <= limit
        if price == 0.0 and note:  # the unpriced search fitted: its certificate is over the space its note names
            continue
        if price != 0.0:  # priced searches ran, and one of them (at least) left configurations out
            assert note and ("idle" in note or "memory-minimal" in note)
            noted += 1
        got = sum(priced.totals(assignment)[:3])
        assert best - 1e-9 <= got <= best * (1 + stats.proved_gap) * (1 + 1e-6)
        checked += 1
    assert checked > 10 and noted > 5


def test_cli_plan(tmp_path) -> None:
    out = tmp_path / "plan.json"
    result = subprocess.run([sys.executable, "-m", "pase", "plan", "--model", "unet-tiny", "--cluster", "4xL40S",
                             "--batch", "16", "--json", str(out), "--explain", "conv_in"],
                            capture_output=True, text=True, timeout=180, env={"COLUMNS": "200", **_env()})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pase plan" in result.stdout and "ddp" in result.stdout and "alternatives for conv_in" in result.stdout
    assert Plan.load(out).cluster == "4xL40S"


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_python_api_plans_a_module_at_any_batch() -> None:
    import pase
    from pase.models.pase_unet import PaseUNet

    with torch.device("meta"):
        model = PaseUNet()
    x, t = torch.zeros(2, 3, 32, 32, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    plan = pase.plan(model, (x, t), cluster="4xL40S", batch=32, precision="fp32")
    assert plan.batch == 32 and plan.devices == 4 and plan.predicted.step_seconds > 0
    with pytest.raises(Exception, match="unknown plan option"):
        pase.plan(model, (x, t), cluster="4xL40S", warp_speed=True)


def test_python_plans_for_this_machine_as_the_cli_does(tmp_path) -> None:
    """`pase.plan(..., cluster="local", devices=2)` plans for 2 gloo processes priced by their calibration, in fp32,
    as `pase plan --cluster local --devices 2` does; devices with a cluster spec is an error."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import pase
    from pase.models.pase_unet import PaseUNet

    profile = Path(__file__).parent / "fixtures" / "calibration" / "cpu_gloo_2.json"
    with torch.device("meta"):
        model = PaseUNet()
    x, t = torch.zeros(8, 3, 32, 32, device="meta"), torch.zeros(8, dtype=torch.long, device="meta")
    plan = pase.plan(model, (x, t), cluster="local", devices=2, profile=profile)
    done = subprocess.run([sys.executable, "-m", "pase", "plan", "--model", "pase-unet", "--cluster", "local",
                           "--devices", "2", "--batch", "8", "--profile", str(profile), "--json",
                           str(tmp_path / "cli.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cli = json.loads((tmp_path / "cli.json").read_text())
    assert (plan.cluster, plan.devices, plan.precision) == (cli["cluster"], 2, "fp32") == \
        (cli["cluster"], cli["devices"], cli["precision"])
    assert [layer.splits for layer in plan.layers] == [layer["splits"] for layer in cli["layers"]]
    with pytest.raises(Exception, match="devices go with the local cluster"):
        pase.plan(model, (x, t), cluster="4xL40S", devices=2)


def test_a_plan_that_does_not_fit_suggests_only_options_not_already_on() -> None:
    from pase.planning.per_layer import fit_remedies

    assert "--fsdp" in fit_remedies(PlanOptions()) and "--checkpoint" in fit_remedies(PlanOptions())
    both = fit_remedies(PlanOptions(fsdp=True, checkpointing=True))
    assert "--fsdp" not in both and "--checkpoint" not in both and both.startswith("more devices")
    assert "--fsdp" not in fit_remedies(PlanOptions(only="fsdp"))


def test_a_plan_file_with_a_malformed_search_section_is_refused_in_one_line(tmp_path) -> None:
    from pase.errors import PaseError
    from pase.planning.plan import Plan

    plan = plan_graph(extract_model("unet-tiny", 8), parse_spec("2xH100-SXM"), options=PlanOptions(baselines=False))
    data = plan.to_dict()
    assert Plan.from_dict(json.loads(json.dumps(data))).search == plan.search
    for bad in (None, [], "x"):
        with pytest.raises(PaseError, match="plan file: search: .* is not of type .object."):
            Plan.from_dict({**data, "search": bad})


def test_the_cli_points_to_pipelines_when_no_per_layer_plan_fits() -> None:
    result = subprocess.run([sys.executable, "-m", "pase", "plan", "--model", "unet-tiny", "--cluster", "2xRTX4090",
                             "--batch", "100000", "--fsdp", "--checkpoint", "--micro-steps", "1", "--no-pipeline"],
                            capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "Try more devices or a smaller --batch." in message and "Or drop --no-pipeline" in message
