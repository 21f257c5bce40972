"""``pase sample-plan``: the cost model prices every sampler, and a time-parallel sampler is never
picked where it is predicted to lose."""
from __future__ import annotations

import json
import os

import pytest
import torch

from pase.errors import PaseError
from pase.sampling import Evaluator, build_core, srds
from pase.sampling.denoiser import GaussianDenoiser
from pase.sampling.planner import (
    PARADIGMS_ADVANCE,
    Convergence,
    EvalTime,
    GatherTime,
    Pricing,
    plan_sampling,
    predict_paradigms,
    predict_srds,
    roofline_eval_time,
)


def pricing(seconds_at: dict[int, float], gather_alpha: float = 1e-5) -> Pricing:
    batches = sorted(seconds_at)
    return Pricing(EvalTime(batches, [seconds_at[b] for b in batches], "test"),
                   GatherTime(gather_alpha, 100.0, "test"), Convergence(), elems=3 * 32 * 32, memory_gbps=1000.0)


def test_compute_bound_device_keeps_sequential():
    """Time linear in the batch on one device: a window costs its length, so extra evaluations only lose."""
    plan = plan_sampling("m", "ddpm", 100, 1, 1, pricing({1: 0.01, 256: 2.56}))
    assert plan.chosen.sampler == "sequential"
    sequential = next(c for c in plan.candidates if c.sampler == "sequential")
    assert all(c.seconds > sequential.seconds for c in plan.candidates if c is not sequential)


def test_idle_devices_and_flat_eval_time_pick_a_parallel_sampler():
    flat = pricing({1: 0.01, 256: 0.011})
    plan = plan_sampling("m", "ddim", 100, 8, 1, flat)
    sequential = next(c for c in plan.candidates if c.sampler == "sequential")
    assert plan.chosen.sampler in ("paradigms", "srds", "srds-pipelined")
    assert plan.chosen.seconds * (1 + plan.margin) <= sequential.seconds
    assert plan.chosen.seconds == min(c.seconds for c in plan.candidates)


def test_margin_blocks_a_marginal_win_and_throughput_prefers_batch():
    flat = pricing({1: 0.01, 256: 0.011})
    plan = plan_sampling("m", "ddim", 100, 8, 1, flat, margin=100.0)
    assert plan.chosen.sampler in ("sequential", "batch")
    busy = plan_sampling("m", "ddpm", 50, 4, 16, pricing({1: 0.01, 256: 2.56}), objective="throughput")
    assert busy.chosen.sampler == "batch"


@pytest.mark.parametrize("pipelined", [False, True])
def test_srds_prediction_counts_the_passes_the_sampler_runs(pipelined):
    core = build_core("ddim", 24, clip_sample=False)
    x_t, noise = core.initial_and_noise((1, 2, 4, 4), 0)
    result = srds(core, Evaluator(GaussianDenoiser(core.alphas_cumprod, torch.zeros(2, 4, 4))), x_t, noise,
                  blocks=6, tol=1e-3, pipelined=pipelined)
    predicted = predict_srds(pricing({1: 0.01, 64: 0.64}), core.steps, 1, 2, 6, pipelined, result.iterations)
    assert (predicted.passes, predicted.evals) == (result.passes, result.evals)


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize(("steps", "blocks"), [(12, 3), (24, 6), (30, 5), (40, 8)])
def test_srds_pass_counter_matches_the_schedule_on_tensors(steps, blocks, pipelined):
    """The tensor-free counter that prices SRDS runs the schedule's own rules: every stopping iteration gives the
    same rows per pass as the schedule on (zero) tensors, speculative pipelined solves included."""
    from pase.sampling.srds import SrdsPassCounter, SrdsSchedule

    core = build_core("ddpm", steps, clip_sample=False)
    for iterations in range(1, blocks + 1):
        schedule = SrdsSchedule(core, blocks, blocks, -1.0, pipelined, torch.zeros(1, 1), torch.zeros(steps, 1, 1),
                                None, stop_after=iterations)
        evaluator = Evaluator(lambda x, t: torch.zeros_like(x), split=False)
        while schedule.result is None:
            schedule.tick(evaluator)
        counted = SrdsPassCounter(steps, blocks, iterations, pipelined).rows_per_pass()
        assert counted == evaluator.stats.rows_per_pass, (iterations, counted)


@pytest.fixture(scope="module")
def graph_cache(tmp_path_factory):
    """A private graph cache, shared by the tests that capture unet-tiny."""
    previous = os.environ.get("PASE_CACHE_DIR")
    os.environ["PASE_CACHE_DIR"] = str(tmp_path_factory.mktemp("graphs"))
    yield
    if previous is None:
        del os.environ["PASE_CACHE_DIR"]
    else:
        os.environ["PASE_CACHE_DIR"] = previous


def test_roofline_prices_a_gpu_cluster_from_the_layer_graph(graph_cache):
    from cost_models.cluster import load_cluster
    from cost_models.rates import HardwareRates
    from pase.graph import extract_model

    graph = extract_model("unet-tiny", 1, use_cache=True)
    a100_rates = HardwareRates(load_cluster("8xA100-80GB-SXM"))
    a100 = roofline_eval_time(graph, a100_rates, stack="graphed")
    h100 = roofline_eval_time(graph, HardwareRates(load_cluster("8xH100-SXM")), stack="graphed")
    assert all(b >= a for a, b in zip(a100.seconds, a100.seconds[1:]))  # more rows never cost less
    assert a100(256) > 2 * a100(1)  # large batches are compute/memory bound, not launch bound
    assert h100(256) < a100(256)
    # an eager sampler dispatches every operator from the host: never faster than graphed, and at batch 1 this
    # small UNet takes at least its operators' dispatch time
    eager = roofline_eval_time(graph, a100_rates)
    assert all(e >= g for e, g in zip(eager.seconds, a100.seconds))
    operators = sum(1 + len(data.get("fused_ops", ())) for _, data in graph.layers()
                    if data["op"] not in ("input", "output"))
    host = operators * a100_rates.cluster.gpu.host_us_per_op * 1e-6
    assert eager(1) >= host * (1 - 1e-9) and host > a100(1)
    assert "host per operator" in eager.source


def test_cli_sample_plan_json_and_bad_devices(graph_cache):
    from typer.testing import CliRunner

    from pase.cli import app

    args = ["sample-plan", "--model", "unet-tiny", "--cluster", "8xA100-80GB-SXM", "--steps", "50",
            "--scheduler", "ddim"]
    done = CliRunner().invoke(app, [*args, "--json"])
    assert done.exit_code == 0, done.output
    plan = json.loads(done.stdout)
    sequential = next(c for c in plan["candidates"] if c["sampler"] == "sequential")
    assert plan["devices"] == 8 and plan["chosen"]["seconds"] <= sequential["seconds"]
    assert {"eval time", "gather", "convergence"} <= set(plan["sources"])
    bad = CliRunner().invoke(app, [*args, "--devices", "16"])
    assert isinstance(bad.exception, PaseError) and "--devices 16 exceeds the 8 GPUs" in str(bad.exception)


def test_measured_convergence_never_advances_more_than_the_window():
    """A probe at windows 4/16/64 must not let window 2 (or an interpolated 8) accept more steps per pass than it
    evaluates: window 2 then looked as fast as window 4 at half the evaluations."""
    measured = Convergence({4: 25, 16: 7, 64: 2})
    assert measured.advance(2, 100) <= 2 and measured.advance(8, 100) <= 8 and measured.advance(32, 100) <= 32
    p = pricing({1: 0.01, 256: 0.011})
    p.convergence = measured
    two = next(c for c in plan_sampling("m", "ddim", 100, 8, 1, p).candidates if c.window == 2)
    assert two.passes >= 50 and two.evals == 100


@pytest.mark.slow
def test_measured_eval_time_is_per_network_row_under_guidance(monkeypatch):
    """``Pricing`` doubles the rows under classifier-free guidance, so the CPU probe must time network rows;
    timing a guided denoiser (which doubles again inside) counted every CFG call twice."""
    from torch import nn

    from pase.cli.sample import build_pricing
    from pase.sampling import planner
    from pase.sampling.denoiser import UNetDenoiser

    class Cond(nn.Module):
        def forward(self, x, t, encoder_hidden_states):  # noqa: ANN001, ANN201
            return x * encoder_hidden_states.mean()

    seen: list[int] = []

    def build(name, seed, guidance_scale=1.0, device="cpu"):  # noqa: ANN001, ANN202
        model = Cond()
        model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
        return UNetDenoiser(model, torch.ones(1, 2, 3), guidance_scale), (3, 4, 4)

    monkeypatch.setattr(planner, "build_denoiser", build)
    pricing_, _, _ = build_pricing("sd15-unet", 2, None, 10, "ddim", 4, 7.5, False, None, None, "bf16")
    assert pricing_.evals_per_row == 2
    assert sorted(set(seen)) == list(pricing_.eval_time.batches)


@pytest.mark.parametrize("devices", [0, -1])
def test_cli_sample_plan_rejects_non_positive_devices(devices):
    """``--devices 0`` used to fall back silently to the default (2, or the whole cluster)."""
    from typer.testing import CliRunner

    from pase.cli import app

    done = CliRunner().invoke(app, ["sample-plan", "--model", "unet-tiny", "--cluster", "8xA100-80GB-SXM",
                                    "--steps", "10", "--devices", str(devices)])
    assert isinstance(done.exception, PaseError) and f"--devices must be >= 1, not {devices}" in str(done.exception)


def test_convergence_outside_the_measured_windows_follows_the_laws_shape():
    """Window 1 is sequential (advance exactly 1). A window outside the measured ones takes the default law's
    shape, 1 + a (w - 1)^b, through the nearest measured window: one measurement at window 80 must not let window
    16 accept nearly every step (interpolating in log(window) from window 1 did, and sample-plan then priced
    ParaDiGMS at 9.5x on 8 GPUs from the paper's own 44 passes). Between measured windows it interpolates."""
    b = PARADIGMS_ADVANCE[1]
    probed = Convergence({4: 60})  # 100 / 60 = 1.67 steps per pass at window 4
    assert 1.0 < probed.advance(2, 100) < 100 / 60
    assert probed.advance(2, 100) == pytest.approx(1 + (100 / 60 - 1) * (1 / 3) ** b)
    assert probed.advance(1, 100) == 1.0
    published = Convergence({80: 44})  # ParaDiGMS' SD-v2 DDPM-1000: 44 passes at window 80
    assert published.advance(16, 1000) == pytest.approx(1 + (1000 / 44 - 1) * (15 / 79) ** b)
    assert published.advance(16, 1000) < 7  # was 14.7 by interpolation from window 1
    assert published.advance(160, 1000) == pytest.approx(1 + (1000 / 44 - 1) * (159 / 79) ** b)
    two = Convergence({4: 60, 16: 20})
    assert two.advance(8, 100) == pytest.approx((100 / 60 + 100 / 20) / 2)  # half way in log(window)
    stated = Convergence()  # (the default law)
    assert stated.advance(1, 100) == 1.0 and stated.advance(2, 100) == pytest.approx(1.316, abs=0.01)
    assert all(stated.advance(w, 100) <= 1.1 * w ** 0.5 for w in (2, 4, 16, 64))


@pytest.mark.parametrize(("args", "needle"), [
    (["sample", "--size", "0"], "--size must be >= 1"),
    (["sample", "--size", "9"], "multiple of 2"),
    (["sample", "--threads", "0"], "--threads must be >= 1"),
    (["sample-plan", "--samples", "0"], "--samples must be >= 1"),
    (["sample-plan", "--margin", "-5"], "--margin must be >= 0"),
    (["sample-plan", "--precision", "banana", "--cluster", "8xA100-80GB-SXM"], "unknown --precision 'banana'"),
    (["sample-plan", "--size", "0"], "--size must be >= 1"),
    (["sample", "--size", "100000"], "--size must be <= 4096"),
    (["sample-plan", "--devices", "1000000"], "without --cluster the devices are processes on this machine"),
])
def test_sampling_commands_name_bad_input(args, needle):
    from typer.testing import CliRunner

    from pase.cli import app

    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, PaseError) and needle in str(result.exception)


def test_sample_out_must_be_a_file_and_gets_a_normal_mode(tmp_path):
    from typer.testing import CliRunner

    from pase.cli import app

    refused = CliRunner().invoke(app, ["sample", "--steps", "2", "--size", "8", "--out", str(tmp_path)])
    assert isinstance(refused.exception, PaseError) and "is a folder" in str(refused.exception)
    out = tmp_path / "x.safetensors"
    done = CliRunner().invoke(app, ["sample", "--sampler", "sequential", "--steps", "2", "--size", "8", "--out",
                                    str(out), "--json"])
    assert done.exit_code == 0, done.output
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600


def test_size_rule_follows_the_model():
    """UNet2DModels and pase-unet need a multiple of their downsampling; diffusers' conditional UNet passes each
    skip's size to its upsamplers and runs at any size."""
    from pase.sampling.runner import check_size

    check_size("sd15-unet", 60)
    check_size("unet-tiny", 8)
    with pytest.raises(PaseError, match="multiple of 8"):
        check_size("ddpm-cifar10", 12)


@pytest.mark.parametrize(("seconds_at", "skips"), [({1: 0.01, 256: 0.011}, True), ({1: 0.01, 256: 2.56}, False)])
def test_srds_settings_left_out_by_their_lower_bound_could_not_have_won(seconds_at, skips):
    """The planner dry-runs SRDS block counts near sqrt(N) first and skips those whose lower bound is no better
    than a count already priced: the best of each schedule is the one pricing every count would find."""
    from strategies.parallel_sampling import block_candidates

    p = pricing(seconds_at)
    plan = plan_sampling("m", "ddpm", 120, 8, 1, p)
    for sampler in ("srds", "srds-pipelined"):
        every = [predict_srds(p, 120, 1, 8, b, sampler == "srds-pipelined", p.convergence.iterations(b, "ddpm"))
                 for b in block_candidates(120)]
        priced = [c for c in plan.candidates if c.sampler == sampler]
        assert min(c.seconds for c in priced) == min(c.seconds for c in every)
    if skips:  # (a flat evaluation time makes few-block settings cheap to rule out)
        assert "not dry-run" in plan.sources["srds search"]


def test_sample_plan_prices_the_convergence_a_user_measured():
    """``--passes WINDOW=PASSES`` / ``--srds-iterations BLOCKS=ITERATIONS`` replace the default law in the
    plan (its sources say so), and an impossible pair is refused in one line."""
    from typer.testing import CliRunner

    from pase.cli import app

    base = ["sample-plan", "--model", "unet-tiny", "--cluster", "8xA100-80GB-SXM", "--steps", "100", "--json"]
    default = json.loads(CliRunner().invoke(app, base).stdout)
    given = json.loads(CliRunner().invoke(app, [*base, "--passes", "16=10", "--srds-iterations", "10=1"]).stdout)
    assert given["sources"]["convergence"].startswith("given") and "window 16: 10 passes" in \
        given["sources"]["convergence"]
    window16 = next(c for c in given["candidates"] if c["sampler"] == "paradigms" and c["window"] == 16)
    assert window16["passes"] == 10  # exactly the measured count at the measured window
    srds10 = next(c for c in given["candidates"] if c["sampler"] == "srds" and c["blocks"] == 10)
    assert "1 iterations" in srds10["setting"]
    assert min(c["seconds"] for c in given["candidates"]) < min(c["seconds"] for c in default["candidates"])
    for args, needle in ((["--passes", "16"], "WINDOW=PASSES"), (["--passes", "16=5"], "between 7 and 100"),
                         (["--srds-iterations", "4=5"], "at most 4 iterations"),
                         (["--passes", "16=10", "--probe"], "leave it out"),
                         (["--passes", "\u00b2=10"], "two whole numbers"),
                         (["--passes", "16=10", "--passes", "16=12"], "16 twice"),
                         (["--srds-iterations", "7=1"], "a divisor of 100")):
        done = CliRunner().invoke(app, [*base, *args])
        assert isinstance(done.exception, PaseError) and needle in str(done.exception), (args, done.output)


@pytest.mark.parametrize("steps", [100, 1000, 999])
def test_paradigms_takes_exactly_the_passes_given_at_every_count(steps):
    """A measured count at a window is the count priced, for every feasible count: the window's start is computed
    afresh each pass (a float advance summed pass by pass drifted one pass over, e.g. 12 -> 13 at 100 steps)."""
    for window in (16, 80):
        for count in range(-(-steps // window), steps + 1, 7 if steps > 100 else 1):
            p = pricing({1: 0.01, 256: 0.02})
            p.convergence = Convergence({window: count}, {}, "given")
            assert predict_paradigms(p, steps, 1, 8, window).passes == count, (window, count)


def test_data_parallel_call_by_hand():
    """torch.nn.DataParallel's pass: replicate the tree per replica, broadcast the weights, a forward per chunk whose
    host time is paid once per replica, the outputs gathered; a window of at most 3 steps runs the bare network on
    one GPU (the ParaDiGMS code's rule). Chunks follow Tensor.chunk: a batch of 10 over 8 GPUs is 5 chunks of 2."""
    from pase.sampling.planner import DataParallelCall

    evals = {n: EvalTime([1, 100], [n * 0.001, n * 0.001 + 0.099], "test") for n in range(1, 9)}  # n ms + 1 ms/row
    link = GatherTime(1e-5, 100.0, "test")
    call = DataParallelCall(evals, modules=700, replicate_s=16e-6, weight_bytes=1e9, link=link)
    gather = GatherTime(2e-5, 50.0, "test")
    row_bytes = 4 * 96 * 96 * 4
    # 5 state rows under guidance = 10 network rows over 8 GPUs: chunks of 2, 5 replicas
    expected = (5 * 700 * 16e-6 + 1e-5 + 1e9 / 100e9 + evals[5](2) + gather(5 * row_bytes, 5))
    assert call.seconds(5, 2, 8, gather, row_bytes) == pytest.approx(expected)
    # 80 rows under guidance: 160 over 8 GPUs, chunks of 20 on all 8
    expected = 8 * 700 * 16e-6 + 1e-5 + 0.01 + evals[8](20) + gather(80 * row_bytes, 8)
    assert call.seconds(80, 2, 8, gather, row_bytes) == pytest.approx(expected)
    assert call.seconds(3, 2, 8, gather, row_bytes) == evals[1](6)  # the bare network, no replication
    assert call.seconds(40, 2, 1, gather, row_bytes) == evals[1](80)


def test_threads_under_one_lock_pay_the_host_once_per_replica(graph_cache):
    """A host-bound forward dispatched by n threads under one interpreter lock takes n times as long; a GPU-bound
    one hardly moves. ``data_parallel_call`` counts the model's modules and its weights at the precision."""
    from cost_models.cluster import load_cluster
    from cost_models.rates import HardwareRates
    from pase.graph import extract_model
    from pase.models.zoo import resolve_model
    from pase.sampling.planner import data_parallel_call

    graph = extract_model("unet-tiny", 1, use_cache=True)
    rates = HardwareRates(load_cluster("8xA100-80GB-SXM"), None, "fp16")
    one, four = (roofline_eval_time(graph, rates, "fp16", host_threads=n) for n in (1, 4))
    graphed = roofline_eval_time(graph, rates, "fp16", stack="graphed")
    assert graphed(1) < one(1) / 4  # this small UNet at batch 1 is host-bound
    assert four(1) == pytest.approx(4 * one(1), rel=0.05) and "4 threads" in four.source
    call = data_parallel_call("unet-tiny", graph, rates, "fp16", 8)
    with torch.device("meta"):
        model = resolve_model("unet-tiny").build()
    assert call.modules == len(list(model.modules()))
    assert call.weight_bytes == pytest.approx(2 * sum(p.numel() for p in model.parameters()), rel=1e-6)
    assert set(call.eval_by_replicas) == set(range(1, 9)) and call.replicate_s > 0


def test_data_parallel_pricing_needs_gpus():
    """torch.nn.DataParallel runs on GPUs: asking to price it on this machine's processes is refused in one line."""
    from pase.cli.sample import build_pricing

    with pytest.raises(PaseError, match="DataParallel runs on GPUs"):
        build_pricing("unet-tiny", 2, None, 10, "ddim", None, 1.0, False, None, None, "fp32", data_parallel=True)


def test_sample_plan_lays_out_a_run_given_with_its_evaluations():
    """``--evaluations WINDOW=EVALUATIONS`` with ``--passes``: the window is priced with both counts (evenly
    spaced passes would evaluate far more); evaluations without passes, or counts no run can take, are refused."""
    from typer.testing import CliRunner

    from pase.cli import app

    base = ["sample-plan", "--model", "unet-tiny", "--cluster", "8xA100-80GB-SXM", "--steps", "1000", "--json",
            "--passes", "80=44"]
    given = json.loads(CliRunner().invoke(app, [*base, "--evaluations", "80=2040"]).stdout)
    window80 = next(c for c in given["candidates"] if c["sampler"] == "paradigms" and c["window"] == 80)
    assert window80["passes"] == 44 and window80["evals"] == 2040
    assert "2040 evaluations" in given["sources"]["convergence"]
    uniform = json.loads(CliRunner().invoke(app, base).stdout)
    assert next(c for c in uniform["candidates"] if c.get("window") == 80)["evals"] > 3000
    for args, needle in ((["--evaluations", "40=900"], "give the run's passes too"),
                         (["--evaluations", "80=4000"], "no ParaDiGMS run")):
        done = CliRunner().invoke(app, [*base, *args])
        assert isinstance(done.exception, PaseError) and needle in str(done.exception), (args, done.output)


def test_probe_records_each_windows_evaluations():
    """The probe keeps what each window's run evaluated, so its windows are laid out from both counts."""
    from pase.sampling.planner import probe_convergence

    probed = probe_convergence("unet-tiny", "ddpm", 20, [2, 4], [2], 0.1, 0.01)
    assert set(probed.paradigms_evaluations) == {2, 4}
    for window in (2, 4):
        rows = probed.paradigms_rows(window, 20)
        assert len(rows) == probed.paradigms_passes[window] and sum(rows) == probed.paradigms_evaluations[window]
