"""The runtime: apply a plan to a model with torch.distributed (gloo on CPU, NCCL on GPU).

``parallelize(model, plan)`` changes the model to run the plan in the current process group;
``distributed(plan)`` opens that group for a training loop (``run.parallelize``, ``run.data_loader``).
"""
from pase.runtime.checks import PlanMismatch
from pase.runtime.context import Run, distributed
from pase.runtime.layout import ParallelLayout
from pase.runtime.parallel import parallelize
from pase.runtime.state import full_tensors, unwrap

__all__ = ["ParallelLayout", "PlanMismatch", "Run", "distributed", "full_tensors", "parallelize", "unwrap"]
