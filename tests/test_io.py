"""Atomic writes, completion markers and memmap stores.

Run: pytest tests/test_io.py
"""

import mmap
import shutil

import numpy as np
import pytest

from dsdm.io import (
    atomic_path,
    is_done,
    mark_done,
    npy_header,
    open_memmap,
    output_hashes,
    pwrite_rows,
    read_json,
    write_json,
)


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
    assert not is_done(tmp_path, {"a": 1, "b": {"c": 2}}, force=True)  # --force redoes a matching record too
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


def test_pwrite_rows_changes_exactly_its_rows_bytes_even_mid_page(tmp_path):
    """Rows [a, b) of 12-byte rows start and end inside pages: the file differs from its copy in exactly the bytes
    header + 12 a .. header + 12 b, which hold the rows' bytes; a fresh sparse store gets no other blocks."""
    path = tmp_path / "x.npy"
    n, d, a, b = 4000, 3, 400, 1000
    open_memmap(path, (n, d), np.float32)  # sparse: only the header is written
    _, _, offset = npy_header(path)
    lo, hi = offset + 12 * a, offset + 12 * b
    assert lo % mmap.PAGESIZE and hi % mmap.PAGESIZE and lo // mmap.PAGESIZE < hi // mmap.PAGESIZE
    rng = np.random.default_rng(0)

    blocks = path.stat().st_blocks
    new = rng.standard_normal((b - a, d)).astype(np.float32)
    pwrite_rows(path, a, new)
    pages = (hi - 1) // mmap.PAGESIZE - lo // mmap.PAGESIZE + 1
    assert (path.stat().st_blocks - blocks) * 512 <= pages * mmap.PAGESIZE  # no zero-fill of the rest
    got = path.read_bytes()
    assert len(got) == offset + 12 * n and got[lo:hi] == new.tobytes()
    assert not any(got[offset:lo]) and not any(got[hi:]) and np.load(path, mmap_mode="r").shape == (n, d)

    # every row non-zero first, so a clobbered neighbour would show
    pwrite_rows(path, 0, rng.standard_normal((n, d)).astype(np.float32) + 10)
    shutil.copyfile(path, tmp_path / "copy.npy")
    new = rng.standard_normal((b - a, d)).astype(np.float32)
    pwrite_rows(path, a, new)
    before, after = (tmp_path / "copy.npy").read_bytes(), path.read_bytes()
    assert len(after) == len(before) and after[:lo] == before[:lo] and after[hi:] == before[hi:]
    assert after[lo:hi] == new.tobytes() and after[lo:hi] != before[lo:hi]
    assert np.load(path)[a:b].tobytes() == new.tobytes()  # what `store[a:b] = new` through a memmap would read


def test_pwrite_rows_refuses_rows_of_another_dtype_or_shape_naming_the_file(tmp_path):
    path = tmp_path / "feats.npy"
    open_memmap(path, (10, 3), np.float16)
    before = path.read_bytes()
    for rows in (np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float16), np.zeros(3, np.float16)):
        with pytest.raises(ValueError, match="feats.npy: holds rows of float16 \\(3,\\)"):
            pwrite_rows(path, 0, rows)
    with pytest.raises(ValueError, match="feats.npy: rows 9-11 are outside its 10 rows"):
        pwrite_rows(path, 9, np.zeros((2, 3), np.float16))
    assert path.read_bytes() == before


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
