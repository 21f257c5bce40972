"""The optimizer's step in the cost model: AdamW's bytes over the parameters a device updates, once per step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cost_models.cluster import parse_spec
from cost_models.layer_costs import OPTIMIZER_BYTES_PER_PARAM, CostModel, CostOptions
from cost_models.rates import HardwareRates
from pase.graph import extract
from pase.planning.micro_steps import accumulated
from pase.planning.plan import Prediction
from strategies.splits import SplitSpace


def _linear() -> dict:
    with torch.device("meta"):
        layer = nn.Linear(1024, 1024)
    graph = extract(layer, (torch.zeros(64, 1024, device="meta"),))
    return next(data for _, data in graph.layers() if data["op"] == "linear")


@pytest.mark.parametrize("fsdp", [False, True])
@pytest.mark.parametrize(("clip", "ema", "moved"), [(False, False, 28), (True, False, 40), (True, True, 52)])
def test_the_step_moves_its_bytes_per_parameter_this_device_updates(fsdp: bool, clip: bool, ema: bool,
                                                                     moved: int) -> None:
    """AdamW's 28 bytes, gradient clipping's 12 (pase train's default: the norm reads each gradient, the scaling
    reads and writes it) and an EMA's 12 (lerp reads the average and the weight, writes the average)."""
    cluster = parse_spec("8xH100-SXM")
    options = CostOptions(precision="bf16", fsdp=fsdp, grad_clip=clip, ema=ema)
    model = CostModel(cluster, HardwareRates(cluster), options)
    parts: dict[str, np.ndarray] = {}
    model.layer_costs(_linear(), SplitSpace(("n",), np.array([[8]])), parts=parts)
    bandwidth = 3350e9 * cluster.efficiency["optimizer"]  # H100's memory at the catalog's foreach share
    updated = (1024 * 1024 + 1024) / (8 if fsdp else 1)  # FSDP: this device's shard of weight and bias
    assert OPTIMIZER_BYTES_PER_PARAM == 28 and options.step_bytes_per_param == moved
    assert parts["optimizer"][0] == pytest.approx(updated * moved / bandwidth)


def test_plans_price_the_ema_they_are_asked_for() -> None:
    from pase.graph import extract_model
    from pase.models.zoo import resolve_model
    from pase.planning import PlanOptions, make_plan

    graph = extract_model("unet-tiny", 8, use_cache=True)
    plain, ema = (make_plan(graph, parse_spec("1xH100-SXM"), options=PlanOptions(ema=flag))[0]
                  for flag in (False, True))
    assert ema.options["ema"] and not plain.options["ema"] and plain.options["grad_clip"]
    assert ema.predicted.optimizer_seconds == pytest.approx(plain.predicted.optimizer_seconds * 52 / 40)
    params = sum(int(p.numel()) for p in resolve_model("unet-tiny").build().parameters())
    assert ema.predicted.memory_bytes_per_device - plain.predicted.memory_bytes_per_device == pytest.approx(4 * params)


def test_micro_steps_run_the_optimizer_once() -> None:
    micro = Prediction(step_seconds=1.0, samples_per_second=8.0, memory_bytes_per_device=5.0, compute_seconds=0.7,
                       communication_seconds=0.3, gradient_sync_seconds=0.1, optimizer_seconds=0.2)
    step = accumulated(micro, 4, 32)
    assert step.step_seconds == pytest.approx(4 * 1.0 - 3 * (0.1 + 0.2))
    assert step.compute_seconds == pytest.approx(4 * 0.7 - 3 * 0.2) and step.optimizer_seconds == 0.2
    assert step.communication_seconds == pytest.approx(4 * 0.3 - 3 * 0.1)
