"""Strategies: one module per parallel dimension (data, channel/tensor, spatial, pipeline,
timestep-decoupled fine-tuning, quantized fine-tuning, parallel sampling).

Each owns its configurations and how the runtime applies it; costs go through ``cost_models``.
"""
