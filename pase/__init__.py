"""pase: plan and run parallel training of diffusion UNets.

The data flow (docs/architecture.md): model -> ``pase.graph`` (LayerGraph) -> cost model ->
search -> Plan -> runtime. Heavy modules are imported lazily so that ``import pase`` stays
cheap for scripts that only read plan or graph JSON.
"""
from typing import Any

from pase._version import __version__

__all__ = ["__version__", "distributed", "extract", "parallelize", "plan"]


def plan(*args: Any, **kwargs: Any) -> Any:
    """``pase.plan(model, example_inputs, cluster="8xH100-SXM", batch=...) -> Plan`` (see ``pase.api.plan``)."""
    from pase.api import plan as _plan  # noqa: PLC0415 - `import pase` stays cheap (no torch) for scripts that only read plan or graph JSON

    return _plan(*args, **kwargs)


def extract(*args: Any, **kwargs: Any) -> Any:
    """``pase.extract(model, example_inputs) -> LayerGraph`` (see ``pase.graph.extract``)."""
    from pase.graph import extract as _extract  # noqa: PLC0415 - as above

    return _extract(*args, **kwargs)


def parallelize(*args: Any, **kwargs: Any) -> Any:
    """``pase.parallelize(model, plan) -> nn.Module`` running the plan (see ``pase.runtime.parallelize``)."""
    from pase.runtime import parallelize as _parallelize  # noqa: PLC0415 - as above

    return _parallelize(*args, **kwargs)


def distributed(*args: Any, **kwargs: Any) -> Any:
    """``with pase.distributed(plan) as run:`` opens the process group (see ``pase.runtime.distributed``)."""
    from pase.runtime import distributed as _distributed  # noqa: PLC0415 - as above

    return _distributed(*args, **kwargs)
