"""Pool metadata by column and row group (dsdm.pool.Pool.column / value_counts / codes): results equal a whole-table
reference, and only the row groups (and the one column) a read needs are decoded: every other column chunk of
meta.parquet is overwritten with noise and the read still succeeds, while a read that needs the noise fails.

Run: pytest tests/test_pool_meta.py
"""

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dsdm.pool
from dsdm import selections
from dsdm.pool import Pool, PoolWriter

ROWS, GROUP = 5_500, 1_000  # six row groups, the last one short
SOURCES = ["web", "books", "code", "Zed", "äpfel", "10", "9"]


@pytest.fixture
def pool(tmp_path, monkeypatch):
    """A pool built by the real PoolWriter with small row groups, a skewed `source` and a `genre` with nulls."""
    monkeypatch.setattr(dsdm.pool, "META_BATCH_ROWS", GROUP)
    rng = np.random.default_rng(0)
    w = PoolWriter(tmp_path / "pool", vocab_size=50, extra_meta_columns={"genre": pa.string()})
    for i in range(ROWS):
        source = SOURCES[min(int(rng.exponential(1.5)), len(SOURCES) - 1)]
        genre = None if i % 11 == 0 else ["news", "fiction"][i % 2]
        w.add(rng.integers(0, 50, size=1 + i % 5), doc_id=f"doc{i}", source=source, genre=genre)
    return Pool(w.close({"seq_len": 8, "mode": "document", "eos_id": 0}, config={"test": True}))


def _reference(pool, name):
    return pq.read_table(pool.path / "meta.parquet").column(name)


def test_writer_bounds_row_groups(pool):
    md = pq.ParquetFile(pool.path / "meta.parquet").metadata
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [GROUP] * 5 + [500]
    assert pool.meta_columns == ["example_id", "doc_id", "source", "length", "content_hash", "genre"]


@pytest.mark.parametrize("name", ["source", "doc_id", "length", "genre"])
def test_column_for_rows_equals_full_table(pool, name):
    ref = _reference(pool, name)
    rng = np.random.default_rng(1)
    for rows in (
        rng.integers(0, ROWS, size=700),  # any order, repeats
        np.sort(rng.choice(ROWS, size=300, replace=False)),
        np.array([ROWS - 1, 0, 999, 1000, 1000]),  # row group edges
        range(2_100, 3_050),  # a row range across two row groups
        np.zeros(0, dtype=np.int64),
    ):
        got = pool.column(name, rows)
        assert got.type == ref.type and got.to_pylist() == ref.take(pa.array(np.asarray(rows, np.int64))).to_pylist()
    assert pool.column(name).to_pylist() == ref.to_pylist()


def test_value_counts_and_composition_equal_counter(pool):
    sources = _reference(pool, "source").to_pylist()
    genres = _reference(pool, "genre").to_pylist()
    rng = np.random.default_rng(2)
    idx = np.sort(rng.choice(ROWS, size=1_234, replace=False))
    want = Counter(sources[i] for i in idx)
    assert pool.value_counts("source", idx) == dict(sorted(want.items()))
    assert selections.composition(pool, idx) == dict(sorted(want.items()))
    assert list(pool.value_counts("source", idx)) == sorted(want)
    assert pool.value_counts("source") == dict(sorted(Counter(sources).items()))
    assert pool.value_counts("genre") == dict(sorted(Counter(str(g) for g in genres).items()))  # nulls as "None"
    assert pool.value_counts("source", np.zeros(0, dtype=np.int64)) == {} == selections.composition(pool, idx[:0])


def test_codes_sort_like_the_string_labels(pool):
    for name in ("source", "genre", "length"):
        labels_ref = np.asarray(_reference(pool, name).to_pylist(), dtype=object).astype(str)  # the old callers' form
        codes, labels = pool.codes(name)
        assert codes.dtype == np.int32 and labels == sorted(set(labels_ref.tolist()))
        assert np.array_equal(np.asarray(labels)[codes], labels_ref)
        # the grouping every caller (balanced_top_k, lds_by_group) derives with np.unique is unchanged
        assert np.array_equal(np.unique(codes, return_inverse=True)[1], np.unique(labels_ref, return_inverse=True)[1])
    rows = np.array([4_000, 3, 3, 5_499])
    codes, labels = pool.codes("source", rows)
    assert [labels[c] for c in codes] == _reference(pool, "source").take(pa.array(rows)).to_pylist()


def _spoil_all_but(path: Path, keep: set[tuple[int, str]]) -> None:
    """Overwrite every column chunk of a Parquet file with noise except the (row group, column) pairs in `keep`."""
    md = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(3)
    for g in range(md.num_row_groups):
        for j in range(md.num_columns):
            chunk = md.row_group(g).column(j)
            if (g, chunk.path_in_schema) in keep:
                continue
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            size = chunk.total_compressed_size
            data[start : start + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_reads_touch_only_the_needed_row_groups_of_one_column(pool):
    meta = pool.path / "meta.parquet"
    ref = _reference(pool, "source")
    rows = np.array([2_500, 2_001, 4_999, 4_000, 2_999])  # row groups 2 and 4 only
    _spoil_all_but(meta, {(2, "source"), (4, "source")})
    spoiled = Pool(pool.path)
    assert spoiled.column("source", rows).to_pylist() == ref.take(pa.array(rows)).to_pylist()
    assert spoiled.value_counts("source", rows) == dict(sorted(Counter(ref.take(pa.array(rows)).to_pylist()).items()))
    codes, labels = spoiled.codes("source", range(4_000, 5_000))
    assert [labels[c] for c in codes] == ref[4_000:5_000].to_pylist()
    # the noise is real: any read that needs another row group or column fails
    with pytest.raises(OSError):
        spoiled.column("source", [1_999])
    with pytest.raises(OSError):
        spoiled.column("doc_id", rows)
    with pytest.raises(OSError):
        spoiled.meta


def test_bad_column_or_rows_fail_loudly(pool):
    with pytest.raises(KeyError, match="meta.parquet has no column 'lang'"):
        pool.column("lang", [0])
    with pytest.raises(IndexError, match=r"meta rows must lie in \[0, 5500\)"):
        pool.value_counts("source", [ROWS])
    with pytest.raises(ValueError, match="1-D index array"):
        pool.column("source", np.zeros((2, 2), dtype=np.int64))


def test_library_code_never_reads_the_whole_meta_table():
    """Pool.meta loads every column of every row: only tests and notebooks may call it."""
    root = Path(dsdm.pool.__file__).parent
    uses = [
        f"{path.relative_to(root)}:{n}"
        for path in sorted(root.rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\.meta\b(?!_)", line) and path.name != "pool.py"
    ]
    assert uses == []
