"""Diffusion training: data with no download, the DDPM training loop, checkpoints and memory measurement.

``pase train`` and ``pase finetune`` run on this loop, and so will the plan runtime: the loop takes a
``parallelize`` callable (how to wrap the model for its process group) and a loader factory (how each
rank gets its batches), so a plan can replace the defaults (DDP inside the group, step-indexed batches).
"""
from pase.train.loop import LoopConfig, TrainResult, default_parallelize, epsilon_objective, fit

__all__ = ["LoopConfig", "TrainResult", "default_parallelize", "epsilon_objective", "fit"]
