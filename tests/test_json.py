from __future__ import annotations

import json

import pytest

from pase.graph import LayerGraph, extract_model


def test_round_trip(tmp_path) -> None:
    graph = extract_model("unet-tiny", 2)
    path = tmp_path / "sub" / "g.json"
    graph.to_json(path)
    loaded = LayerGraph.from_json(path)
    assert list(loaded.layers()) == list(graph.layers())
    assert loaded.graph.number_of_edges() == graph.graph.number_of_edges()
    assert loaded.meta["flops_fwd"] == graph.meta["flops_fwd"]
    assert [p.name for p in path.parent.iterdir()] == ["g.json"]  # no temp file left behind


def test_rejects_other_files_and_versions(tmp_path) -> None:
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ValueError, match="not a pase layer graph"):
        LayerGraph.from_json(path)
    path.write_text(json.dumps({"schema": "pase.layer_graph", "schema_version": 99}))
    with pytest.raises(ValueError, match="re-run"):
        LayerGraph.from_json(path)


def test_graph_cache_hits_and_misses(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PASE_CACHE_DIR", str(tmp_path))
    first = extract_model("unet-tiny", 2, use_cache=True)
    assert "cached" not in first.meta
    again = extract_model("unet-tiny", 2, use_cache=True)
    assert again.meta["cached"].startswith(str(tmp_path))
    assert list(again.layers()) == list(first.layers())
    other = extract_model("unet-tiny", 4, use_cache=True)  # one entry serves every batch
    assert other.meta["cached"] and other.meta["rescaled_from_batch"] == 2 and other.batch == 4
    assert len(list((tmp_path / "graphs").glob("*.json"))) == 1
    extract_model("unet-tiny", 4, use_cache=True, input_shapes={"sample": (4, 3, 32, 32)})
    assert len(list((tmp_path / "graphs").glob("*.json"))) == 2  # overrides get entries of their own
    for entry in (tmp_path / "graphs").glob("*.json"):
        entry.write_text("{broken")
    extract_model("unet-tiny", 2, use_cache=True)  # a corrupt entry is captured again, not an error
