"""A one-process plan runs the model itself: nothing to synchronise, so no DDP wrapper (whose hooks and
buckets cost 14-32% of an SD-1.5 step on an H200, docs/gpu-validation.md)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel


@pytest.mark.timeout(180)
def test_a_one_process_plan_is_not_wrapped(tmp_path) -> None:
    import pase
    from pase.planning.plan import Plan
    from pase.train.verify import plan_spec

    path = tmp_path / "plan.json"
    subprocess.run([sys.executable, "-m", "pase", "plan", "--model", "unet-tiny", "--cluster", "1xH100-SXM",
                    "--batch", "2", "--json", str(path)], check=True, capture_output=True, timeout=120)
    plan = Plan.load(path)
    spec = plan_spec(plan)
    torch.manual_seed(0)
    reference = spec.build()
    args, kwargs = spec.example_inputs(2, device="cpu")
    with pase.distributed(plan, backend="gloo") as run:
        torch.manual_seed(0)
        model = run.parallelize(spec.build())
        assert not isinstance(model, DistributedDataParallel)
        assert model.pase_layout.kind == "single"
        assert model.pase_layout.layers_as_planned == model.pase_layout.layers_total
        with torch.no_grad():
            got, want = model(*args, **kwargs), reference(*args, **kwargs)
        assert torch.equal(getattr(got, "sample", got), getattr(want, "sample", want))
