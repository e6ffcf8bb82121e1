from __future__ import annotations

import json

import pytest

from hrnet_core import atomic


def test_write_json_replaces_the_file_whole(tmp_path):
    dest = tmp_path / "sub" / "m.json"
    atomic.write_json(dest, {"a": 1})
    atomic.write_json(dest, {"a": 2})
    assert json.loads(dest.read_text()) == {"a": 2}
    assert [p.name for p in dest.parent.iterdir()] == ["m.json"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_path_keeps_the_old_file_and_no_temp_when_the_writer_fails(tmp_path, exc):
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old")
    with pytest.raises(type(exc)), atomic.atomic_path(dest, ".onnx") as tmp:
        tmp.write_bytes(b"half of the new")
        raise exc
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_atomic_path_replaces_a_directory(tmp_path):
    dest = tmp_path / "paddle"
    dest.mkdir()
    (dest / "stale").write_text("x")
    with atomic.atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "inference.json").write_text("{}")
    assert sorted(p.name for p in dest.iterdir()) == ["inference.json"]


def test_atomic_path_fails_when_nothing_was_written(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic.atomic_path(tmp_path / "x"):
        pass
    assert list(tmp_path.iterdir()) == []
