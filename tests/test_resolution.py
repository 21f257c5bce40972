"""`--resolution` and `--text-length`: the sample's size follows the pixels over the model's VAE factor, the
prompt's tokens follow the text length, the graph's FLOPs follow them, and a plan made for them runs at them."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pase.cli import app
from pase.errors import InputShapeError
from pase.graph import extract_model
from pase.models.zoo import ZOO, resolution_inputs
from pase.planning.plan import Plan
from pase.runtime.checks import example_inputs_for


def _flops(graph, op: str) -> float:
    return sum(data["flops_fwd"] for _, data in graph.layers() if data["op"] == op)


def test_sd15_at_256_px_has_a_quarter_of_the_conv_flops_of_512_and_less_attention() -> None:
    spec = ZOO["sd15-unet"]
    assert resolution_inputs(spec, 2, 256)["sample"] == (2, 4, 32, 32)  # 256 px / VAE factor 8
    assert resolution_inputs(spec, 2, 512) == {"sample": (2, 4, 64, 64)}
    small = extract_model("sd15-unet", 2, input_shapes=resolution_inputs(spec, 2, 256), use_cache=True)
    full = extract_model("sd15-unet", 2, use_cache=True)
    assert _flops(small, "conv") == pytest.approx(_flops(full, "conv") / 4, rel=1e-9)
    # self-attention grows with the square of the positions, cross-attention with the positions
    assert _flops(small, "attention") < _flops(full, "attention") / 4
    assert _flops(small, "linear") == pytest.approx(_flops(full, "linear") / 4, rel=0.05)


def test_text_length_and_bad_resolutions_are_named() -> None:
    spec = ZOO["sd15-unet"]
    assert resolution_inputs(spec, 3, None, 154) == {"encoder_hidden_states": (3, 154, 768)}
    with pytest.raises(InputShapeError, match="multiple of 64 pixels"):
        resolution_inputs(spec, 2, 250)
    with pytest.raises(InputShapeError, match="takes no text"):
        resolution_inputs(ZOO["unet-tiny"], 2, None, 77)
    assert resolution_inputs(ZOO["unet-tiny"], 2, 16) == {"sample": (2, 3, 16, 16)}  # pixel space: factor 1


def test_a_plan_made_at_a_resolution_says_so_and_the_runtime_builds_that_input(tmp_path) -> None:
    out = tmp_path / "plan.json"
    done = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--cluster", "2xH100-SXM", "--batch", "8",
                                    "--resolution", "16", "--no-pipeline", "--json", str(out)])
    assert done.exit_code == 0, done.output
    assert "16 px" in " ".join(done.output.split())
    plan = Plan.load(out)
    assert json.loads(out.read_text())["options"]["resolution"] == 16
    args, _ = example_inputs_for(plan)
    assert tuple(args[0].shape) == (plan.micro_batch, 3, 16, 16)
    bad = CliRunner().invoke(app, ["plan", "--model", "unet-tiny", "--cluster", "2xH100-SXM", "--batch", "8",
                                   "--resolution", "15"])
    assert bad.exit_code != 0 and "multiple of 2 pixels" in " ".join(str(bad.exception).split())
