"""Atomic writes, completion markers and memmap stores.

Run: pytest tests/test_io.py
"""

import numpy as np
import pytest

from dsdm.io import atomic_path, is_done, mark_done, open_memmap, output_hashes, read_json, write_json


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_done_marker_matches_config_and_names_changed_keys(tmp_path):
    assert not is_done(tmp_path, {"a": 1})
    mark_done(tmp_path, {"a": 1, "b": {"c": 2}})
    assert is_done(tmp_path, {"a": 1, "b": {"c": 2}})
    with pytest.raises(ValueError, match="changed: b.c"):
        is_done(tmp_path, {"a": 1, "b": {"c": 3}})
    assert not is_done(tmp_path, {"a": 2, "b": {"c": 2}}, force=True)
    record = read_json(tmp_path / "_done.json")
    assert record["dsdm_version"] and "wall_time_s" in record


def test_open_memmap_creates_reopens_and_refuses_other_shapes(tmp_path):
    mm = open_memmap(tmp_path / "x.npy", (4, 3), np.float32, fill=0)
    mm[1] = 7
    mm.flush()
    del mm
    again = open_memmap(tmp_path / "x.npy", (4, 3), np.float32)
    assert again[1].tolist() == [7, 7, 7] and again[0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="another configuration"):
        open_memmap(tmp_path / "x.npy", (5, 3), np.float32)


def test_write_json_round_trip_numpy_values(tmp_path):
    write_json(tmp_path / "a.json", {"n": np.int64(3), "x": np.float32(0.5), "v": np.arange(2)})
    assert read_json(tmp_path / "a.json") == {"n": 3, "x": 0.5, "v": [0, 1]}


def test_output_hashes_skip_scratch_dot_folders(tmp_path):
    """A killed run's scratch store (e.g. SemDeDup's .semdedup-*) is no output of the stage: the record of the rerun
    hashes what the stage wrote, not the leftover."""
    (tmp_path / "scores.npy").write_bytes(b"s")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.npy").write_bytes(b"a")
    (tmp_path / ".semdedup-x").mkdir()
    (tmp_path / ".semdedup-x" / "emb.npy").write_bytes(b"e" * 100)
    (tmp_path / ".lock").write_bytes(b"")
    assert sorted(output_hashes(tmp_path)) == ["scores.npy", "sub/a.npy"]
