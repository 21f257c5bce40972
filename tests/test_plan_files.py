"""Plan files are data: checked against their declared JSON Schema when loaded and against the model's layer graph
before anything runs, each problem refused in one line naming the file and field; a plan never imports code."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cost_models.cluster import parse_spec
from pase.errors import PaseError
from pase.graph import extract_model
from pase.planning.per_layer import PlanOptions, plan_graph
from pase.planning.plan import Plan
from pase.runtime.checks import PlanMismatch, check_model
from pase.runtime.layout import PlanNotRunnable, layer_layouts
from pase.train.planned import job_settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny() -> tuple:
    graph = extract_model("unet-tiny", 8, use_cache=True)
    plan = plan_graph(graph, parse_spec("2xL40S"), options=PlanOptions(precision="fp32", only="tensor",
                                                                       baselines=False))
    return graph, plan


def _conv(data: dict) -> int:
    return next(i for i, layer in enumerate(data["layers"]) if layer["op"] == "conv")


MUTATIONS = {
    "negative factor": (lambda d: d["layers"][_conv(d)]["splits"].update(c_out=-2), "splits.c_out: -2 is less than"),
    "layers not a list": (lambda d: d.update(layers="oops"), "layers: 'oops' is not of type 'array'"),
    "negative batch": (lambda d: d.update(batch=-8), "batch: -8 is less than the minimum of 1"),
    "no microbatches": (lambda d: d.update(microbatches=0), "microbatches: 0 is less than the minimum of 1"),
    "huge device count": (lambda d: d.update(devices=10**12), "devices: 1000000000000 is greater than"),
    "string factor": (lambda d: d["layers"][0]["splits"].update(n="2"), "splits.n: '2' is not of type 'integer'"),
    "unknown schedule": (lambda d: d.update(schedule="zigzag"), "schedule: 'zigzag' is not one of"),
    "no model": (lambda d: d.pop("model"), "top level: 'model' is a required property"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_hand_edited_fields_are_refused_by_the_schema(tiny, tmp_path, name: str) -> None:
    _, plan = tiny
    data = plan.to_dict()
    mutate, message = MUTATIONS[name]
    mutate(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PaseError, match=f"plan file {path}") as refused:
        Plan.load(path)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_missing_folder_and_non_json_plan_files(tmp_path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    for path, message in ((tmp_path / "none.json", "is missing"), (tmp_path, "is a folder"),
                          (tmp_path / "bad.json", "is not JSON")):
        with pytest.raises(PaseError, match=message):
            Plan.load(path)


def test_the_cli_refuses_a_bad_plan_in_one_line(tiny, tmp_path) -> None:
    _, plan = tiny
    data = plan.to_dict()
    data["layers"][_conv(data)]["splits"]["c_out"] = 0
    (tmp_path / "plan.json").write_text(json.dumps(data))
    done = subprocess.run([sys.executable, "-m", "pase", "verify", "--plan", str(tmp_path / "plan.json"), "--steps",
                           "3"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "splits.c_out: 0 is less than the minimum of 1" in done.stderr


@pytest.mark.parametrize("edit,message", [
    ("cut", "covers 10 of the model's 104 layers"), ("twice", "more than one configuration"),
    ("bogus dimension", "along bogus_dim, which it does not have"),
    ("uneven", r"conv_out's c_out \(3\) 2 ways, into unequal parts")])
def test_plans_that_do_not_cover_the_model_are_refused(tiny, edit: str, message: str) -> None:
    graph, plan = tiny
    bad = copy.deepcopy(plan)
    if edit == "cut":
        bad.layers = bad.layers[:10]
    elif edit == "twice":
        bad.layers.append(bad.layers[0])
    elif edit == "uneven":  # conv_out's 3 output channels
        next(layer for layer in bad.layers if layer.id == "conv_out").splits.update(c_out=2)
    else:
        bad.layers[0].splits["bogus_dim"] = 2
    with pytest.raises(PlanMismatch, match=message):
        check_model(bad, graph)


def test_a_factor_that_does_not_fit_the_world_is_refused(tiny) -> None:
    graph, plan = tiny
    bad = copy.deepcopy(plan)
    conv = next(layer for layer in bad.layers if layer.op == "conv")
    conv.splits = {"n": 1, "c_out": 3}
    with pytest.raises(PlanNotRunnable, match="uses 3 of 2 ranks"):
        layer_layouts(bad, graph)


def test_a_plan_for_a_factory_never_imports_it(tiny, tmp_path, monkeypatch) -> None:
    """A plan naming `module:factory` is refused unless the command line names the factory; loading and checking
    the plan imports nothing (the module would leave a mark)."""
    _, plan = tiny
    marker = tmp_path / "imported"
    (tmp_path / "planted_model.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef make():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = plan.to_dict()
    data["model"] = "planted_model:make"
    (tmp_path / "plan.json").write_text(json.dumps(data))
    loaded = Plan.load(tmp_path / "plan.json")
    with pytest.raises(PaseError, match="never makes pase import code"):
        job_settings(loaded, None, None)
    assert not marker.exists() and "planted_model" not in sys.modules
    assert job_settings(loaded, "planted_model:make", None) == ("planted_model:make", plan.batch)
