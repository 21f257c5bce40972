"""``Plan``: what the search chose, as versioned plain JSON (loading one never executes code)."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pase import atomic
from pase.errors import PaseError
from pase.planning.plan_schema import check_plan_data
from pase.schema import check_header
from strategies.sharding import uniform_sharding

PLAN_SCHEMA = "pase.plan"
PLAN_VERSION = 1


@dataclass
class LayerChoice:
    id: str
    op: str
    block: str
    splits: dict[str, int]  # dimension -> split factor (absent = 1)
    seconds: float
    memory_bytes: float
    runnable: bool = True  # the runtime runs this configuration as planned (strategies.runnable)


@dataclass
class BlockChoice:
    """One module block of the model: whether the plan recomputes it (activation checkpointing) and how its
    weights, gradients and optimizer state are sharded (``sharding_of``)."""
    name: str
    checkpoint: bool = False
    sharding: str = "none"


def sharding_of(options: Mapping[str, Any]) -> str:
    """How a plan's options shard its blocks with weights: "none", "gradients" (ZeRO-2: FSDP keeping the gathered
    weights through the backward), "full" (FSDP), or "per block" (``block_sharding``: each block its own)."""
    if options.get("fsdp") and options.get("block_sharding") is not None:
        return "per block"
    return uniform_sharding(options)


@dataclass
class Prediction:
    step_seconds: float
    samples_per_second: float
    memory_bytes_per_device: float
    compute_seconds: float = 0.0
    communication_seconds: float = 0.0
    bubble_seconds: float = 0.0  # pipeline fill and drain (0 without a pipeline)
    # the exposed weight-gradient collectives inside communication_seconds: under gradient accumulation
    # (DDP's no_sync) they run once per step, not once per micro-step (0 where not priced apart)
    gradient_sync_seconds: float = 0.0
    # bytes every collective moves per device per step (layers' and re-layouts', hidden or not), in the bus-byte
    # convention of cost_models.conventions: what `pase verify --check` counts at the torch.distributed calls
    comm_bytes_per_device: float = 0.0
    gradient_sync_bytes_per_device: float = 0.0  # the bytes of those once-per-step collectives, inside the above
    micro_steps: int = 1  # the step runs as this many micro-steps (gradient accumulation); the figures are per step
    optimizer_seconds: float = 0.0  # the optimizer's step inside compute_seconds: once per step, not per micro-step


@dataclass
class StagePlan:
    """One pipeline stage: its layers, the ranks running it (every pipeline replica's), per-microbatch
    time and per-device memory at the schedule's peak."""

    layers: list[str]
    devices: list[int]
    seconds: float
    memory_bytes: float
    blocks: list[str] = field(default_factory=list)
    in_flight: int = 1


@dataclass
class PipelineSearchInfo:
    """How the pipeline-stage search went (``pase.planning.pipeline``)."""

    seconds: float
    settings: int  # (replicas, microbatches) pairs considered
    screened_out: int  # settings whose lower bound could not beat the incumbent
    segments: int
    segment_searches: int
    exact_stage_searches: int
    gap: float
    notes: list[str]
    schedule: str
    max_stages: int
    runnable_only: bool | None = None  # searched only what the runtime runs (None: a plan from before the option)
    unrunnable: str | None = None  # why the runtime cannot run the plan's stages (None: it can, or no stages)


@dataclass
class SearchInfo:
    """How the per-layer search went: its time, size, memory price and proved distance from the optimum."""

    seconds: float = 0.0
    pricing_seconds: float | None = None
    width: int = 0  # elimination width
    largest_table: int = 0
    pruned_configs: int = 0
    memory_price: float | None = None  # seconds per byte when the memory limit bound (0: it did not)
    conditioned_on: list[str] = field(default_factory=list)  # hub layers searched outside the elimination
    space_note: str | None = None  # set when a search was restricted (or memory-minimal)
    proved_gap: float = 0.0
    hub_combos_solved: int = 0
    messages_reused: int = 0
    configs: int = 0
    pipeline: PipelineSearchInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.pipeline is None:
            del data["pipeline"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchInfo:
        body = _known(cls, data)
        if body.get("pipeline") is not None:
            body["pipeline"] = PipelineSearchInfo(**_known(PipelineSearchInfo, body["pipeline"]))
        return cls(**body)


@dataclass
class Plan:
    model: str
    model_fingerprint: str
    cluster: str
    devices: int
    batch: int
    precision: str
    options: dict[str, Any]
    layers: list[LayerChoice]
    predicted: Prediction
    baselines: dict[str, Prediction | None] = field(default_factory=dict)
    baseline_notes: dict[str, str] = field(default_factory=dict)  # why a baseline is null
    search: SearchInfo = field(default_factory=SearchInfo)
    stages: list[StagePlan] = field(default_factory=list)  # empty: no pipeline
    microbatches: int = 1
    schedule: str | None = None  # "1f1b" or "gpipe" when there are stages
    pipeline_replicas: int = 1  # data-parallel copies of the whole pipeline
    # A user's ``package.module:factory`` model: its positional input shapes (batch first), so that train and verify
    # rebuild it when the command line names the factory (None for zoo models and folders, whose inputs are known).
    input_shapes: list[list[int]] | None = None
    # Gradient accumulation: a training step is this many micro-steps of ``batch / micro_steps`` samples whose
    # gradients add up locally and synchronise once. ``layers`` are priced per micro-step (the model's graph at
    # ``micro_batch``), ``predicted`` and ``baselines`` per whole step (memory: what one micro-step holds).
    micro_steps: int = 1
    blocks: list[BlockChoice] = field(default_factory=list)  # per module block, in model order (empty: older plans)

    @property
    def micro_batch(self) -> int:
        """The global batch of one micro-step (what every rank's forward sees, split over the ranks)."""
        return self.batch // self.micro_steps

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["baselines"] = {k: (asdict(v) if v else None) for k, v in self.baselines.items()}
        data["search"] = self.search.to_dict()
        return {"schema": PLAN_SCHEMA, "schema_version": PLAN_VERSION, **data}

    def save(self, path: str | Path) -> None:
        atomic.write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plan file") -> Plan:
        check_header(data, PLAN_SCHEMA, PLAN_VERSION, "pase plan", "pase plan --json")
        check_plan_data(data, source)
        known = {f.name for f in fields(cls)}
        body = {k: v for k, v in data.items() if k in known}  # unknown keys (newer writers) are ignored
        try:
            body["layers"] = [LayerChoice(**_known(LayerChoice, layer)) for layer in body["layers"]]
            body["predicted"] = Prediction(**_known(Prediction, body["predicted"]))
            body["baselines"] = {k: (Prediction(**_known(Prediction, v)) if v else None)
                                 for k, v in body.get("baselines", {}).items()}
            body["stages"] = [StagePlan(**_known(StagePlan, stage)) for stage in body.get("stages", [])]
            body["search"] = SearchInfo.from_dict(body.get("search", {}))
            body["blocks"] = [BlockChoice(**_known(BlockChoice, block)) for block in body.get("blocks", [])]
            plan = cls(**body)
        except (KeyError, TypeError, AttributeError) as exc:
            raise PaseError(f"malformed plan file: {exc}; re-run `pase plan --json`") from None
        if plan.batch % plan.micro_steps:
            raise PaseError(f"{source}: batch {plan.batch} is not a whole number of micro_steps ({plan.micro_steps}); "
                            "re-run `pase plan --json` (or fix that field)")
        return plan

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """The plan in ``path``, or one ``PaseError`` line naming the file and what is wrong with it."""
        path = Path(path)
        if not path.is_file():
            what = "a folder, not a plan file" if path.is_dir() else "missing"
            raise PaseError(f"plan file {path} is {what}; write one with `pase plan ... --json {path}`")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PaseError(f"plan file {path} is not JSON ({exc}); write one with `pase plan ... --json`") from None
        try:
            return cls.from_dict(data, f"plan file {path}")
        except PaseError as exc:
            message = str(exc)
            raise PaseError(message if str(path) in message else f"plan file {path}: {message}") from None


@dataclass
class BlockSummary:
    """One block of a plan: its layer count, time, memory and how many layers took each split."""

    block: str
    layers: int = 0
    seconds: float = 0.0
    memory: float = 0.0  # bytes
    splits: Counter[str] = field(default_factory=Counter)  # "dim=factor ..." (or "replicated") -> layers


def blocks_summary(plan: Plan) -> str:
    """One line: the step's micro-steps, which blocks recompute, how blocks are sharded (the plan JSON's
    ``micro_steps`` and ``blocks``)."""
    blocks = [b for b in plan.blocks if not b.name.startswith("input:")]
    recomputed = [b.name for b in blocks if b.checkpoint]
    shown = ", ".join(recomputed[:6]) + (f" and {len(recomputed) - 6} more" if len(recomputed) > 6 else "")
    sharding = Counter(b.sharding for b in blocks)
    steps = (f"{plan.micro_steps} micro-steps of {plan.micro_batch} samples" if plan.micro_steps > 1
             else "one step, no accumulation")
    return (f"{steps}; recompute {len(recomputed)} of {len(blocks)} blocks" + (f" ({shown})" if shown else "")
            + "; sharding " + ", ".join(f"{kind}: {n} blocks" for kind, n in sharding.most_common()) + ".")


def summarize_blocks(plan: Plan) -> list[BlockSummary]:
    """Per block, in the order of its first layer (for the plan table)."""
    blocks: dict[str, BlockSummary] = {}
    for layer in plan.layers:
        block = blocks.setdefault(layer.block, BlockSummary(layer.block))
        block.layers += 1
        block.seconds += layer.seconds
        block.memory += layer.memory_bytes
        block.splits[" ".join(f"{d}={f}" for d, f in sorted(layer.splits.items())) or "replicated"] += 1
    return list(blocks.values())


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The fields ``cls`` declares: files from newer writers may carry more."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
