"""Cost models: the hardware catalog, the pynvml probe and compute/communication/memory costs.

Owns everything that turns a LayerGraph layer (or edge) and a parallel configuration into
seconds and bytes on a described cluster. It reads LayerGraphs; it never captures models and
never searches. (Filled in by the hardware and planner issues.)
"""
