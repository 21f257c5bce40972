"""Bad input gets an error that names what is wrong and what to do, never a deep traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pase.errors import GraphCaptureError, InputShapeError, UnknownModelError
from pase.graph import extract, extract_model


def test_unknown_model_lists_the_zoo() -> None:
    with pytest.raises(UnknownModelError) as info:
        extract_model("sd99-unet")
    for name in ("unet-tiny", "ddpm-cifar10", "sd15-unet", "sdxl-unet", "pase-unet"):
        assert name in str(info.value)


def test_wrong_zoo_input_shape_names_input_and_expectation() -> None:
    with pytest.raises(InputShapeError) as info:
        extract_model("sd15-unet", 2, input_shapes={"encoder_hidden_states": (2, 77, 1024)})
    message = str(info.value)
    assert "encoder_hidden_states" in message and "(B, 77, 768)" in message and "(2, 77, 1024)" in message


def test_wrong_user_input_shape_names_module_and_input() -> None:
    from user_models import TinyConvNet

    with torch.device("meta"):
        model = TinyConvNet()
    with pytest.raises(InputShapeError) as info:
        extract(model, (torch.zeros(2, 4, 8, 8, device="meta"),))
    message = str(info.value)
    assert "'x'" in message and "'stem'" in message and "3 channels" in message


def test_untraceable_model_names_module_and_op() -> None:
    from user_models import DataDependentNet

    with torch.device("meta"):
        model = DataDependentNet()
    with pytest.raises(GraphCaptureError) as info:
        extract(model, (torch.zeros(2, 3, 8, 8, device="meta"),))
    message = str(info.value)
    assert "export" in message and "symbolic_trace" in message
    assert "module 'gate' (Gate)" in message
    assert "if x.mean() > 0" in message
    assert "torch.where" in message


def test_user_model_without_shapes_is_told_how() -> None:
    with pytest.raises(InputShapeError, match="--input-shape"):
        extract_model("user_models:tiny_convnet")


def run_cli(*args: str, tests_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tests_dir), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "pase", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_reports_errors_in_one_line(tests_dir) -> None:
    result = run_cli("graph", "--model", "user_models:tiny_convnet", "--input-shape", "2,4,8,8",
                     tests_dir=tests_dir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr and "'stem'" in result.stderr


def test_cli_graph_writes_json_readable_without_pase(tests_dir, tmp_path) -> None:
    out = tmp_path / "g.json"
    result = run_cli("graph", "--model", "user_models:tiny_convnet", "--input-shape", "2,3,8,8", "--json", str(out),
                     tests_dir=tests_dir)
    assert result.returncode == 0, result.stderr
    assert "stem" in result.stdout and "total" in result.stdout
    import json

    import networkx as nx

    data = json.loads(out.read_text())
    assert data["schema_version"] == 1
    graph = nx.node_link_graph(data, directed=True, multigraph=True, edges="edges")
    assert graph.nodes["stem"]["dims"]["c_out"] == 8
    assert {"op", "module", "dims", "flops_fwd", "flops_bwd", "param_bytes", "out_bytes"} <= set(graph.nodes["head"])


@pytest.mark.parametrize("args", [
    ["plan", "--model", "unet-tiny", "--gap", "nan"],
    ["plan", "--model", "unet-tiny", "--memory-fraction", "nan"],
    ["train", "--model", "unet-tiny", "--data", "digits", "--lr", "inf"],
    ["train", "--model", "unet-tiny", "--data", "digits", "--weight-decay", "nan"],
    ["sample", "--model", "unet-tiny", "--tol", "nan"],
    ["sample-plan", "--model", "unet-tiny", "--margin", "nan"],
    ["whatif", "--model", "unet-tiny", "--samples", "inf"],
    ["train", "--model", "unet-tiny", "--data", "digits", "--seed", "-1"],
    ["train", "--model", "unet-tiny", "--data", "digits", "--image-size", "0"],
    ["train", "--model", "unet-tiny", "--data", "digits", "--image-size", "100000"],
])
def test_non_finite_or_out_of_range_numbers_are_usage_errors(args: list[str]) -> None:
    from typer.testing import CliRunner

    from pase.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and f"Invalid value for '{args[-2]}'" in result.output  # (a range, or not finite)


def test_an_image_size_the_unet_cannot_halve_is_refused() -> None:
    from typer.testing import CliRunner

    from pase.cli import app
    from pase.errors import PaseError

    result = CliRunner().invoke(app, ["train", "--model", "ddpm-cifar10", "--data", "digits", "--image-size", "12",
                                      "--steps", "1", "--no-progress"])
    assert isinstance(result.exception, PaseError) and "must be a multiple of 8" in str(result.exception)


def test_nan_merge_weights_are_refused() -> None:
    from typer.testing import CliRunner

    from pase.cli import app
    from pase.errors import PaseError

    result = CliRunner().invoke(app, ["finetune", "--strategy", "deme", "--merge-weights", "nan,nan", "--steps", "1"])
    assert isinstance(result.exception, PaseError) and "must be finite" in str(result.exception)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    """A learning rate that blows the weights up: step 1's checkpoint stays, the run stops at the first NaN loss with
    one line, and no final model is written."""
    from typer.testing import CliRunner

    from pase.cli import app
    from pase.errors import PaseError

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", "unet-tiny", "--data", "digits", "--image-size", "16",
                                      "--steps", "4", "--batch", "4", "--lr", "1e30", "--checkpoint-every", "1",
                                      "--out", str(out), "--no-progress"])
    assert isinstance(result.exception, PaseError) and "the loss is nan" in str(result.exception)
    assert not (out / "model.safetensors").exists()
    saved = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
    assert saved and all("nan" not in name for name in saved)


def test_huge_batches_are_refused_and_divisors_stay_fast() -> None:
    """`--batch 99999999999999999999` used to loop over every number up to it: now a usage error, and the largest
    batch allowed (2^31) has its divisors (whatif's micro-step choices) at once."""
    from typer.testing import CliRunner

    from pase.cli import app
    from pase.planning.whatif import divisors_of

    for command in ("whatif", "plan"):
        result = CliRunner().invoke(app, [command, "--model", "unet-tiny", "--batch", "99999999999999999999"])
        assert result.exit_code == 2 and "Invalid value for '--batch'" in result.output
    assert divisors_of(12) == [1, 2, 3, 4, 6, 12] and divisors_of(49) == [1, 7, 49]
    assert len(divisors_of(2**31)) == 32


def _crafted_safetensors() -> dict[str, bytes]:
    """Files that claim to be safetensors and are not quite: each must give one CheckpointError line."""
    import json
    import struct

    def file(header: object, data: bytes = b"") -> bytes:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    good = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    return {"empty": b"", "short": b"\x01\x02", "huge header length": struct.pack("<Q", 2**62) + b"{}",
            "not json": struct.pack("<Q", 4) + b"oops", "no offsets": file({"w": {"dtype": "F32", "shape": [2]}}),
            "offsets past the end": file({"w": {**good, "data_offsets": [0, 4096]}}, b"\0" * 8),
            "unknown dtype": file({"w": {**good, "dtype": "F99"}}, b"\0" * 8),
            "shape and size disagree": file({"w": {**good, "shape": [3]}}, b"\0" * 8),
            "header a list": file([1, 2]), "metadata not strings": file({"__metadata__": {"a": 1}})}


def test_crafted_weight_files_give_one_line(tmp_path) -> None:
    """--init, checkpoints and TuneQDM scales are read through the safetensors library: whatever a file claims, a
    CheckpointError names the file (no MemoryError, KeyError or struct error)."""
    from pase.weights import CheckpointError, load_weights

    for name, content in _crafted_safetensors().items():
        path = tmp_path / f"{name.replace(' ', '-')}.safetensors"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=f"cannot read {path}"):
            load_weights(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(tmp_path)  # a folder
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(tmp_path / "missing.safetensors")


def test_weights_read_in_chunks_equal_the_file(tmp_path, monkeypatch) -> None:
    from safetensors.torch import save_file

    from pase import weights

    state = {f"w{i}": torch.randn(64, 33) for i in range(7)} | {"half": torch.randn(5).half(), "empty": torch.zeros(0)}
    save_file(state, tmp_path / "w.safetensors", metadata={"note": "x"})
    monkeypatch.setattr(weights, "READ_CHUNK_BYTES", 3 * 64 * 33 * 4)  # reopen every 3 tensors
    metadata, tensors = weights.read_safetensors(tmp_path / "w.safetensors")
    loaded = dict(tensors)
    assert metadata == {"note": "x"} and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state)


@pytest.mark.parametrize(("reference", "expected"), [
    ("user_models:factory_that_raises", "model factory 'user_models:factory_that_raises' raised KeyError: 'missing "
                                        "weight' (set PASE_DEBUG=1"),
    ("user_models:factory_with_arguments", "needs arguments (width) but pase calls it with none"),
    ("user_models:NOT_CALLABLE", "is not callable (it is int 3)"),
    ("user_models:not_a_module", "returned str, not a torch.nn.Module"),
    ("user_models:no_such_factory", "module 'user_models' has no attribute 'no_such_factory'"),
    ("no_such_module_anywhere:factory", "ModuleNotFoundError: No module named 'no_such_module_anywhere'"),
])
def test_user_factory_errors_are_one_line_naming_the_factory(reference: str, expected: str) -> None:
    from pase.errors import UserCodeError

    with pytest.raises(UserCodeError) as info:
        extract_model(reference, 2, user_input_shapes=[(2, 3, 8, 8)])
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_user_modules_that_do_not_import_are_named(tmp_path, monkeypatch) -> None:
    from pase.errors import UserCodeError

    (tmp_path / "broken_syntax.py").write_text("def factory(:\n    pass\n")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserCodeError, match=r"SyntaxError in .*broken_syntax.py line 1"):
        extract_model("broken_syntax:factory", 2, user_input_shapes=[(2, 3, 8, 8)])
    with pytest.raises(UserCodeError, match="importing 'raises_on_import' .* RuntimeError: no GPU here"):
        extract_model("raises_on_import:factory", 2, user_input_shapes=[(2, 3, 8, 8)])


def test_pase_debug_shows_the_user_code_traceback(tests_dir, monkeypatch) -> None:
    args = ("graph", "--model", "user_models:factory_that_raises", "--input-shape", "2,3,8,8")
    quiet = run_cli(*args, tests_dir=tests_dir)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert "raised KeyError: 'missing weight'" in quiet.stderr
    monkeypatch.setenv("PASE_DEBUG", "1")
    loud = run_cli(*args, tests_dir=tests_dir)
    assert loud.returncode == 2 and "Traceback" in loud.stderr
    assert 'raise KeyError("missing weight")' in loud.stderr  # the user's own line, from the cause's traceback


def test_a_decompression_bomb_in_an_image_folder_is_named(tmp_path) -> None:
    """A 30000x30000 PNG of a few kB: PIL refuses to decode it, and pase names the file instead of a traceback."""
    import struct
    import zlib

    from pase.train.data import DataError, image_folder

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 90001)) + \
        chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(DataError, match=r"cannot read image .*bomb.png: .*decompression bomb"):
        image_folder(tmp_path, 8)


@pytest.mark.parametrize("args", [
    ["hw", "calibrate", "--out", "{folder}"],  # refused before minutes of measuring
    ["hw", "calibrate", "--out", "{file}/profile.json"],
    ["plan", "--model", "unet-tiny", "--json", "{folder}"],
    ["graph", "--model", "unet-tiny", "--json", "{file}/graph.json"],
    ["whatif", "--model", "unet-tiny", "--html", "{folder}"],
    ["hw", "probe", "--save", "{folder}"],
])
def test_output_paths_that_cannot_be_written_are_refused_first(tmp_path, args: list[str]) -> None:
    from typer.testing import CliRunner

    from pase.cli import app
    from pase.errors import PaseError

    (tmp_path / "a-file").write_text("x")
    filled = [a.format(folder=tmp_path, file=tmp_path / "a-file") for a in args]
    result = CliRunner().invoke(app, filled)
    assert isinstance(result.exception, PaseError), result.output
    assert "is a folder" in str(result.exception) or "is a file, not a folder" in str(result.exception)
