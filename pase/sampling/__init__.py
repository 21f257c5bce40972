"""Parallel sampling across devices: ParaDiGMS (Picard windows) and SRDS (Parareal blocks).

core: the batched noise-free update and up-front noise · denoiser: the network call ·
distributed: splitting a batched call over ranks · sequential / paradigms / srds: the samplers ·
planner: predicted latency and throughput of each, from the cost model · runner: the
``pase sample`` entry point.
"""
from pase.sampling.core import SamplerCore, build_core, core_from_scheduler, make_scheduler
from pase.sampling.distributed import Evaluator
from pase.sampling.paradigms import paradigms
from pase.sampling.sequential import SampleResult, batch_parallel, sequential
from pase.sampling.srds import default_blocks, srds

__all__ = ["Evaluator", "SampleResult", "SamplerCore", "batch_parallel", "build_core", "core_from_scheduler",
           "default_blocks", "make_scheduler", "paradigms", "sequential", "srds"]
