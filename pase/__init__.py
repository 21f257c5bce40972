"""pase: plan and run parallel training of diffusion UNets.

The data flow (see DESIGN.md): model -> ``pase.graph`` (LayerGraph) -> cost model ->
search -> Plan -> runtime. Heavy modules are imported lazily so that ``import pase`` stays
cheap for scripts that only read plan or graph JSON.
"""
from typing import Any

from pase._version import __version__

__all__ = ["__version__", "extract", "plan"]


def plan(*args: Any, **kwargs: Any) -> Any:
    """``pase.plan(model, example_inputs, cluster="8xH100-SXM", batch=...) -> Plan`` (see ``pase.api.plan``)."""
    from pase.api import plan as _plan

    return _plan(*args, **kwargs)


def extract(*args: Any, **kwargs: Any) -> Any:
    """``pase.extract(model, example_inputs) -> LayerGraph`` (see ``pase.graph.extract``)."""
    from pase.graph import extract as _extract

    return _extract(*args, **kwargs)
