"""Two-rank runtime cases, run in spawned gloo workers by tests/test_runtime*.py.

Each case builds unet-tiny with seeded weights, a hand-set plan (which layer splits what), runs one
forward + backward of the DDPM epsilon loss on a seeded global batch under ``pase.distributed``,
and compares the loss and every gradient with the single-process model on the same global batch.
"""
from __future__ import annotations

import copy
import json
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

GLOBAL_BATCH = 8


def run_ranks(case_names: list[str], world: int = 2, timeout_s: float = 120.0) -> dict[str, Any]:
    """Spawn ``world`` ranks that run ``case_names``; rank results as {rank: {case: result}}."""
    import tempfile

    from pase.process_group import free_port, spawn

    with tempfile.TemporaryDirectory(prefix="pase-runtime-test-") as tmp:
        spawn(_worker, (world, free_port(), case_names, tmp), world, timeout_s)
        return {rank: json.loads((Path(tmp) / f"{rank}.json").read_text()) for rank in range(world)}


def verify_on_two_processes(plan: Path, steps: int = 3) -> dict[str, Any]:
    """`pase verify --check --json` of ``plan`` under torchrun on 2 gloo processes: its report."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "pase", "verify", "--plan",
                           str(plan), "--steps", str(steps), "--check", "--json"], capture_output=True, text=True,
                          timeout=240, env=env, cwd=repo)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def build_model() -> torch.nn.Module:
    from pase.models.zoo import ZOO

    torch.manual_seed(0)
    return ZOO["unet-tiny"].build()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    t = torch.randint(0, 1000, (GLOBAL_BATCH,), generator=generator)
    noise = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    return x, t, noise


def epsilon_loss(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    out = model(x + noise, t)
    return F.mse_loss(getattr(out, "sample", out), noise)


def hand_plan(graph: Any, devices: int, choose: Any, fsdp: bool = False, checkpointing: bool = False) -> Any:
    """A plan for ``graph`` whose per-layer splits come from ``choose(layer_id, data) -> splits``."""
    from pase.planning.plan import LayerChoice, Plan, Prediction

    layers = [LayerChoice(layer_id, data["op"], data["block"], choose(layer_id, data), 0.0, 0.0)
              for layer_id, data in graph.layers()]
    return Plan(model="unet-tiny", model_fingerprint=graph.fingerprint(), cluster=f"local:{devices}",
                devices=devices, batch=graph.batch, precision="fp32",
                options={"fsdp": fsdp, "checkpointing": checkpointing}, layers=layers,
                predicted=Prediction(1.0, 1.0, 1.0))


def _batch_only(layer_id: str, data: dict) -> dict:
    return {d: 2 for d, role in data["roles"].items() if role == "batch"}


def _channels(layer_id: str, data: dict) -> dict:
    """Alternate out- and in-channel splits over the convs and linears (every other one), batch elsewhere."""
    if data["op"] in ("conv", "linear"):
        index = data["index"]
        role = "out_channel" if index % 4 == 0 else "reduction" if index % 4 == 2 else None
        dims = [d for d, r in data["roles"].items() if r == role]
        if dims and data["dims"][dims[0]] % 2 == 0:
            return {dims[0]: 2}
    return _batch_only(layer_id, data)


def _grid(layer_id: str, data: dict) -> dict:
    """Every conv and linear with 64+ input and output channels on a 2 x 2 grid (output x input channels, 4
    ranks), batch elsewhere."""
    if data["op"] in ("conv", "linear"):
        dims = {r: d for d, r in data["roles"].items() if r in ("out_channel", "reduction")}
        if len(dims) == 2 and all(data["dims"][d] >= 64 for d in dims.values()):
            return {dims["out_channel"]: 2, dims["reduction"]: 2}
    return {d: 4 for d, role in data["roles"].items() if role == "batch"}


def _spatial(layer_id: str, data: dict) -> dict:
    """Every convolution and group norm the search may split by rows (16+ per rank) split 2 ways along height
    (width for every other one; the attention's norm along its flattened positions), batch elsewhere."""
    from strategies.runnable import NotRunnable, layer_run
    from strategies.splits import MIN_CHUNK

    spatial = [d for d, role in data["roles"].items() if role == "spatial"]
    if data["op"] in ("conv", "group_norm") and spatial and data["dims"][spatial[0]] >= 2 * MIN_CHUNK["spatial"]:
        splits = {spatial[data["index"] % len(spatial)]: 2}
        try:
            layer_run(data, splits, 2)
            return splits
        except NotRunnable:
            pass
    return _batch_only(layer_id, data)


def replicas(world: int) -> Any:
    """A chooser running every replicable layer (a whole Conv2d, Linear or GroupNorm, or an SDPA attention) on
    replica groups: its batch split over 1, 2, ... ranks in turn (fewer than ``world``), the rest on all ranks."""
    from strategies.runnable import NotRunnable, layer_run

    ways = [b for b in (1, 2, 4) if b < world and world % b == 0]

    def choose(layer_id: str, data: dict) -> dict:
        batch = [d for d, role in data["roles"].items() if role == "batch"]
        if batch:
            splits = {batch[0]: ways[data["index"] % len(ways)]}
            try:
                if layer_run(data, splits, world).kind == "replicated":
                    return splits
            except NotRunnable:
                pass
        return {d: world for d in batch}
    return choose


def _out_spatial(layer_id: str, data: dict) -> dict:
    """Every convolution the runtime can split by output channels and rows at once, split 2 x 2 on 4 ranks (by
    height, or by width for every other one), batch elsewhere."""
    from strategies.runnable import NotRunnable, layer_run

    roles = {role: d for d, role in data["roles"].items()}
    spatial = [d for d, role in data["roles"].items() if role == "spatial"]
    if data["op"] == "conv" and spatial and data["dims"][roles["out_channel"]] % 2 == 0:
        splits = {roles["out_channel"]: 2, spatial[data["index"] % len(spatial)]: 2}
        try:
            if layer_run(data, splits, 4).kind == "outspatial":
                return splits
        except NotRunnable:
            pass
    return {d: 4 for d, role in data["roles"].items() if role == "batch"}


def _replica_out(layer_id: str, data: dict) -> dict:
    """Every conv and linear with an even number of output channels split 2 ways by them with the batch unsplit on 4
    ranks (2 replicas per output part), batch elsewhere."""
    from strategies.runnable import NotRunnable, layer_run

    roles = {role: d for d, role in data["roles"].items()}
    if data["op"] in ("conv", "linear") and "out_channel" in roles and data["dims"][roles["out_channel"]] % 2 == 0:
        splits = {roles["out_channel"]: 2}
        try:
            if layer_run(data, splits, 4).replicas == 2:
                return splits
        except NotRunnable:
            pass
    return {d: 4 for d, role in data["roles"].items() if role == "batch"}


def _norm_channels(layer_id: str, data: dict) -> dict:
    """Channel splits of group norms: splits the runtime has no layout for (it must refuse them)."""
    if data["op"] == "group_norm":
        return {d: 2 for d, r in data["roles"].items() if r == "channel"}
    return _batch_only(layer_id, data)


def _heads(layer_id: str, data: dict) -> dict:
    if data["op"] == "attention":
        return {"heads": 2}
    return _batch_only(layer_id, data)


def _sequence(layer_id: str, data: dict) -> dict:
    """Every attention split by its query sequence (keys and values gathered), batch elsewhere."""
    if data["op"] == "attention":
        return {"q": 2}
    return _batch_only(layer_id, data)


KEPT_CHAIN = {".conv1": "out_channel", ".time_emb_proj": "out_channel", "/elementwise": "channel",
              ".norm2": "channel", ".conv2": "reduction"}  # a ResNet block's Megatron pair, by layer id suffix


def kept_chain(layer_id: str, data: dict, devices: int, t: int) -> dict | None:
    """``layer_id``'s splits in its ResNet block's kept chain (conv1 out, the time-embedding add and norm2
    channel-split, conv2 in, all ``t`` ways), for blocks of 32 ``t`` channels or more (the default space's
    minimum chunk); None outside such a chain."""
    if ".resnets." not in layer_id:
        return None
    role = next((r for suffix, r in KEPT_CHAIN.items() if layer_id.endswith(suffix)), None)
    dim = next((d for d, r in data["roles"].items() if r == role), None)
    if dim is None or data["dims"][dim] < 32 * t:
        return None
    return {"n": devices // t, dim: t}


KEPT_ATTENTION = {".to_q": "out_channel", ".to_k": "out_channel", ".to_v": "out_channel", "/attention": "head",
                  ".to_out.0": "reduction"}  # an attention's pair: projections out-split, heads, to_out in-split


def kept_attention(layer_id: str, data: dict, devices: int, t: int) -> dict | None:
    """``layer_id``'s splits in its attention's kept chain (q, k, v head-split from their projections to
    ``to_out``), all ``t`` ways; None outside one."""
    role = next((r for suffix, r in KEPT_ATTENTION.items() if layer_id.endswith(suffix)), None)
    dim = next((d for d, r in data["roles"].items() if r == role), None)
    if dim is None or data["dims"][dim] < (1 if role == "head" else 32) * t:
        return None
    return {"n": devices // t, dim: t}


def _kept(layer_id: str, data: dict) -> dict:
    """Every ResNet block of 64+ channels and every attention as a kept Megatron pair over 2 ranks, batch
    elsewhere."""
    return kept_chain(layer_id, data, 2, 2) or kept_attention(layer_id, data, 2, 2) or _batch_only(layer_id, data)


def random_runnable(devices: int, seed: int, graph: Any) -> Any:
    """A chooser drawing a runnable plan at random on ``devices`` ranks: each layer's splits from its runnable
    configurations (the search's default space), half the ResNet blocks as kept chains, then every
    channel-split layer left without a kept neighbour put back on the batch (the runtime refuses such
    layers). The draw depends only on the seed and the layer ids, so every rank agrees."""
    import random

    from pase.planning.per_layer import PlanOptions, layer_space
    from strategies.runnable import edge_mode, layer_run

    rng = random.Random(seed)
    chained = {block: rng.random() < 0.5 for block in sorted({data["block"] for _, data in graph.layers()})}
    degree = {block: rng.choice([t for t in (2, 4) if devices % t == 0]) for block in chained}
    splits = {}
    for layer_id, data in graph.layers():
        space, _ = layer_space(layer_id, data, devices, PlanOptions())
        chain = kept_chain(layer_id, data, devices, degree[data["block"]]) if chained[data["block"]] else None
        splits[layer_id] = chain or space.config(random.Random(f"{seed}:{layer_id}").randrange(len(space)))
    changed = True
    while changed:
        changed = False
        runs = {layer_id: layer_run(graph[layer_id], s, devices) for layer_id, s in splits.items()}
        for src, dst, edge in graph.graph.edges(data=True):
            if edge_mode(edge, graph[src], runs[src], graph[dst], runs[dst], graph.graph.out_degree(src)) is None:
                for layer_id in (src, dst):
                    if runs[layer_id].kind == "local":
                        splits[layer_id], changed = {"n": devices}, True
                break
    return lambda layer_id, data: splits[layer_id]


CASES = {"dp": (_batch_only, False), "fsdp": (_batch_only, True), "channels": (_channels, False),
         "heads": (_heads, False), "seq": (_sequence, False), "spatial": (_spatial, False), "kept": (_kept, False),
         "grid": (_grid, False), "outspatial": (_out_spatial, False), "replica_out": (_replica_out, False),
         "grid_fsdp": (_grid, True)}
# a case name with ":checkpoint" runs the plan with activation checkpointing (plan.options["checkpointing"])
# layers inside checkpointed blocks (a resnet's first norm, an attention block's norm): their forward calls
# per step count recomputation
INNER = ("down_blocks.0.resnets.0.norm1", "down_blocks.1.attentions.0.group_norm")
CLIP_NORM = 1e-3  # far below unet-tiny's gradient norm: clipping scales every gradient


def matching_ranks(results: dict[int, dict[str, Any]], case: str, tolerance: float = 1e-5) -> list[dict[str, Any]]:
    """Every rank's result for ``case``, after checking that it ran, as planned, to the single-process model's
    loss and gradients (every parameter's, within ``tolerance`` relative)."""
    per_rank = [results[rank][case] for rank in sorted(results)]
    for result in per_rank:
        assert "error" not in result, result.get("error")
        assert result["missing"] == []
        assert abs(result["loss"] - result["ref_loss"]) <= tolerance * abs(result["ref_loss"])
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] <= tolerance, (worst, result["errors"][worst])
        assert len(result["errors"]) > 50 and result["as_planned"] == result["total"]
    return per_rank


def count_calls(modules: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Forward calls of each module from now on (a dict that fills as they run)."""
    calls = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        def hook(*_: Any, name: str = name) -> None:
            calls[name] += 1
        module.register_forward_hook(hook)
    return calls


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter, ||got - want|| / ||want|| (``pase verify --check``'s measure: gradients that are
    analytically zero, such as key biases', are measured against the largest norm)."""
    from pase.train.verify import relative_errors as measure

    return measure(got, want)


def _case(name: str, graph: Any, rank: int, world: int) -> dict[str, Any]:
    import pase
    from pase.runtime import full_tensors
    from pase.runtime.comm_count import CommCounter
    from pase.runtime.state import ShardMap

    kind, _, option = name.partition(":")
    if kind == "random":
        choose, fsdp = random_runnable(world, int(option), graph), False
        option = ""
    elif kind in ("replicated", "replicated_fsdp"):
        choose, fsdp = replicas(world), kind.endswith("fsdp")
    else:
        choose, fsdp = CASES[kind]
    plan = hand_plan(graph, world, choose, fsdp, checkpointing=option == "checkpoint")
    model = build_model()
    reference = copy.deepcopy(model)
    x, t, noise = batch()
    ref_loss = epsilon_loss(reference, x, t, noise)
    ref_loss.backward()
    want = {n: p.grad for n, p in reference.named_parameters()}
    with pase.distributed(plan) as run:
        parallel = run.parallelize(model, graph=graph if kind != "channels" else None)
        calls = count_calls({inner: model.get_submodule(inner) for inner in INNER})  # the model inside any wrapper
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        with CommCounter() as counter:
            loss = epsilon_loss(parallel, x[rows], t[rows], noise[rows])
            loss.backward()
        got = full_tensors(parallel, "grad")
        layout = parallel.pase_layout
        result = {"loss": run.mean(loss.detach()), "ref_loss": float(ref_loss.detach()), "kind": layout.kind,
                  "applied": sorted({lay.applied for lay in layout.layers}),
                  "missing": sorted(set(want) - set(got)), "summary": layout.summary(),
                  "checkpointed": layout.checkpointed, "calls": calls,
                  "as_planned": layout.layers_as_planned, "total": layout.layers_total,
                  "comm_bytes": counter.total_bytes, "comm_by_op": dict(counter.bytes),
                  "splits": {layer.id: layer.splits for layer in plan.layers}}
        result["errors"] = relative_errors(got, {n: g for n, g in want.items() if n in got})
        # clipping by the global norm over the shards, as pase train does: the single process's norm and clipped
        # gradients (a small bound, so that it scales)
        ref_norm = float(torch.nn.utils.clip_grad_norm_(list(reference.parameters()), CLIP_NORM))
        result["clip_norm"], result["ref_clip_norm"] = float(ShardMap(parallel).clip_grad_norm_(CLIP_NORM)), ref_norm
        clipped = full_tensors(parallel, "grad")
        result["clip_errors"] = relative_errors(clipped, {n: g for n, g in want.items() if n in clipped})
        result["round_trip"] = _round_trip(parallel)
        result["head_calls"] = sum(mode.calls for _, mode in getattr(parallel, "pase_head_modes", []))
        result.update(_api_copies(run, parallel, reference, x, t))
        del parallel
    return result


def _api_copies(run: Any, parallel: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor,
                t: torch.Tensor) -> dict[str, Any]:
    """``run.state_dict()`` (full tensors on every rank) and ``run.unwrap()`` (a plain module on rank 0 alone, the
    other rank waiting at the block's end) against the single-process reference (no optimizer step taken)."""
    want = reference.state_dict()
    state = run.state_dict(parallel)
    result: dict[str, Any] = {"state_keys_match": sorted(state) == sorted(want),
                              "state_error": max(float((state[k] - want[k]).abs().max()) for k in want)}
    with run.unwrap(parallel) as plain:
        result["unwrapped_on_this_rank"] = plain is not None
        if plain is not None:
            with torch.no_grad():
                got = plain(x, t)
                expected = reference(x, t)
            got, expected = (getattr(o, "sample", o) for o in (got, expected))
            result["plain_output_error"] = float((got - expected).abs().max())
            result["plain_is_plain"] = type(plain) is type(reference)
    return result


def _round_trip(model: torch.nn.Module) -> float:
    """Largest difference between each parameter's local part and the part ``ShardMap.local`` cuts from its full
    tensor (``ShardMap.full``): what a checkpoint's save and load go through."""
    from pase.runtime.state import ShardMap

    shards = ShardMap(model)
    worst = 0.0
    for name, param in shards.named:
        local = shards.local(name, shards.full(name, param.detach()), param.detach())
        mine, back = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (param.detach(), local))
        worst = max(worst, float((mine - back).abs().max()) if mine.numel() else 0.0)
    return worst


def _refusals(graph: Any, rank: int, world: int) -> dict[str, Any]:
    import dataclasses

    import pase
    from pase.errors import PaseError

    plan = hand_plan(graph, world, _batch_only)
    staged = pipeline_plan(graph, world, "up_blocks.0.attentions.0", "1f1b", 2)  # pipeline plans: the same checks
    other = copy.deepcopy(build_model())
    other.conv_out = torch.nn.Conv2d(32, 4, 3, padding=1)  # another model: one more output channel
    cases = [(f"{prefix}world", dataclasses.replace(base, devices=4), build_model(), graph) for prefix, base in
             (("", plan), ("pipeline_", staged))]
    cases += [(f"{prefix}model", dataclasses.replace(base, model_fingerprint="0123456789abcdef"), build_model(), graph)
              for prefix, base in (("", plan), ("pipeline_", staged))]
    cases.append(("other_model", plan, other, None))
    cases.append(("norm_channels", hand_plan(graph, world, _norm_channels), build_model(), graph))
    messages = {}
    with pase.distributed() as run:
        for label, bad, model, known in cases:
            try:
                run.plan = bad
                run.parallelize(model, graph=known)
                messages[label] = "accepted"
            except PaseError as exc:
                messages[label] = str(exc)
    return messages


def pipeline_plan(graph: Any, devices: int, split_at: str, schedule: str, microbatches: int, replicas: int = 1) -> Any:
    """A 2-stage plan: stage 1 begins with module ``split_at`` (the blocks of a stage are module paths), with
    ``replicas`` copies of the pipeline placed as the planner places them (replica r on ranks 2r, 2r + 1)."""
    from pase.planning.plan import StagePlan

    plan = hand_plan(graph, devices, lambda layer_id, data: {})
    blocks = list(dict.fromkeys(data["block"] for _, data in graph.layers()))
    cut = blocks.index(split_at)
    layers = [[layer_id for layer_id, data in graph.layers() if (blocks.index(data["block"]) >= cut) == second]
              for second in (False, True)]
    plan.stages = [StagePlan(layers[s], [2 * r + s for r in range(replicas)], 0.0, 0.0,
                             blocks[:cut] if s == 0 else blocks[cut:]) for s in (0, 1)]
    plan.schedule, plan.microbatches, plan.pipeline_replicas = schedule, microbatches, replicas
    return plan


def _pipeline_case(name: str, graph: Any, rank: int, world: int) -> dict[str, Any]:
    """One training step of a 2-stage pipeline (the epsilon objective, split for stages), ``world / 2`` replicas
    of it each on its share of the global batch, against the model alone on the whole global batch (the same
    samples, noise and timesteps: each replica draws its share's from its own generator)."""
    from pase.runtime.pipeline import pipeline_parallelize
    from pase.train.loop import epsilon_objective, step_generator

    _, schedule, split_at, *option = name.split(":")
    replicas = world // 2
    plan = pipeline_plan(graph, world, split_at, schedule, microbatches=4 // replicas, replicas=replicas)
    plan.options["checkpointing"] = option == ["checkpoint"]
    model = build_model()
    reference = copy.deepcopy(model)
    x0 = batch()[0]
    share = GLOBAL_BATCH // replicas
    objective = epsilon_objective()
    drawn = [objective.prepare(x0[r * share:(r + 1) * share], step_generator(0, 0, r)) for r in range(replicas)]
    inputs = [torch.cat([d[0][k] for d in drawn]) for k in range(2)]
    ref_loss = objective.criterion(reference(*inputs), torch.cat([d[1] for d in drawn]))
    ref_loss.backward()
    want = {n: p.grad for n, p in reference.named_parameters()}
    parallel = pipeline_parallelize(model, plan, device=torch.device("cpu"), graph=graph)
    checkpointed = parallel.pase_layout.checkpointed
    # a layer inside this stage's first block with inner layers (checkpointed or not): its calls per microbatch
    from strategies.checkpointing import checkpointed_blocks

    mine = {graph[layer_id]["block"] for layer_id in plan.stages[parallel.index].layers}
    block = next(b for b in checkpointed_blocks(graph) if b in mine)
    inner = next(name for name, _ in parallel.stage_module.get_submodule(f"model.{block}").named_children())
    calls = count_calls({inner: parallel.stage_module.get_submodule(f"model.{block}.{inner}")})
    replica = parallel.replica
    loss = parallel.pase_step(objective, x0[replica * share:(replica + 1) * share], step_generator(0, 0, replica))
    got = {parallel.original_names[n]: p.grad for n, p in parallel.stage_module.named_parameters()}
    result = {"loss": float(loss), "ref_loss": float(ref_loss.detach()), "names": sorted(got),
              "missing_grads": sorted(n for n, g in got.items() if g is None),
              "summary": parallel.pase_layout.summary(), "replica": replica, "stage": parallel.index,
              "inputs": sum(node.op == "placeholder" for node in parallel.stage_module.graph.nodes),
              "checkpointed": checkpointed, "calls_per_microbatch": calls[inner] / plan.microbatches}
    result["errors"] = relative_errors({n: g for n, g in got.items() if g is not None},
                                       {n: want[n] for n in got if got[n] is not None})
    # clipping by the global norm over the replica's stages (each stage holds its own parameters' gradients)
    from pase.runtime.state import ShardMap

    ref_norm = float(torch.nn.utils.clip_grad_norm_(list(reference.parameters()), CLIP_NORM))
    result["clip_norm"], result["ref_clip_norm"] = float(ShardMap(parallel).clip_grad_norm_(CLIP_NORM)), ref_norm
    result["clip_errors"] = relative_errors({n: g for n, g in got.items() if g is not None},
                                            {n: want[n] for n in got if got[n] is not None})
    return result


def _worker(rank: int, world: int, port: int, case_names: list[str], out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from pase.graph import extract
    from pase.models.zoo import ZOO
    from pase.process_group import Launch, process_group

    results: dict[str, Any] = {}
    with process_group(Launch.local(rank, world, port), "gloo", timeout_s=300):
        try:
            graph = extract(build_model().to("meta"), *ZOO["unet-tiny"].example_inputs(GLOBAL_BATCH), name="unet-tiny")
            for name in case_names:
                try:
                    if name.startswith("pipeline:"):
                        results[name] = _pipeline_case(name, graph, rank, world)
                    elif name == "refusals":
                        results[name] = _refusals(graph, rank, world)
                    else:
                        results[name] = _case(name, graph, rank, world)
                except Exception:  # reported to the test, which fails with the traceback
                    results[name] = {"error": traceback.format_exc()}
                dist.barrier()
        finally:
            Path(out, f"{rank}.json").write_text(json.dumps(results))


def grid_layer(rank: int, world: int, port: int, shapes: list[tuple[int, int]], out: str) -> None:
    """One Conv2d and one Linear on every ``(t, u)`` grid of ``shapes`` (output x input channels, the batch over
    ``world / (t * u)``): each rank's output rows and input/weight/bias gradients against the layers alone on the
    whole batch; writes ``{"t x u": worst relative error}`` as JSON to ``out`` (rank 0)."""
    torch.set_num_threads(1)
    from pase.process_group import Launch, process_group
    from strategies.tensor import GridGroups, GridSplit

    errors: dict[str, float] = {}
    with process_group(Launch.local(rank, world, port), "gloo", timeout_s=120):
        for t, u in shapes:
            groups = GridGroups.build("cpu", world, t, u)
            for layer, shape in ((torch.nn.Conv2d(8 * u, 8 * t, 3, padding=1), (2 * world, 8 * u, 5, 5)),
                                 (torch.nn.Linear(8 * u, 8 * t), (2 * world, 3, 8 * u))):
                torch.manual_seed(0)
                layer.reset_parameters()
                x = torch.randn(shape, requires_grad=True)
                reference = layer(x)
                (reference * torch.arange(reference.numel()).reshape(reference.shape).sin()).sum().backward()
                rows = slice(rank * 2, rank * 2 + 2)
                mine = x.detach()[rows].clone().requires_grad_(True)
                split = GridSplit(layer, groups)
                got = split(mine)
                (got * torch.arange(reference.numel()).reshape(reference.shape)[rows].sin()).sum().backward()
                k, j = torch.distributed.get_rank(groups.out), torch.distributed.get_rank(groups.inp)
                weight = layer.weight.grad.chunk(t, 0)[k].chunk(u, 1)[j]
                pairs = [(got, reference[rows]), (mine.grad, x.grad[rows]), (split.bias.grad, None),
                         (split.weight.grad, None)]
                worst = max(float((a - b).norm() / b.norm()) for a, b in pairs[:2])
                # a weight block's and bias part's gradients from this rank's share: summed over their groups
                for param, full, group in ((split.weight, weight, groups.dp), (split.bias, layer.bias.grad.chunk(t)[k],
                                                                               groups.bias)):
                    summed = param.grad.clone()
                    torch.distributed.all_reduce(summed, group=group)
                    worst = max(worst, float((summed - full).norm() / full.norm()))
                key = f"{t}x{u}"
                errors[key] = max(errors.get(key, 0.0), worst)
    if rank == 0:
        Path(out).write_text(json.dumps(errors))


def spatial_layers(rank: int, world: int, port: int, out: str) -> None:
    """A 3x3 and a 5x5 Conv2d and a GroupNorm split by height, then by width, over all ``world`` ranks (interior
    ranks have two neighbours): each rank's output, input gradient and the parameters' gradients summed over the
    ranks against the layers alone on the whole batch; writes ``{"layer axis": worst relative error}`` and the
    halo bytes each rank sent (``send_bytes``) as JSON to ``out`` (rank 0)."""
    torch.set_num_threads(1)
    from pase.process_group import Launch, process_group
    from pase.runtime.comm_count import CommCounter
    from strategies.spatial import SpatialConv, SpatialGroupNorm
    from strategies.tensor import TensorGroups

    errors: dict[str, float] = {}
    sends: list[float] = []
    with process_group(Launch.local(rank, world, port), "gloo", timeout_s=120):
        group = TensorGroups.build("cpu", world, world).tp
        layers = {"conv3": lambda: torch.nn.Conv2d(4, 6, 3, padding=1),
                  "conv5": lambda: torch.nn.Conv2d(4, 6, 5, padding=2), "norm": lambda: torch.nn.GroupNorm(2, 4)}
        for name, make in layers.items():
            for axis in (2, 3):
                torch.manual_seed(0)
                layer = make()
                if name == "norm":
                    torch.nn.init.normal_(layer.weight)
                    torch.nn.init.normal_(layer.bias)
                x = torch.randn(world, 4, 4 * world, 4 * world + 4, requires_grad=True)
                reference = layer(x)
                weights = torch.linspace(0.5, 1.5, reference.numel()).reshape(reference.shape)  # no cancellation
                (reference * weights).sum().backward()
                want = {n: p.grad.clone() for n, p in layer.named_parameters()}
                layer.zero_grad()
                split = (SpatialGroupNorm if name == "norm" else SpatialConv)(layer, axis, group)
                mine = x.detach()[rank:rank + 1].clone().requires_grad_(True)
                with CommCounter() as counter:
                    got = split(mine)
                    (got * weights[rank:rank + 1]).sum().backward()
                if name == "conv5":
                    sends.append(counter.bytes["send_recv"])
                pairs = [(got, reference[rank:rank + 1]), (mine.grad, x.grad[rank:rank + 1])]
                for n, p in layer.named_parameters():
                    summed = p.grad.clone()
                    torch.distributed.all_reduce(summed)
                    pairs.append((summed, want[n]))
                errors[f"{name} {axis}"] = max(float((a - b).detach().norm() / b.norm()) for a, b in pairs)
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, sends)
    if rank == 0:
        Path(out).write_text(json.dumps({"errors": errors, "send_bytes": gathered}))
