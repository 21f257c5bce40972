"""Cost models: the hardware catalog, the pynvml probe and compute/communication/memory costs.

Owns everything that turns a LayerGraph layer (or edge) and a parallel configuration into
seconds and bytes on a described cluster. It reads LayerGraphs (calibration captures one to time its
layers) and never searches: above it are only ``strategies``, the search and the planners.
"""
