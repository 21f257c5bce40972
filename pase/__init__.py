"""pase: plan and run parallel training of diffusion UNets.

The data flow (see DESIGN.md): model -> ``pase.graph`` (LayerGraph) -> cost model ->
search -> Plan -> runtime. Heavy modules are imported lazily so that ``import pase`` stays
cheap for scripts that only read plan or graph JSON.
"""
from pase._version import __version__

__all__ = ["__version__"]
