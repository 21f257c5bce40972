"""Planning: from a LayerGraph and a cluster to a ``Plan`` (per-layer splits, pipeline stages, what-if, explain).

``make_plan`` is the one entry point the CLI and the Python API share; the modules behind it:
``per_layer`` (exact search over every layer's splits under the memory limit, DDP/FSDP baselines),
``pipeline`` (pipeline stages x data parallelism around it), ``whatif`` (many clusters, $ per run),
``explain`` (alternatives for one layer), ``report`` (the what-if HTML) and ``plan`` (the Plan type).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cost_models.cluster import Cluster
from pase.graph import LayerGraph
from pase.planning.micro_steps import plan_micro_steps
from pase.planning.per_layer import PlanDoesNotFit, PlanOptions, PricedGraph
from pase.planning.pipeline import PipelineOptions, plan_with_pipeline
from pase.planning.plan import Plan


def make_plan(graph: LayerGraph, cluster: Cluster, *, profile: dict[str, Any] | None = None,
              options: PlanOptions | None = None, pipeline: PipelineOptions | None = None,
              progress: Callable[[str], None] | None = None, micro_steps: int | None = None
              ) -> tuple[Plan, PricedGraph | None]:
    """The fastest plan for a training step of ``graph`` (captured at the step's global batch) on ``cluster``
    that fits memory, and the priced graph behind it.

    Per-layer plans search their gradient-accumulation micro-steps too (``micro_steps``: that many; None:
    searched, ``pase.planning.micro_steps``), with FSDP and checkpointing where ``options`` leave them open.
    With ``pipeline`` (or ``options.only == "pipeline"``) pipeline stages x data parallelism are searched
    beside the per-layer plan (in one step: its microbatches accumulate); the priced graph is None when only a
    pipeline fits. Raises ``PlanDoesNotFit`` when nothing fits.
    """
    options = options or PlanOptions()
    if pipeline is not None or options.only == "pipeline":
        pipeline = pipeline or PipelineOptions()
        if options.space == "all":  # the wider space for stages too (such plans say why they cannot run)
            pipeline = replace(pipeline, runnable_only=False)
        return plan_with_pipeline(graph, cluster, profile=profile, options=options, pipeline=pipeline,
                                  progress=progress, micro_steps=micro_steps)
    return plan_micro_steps(graph, cluster, profile=profile, options=options, micro_steps=micro_steps,
                            progress=progress)


__all__ = ["PipelineOptions", "Plan", "PlanDoesNotFit", "PlanOptions", "PricedGraph", "make_plan"]
