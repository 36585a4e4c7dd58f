"""Pool store: PoolWriter -> Pool round trip, padding, fingerprint determinism, unfinished builds refused.

Run: pytest tests/test_pool_store.py
"""

import numpy as np
import pytest

from dsdm.pool import Pool, PoolWriter, pad_batch


def _write(path, rows, vocab=300):
    w = PoolWriter(path, vocab_size=vocab)
    for i, r in enumerate(rows):
        w.add(np.asarray(r), doc_id=f"d{i}", source="s" if i % 2 else "t")
    return w.close({"seq_len": 8, "mode": "document", "eos_id": 0}, config={"test": True})


def test_round_trip_and_batches(tmp_path):
    rows = [[1, 2, 3], [4, 5], [299, 7, 8, 9]]
    pool = Pool(_write(tmp_path / "p", rows))
    assert len(pool) == 3 and pool.num_tokens == 9 and pool.tokens.dtype == np.uint16
    assert [pool[i].tolist() for i in range(3)] == rows and pool[-1].tolist() == rows[-1]
    assert pool.lengths.tolist() == [3, 2, 4]
    assert pool.meta.column("source").to_pylist() == ["t", "s", "t"]
    tokens, mask = pool.batch([1, 0])
    assert tokens.tolist() == [[4, 5, 0], [1, 2, 3]] and mask.tolist() == [[True, True, False], [True] * 3]
    batches = list(pool.iter_batches(2))
    assert [b[0].tolist() for b in batches] == [[0, 1], [2]]
    with pytest.raises(IndexError):
        pool[3]


def test_fingerprint_depends_on_content_only(tmp_path):
    a = Pool(_write(tmp_path / "a", [[1, 2], [3]]))
    b = Pool(_write(tmp_path / "b", [[1, 2], [3]]))
    c = Pool(_write(tmp_path / "c", [[1], [2, 3]]))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    for name in ("tokens.bin", "offsets.npy", "meta.parquet", "pool.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name


def test_uint32_for_large_vocab_and_unfinished_pool_refused(tmp_path):
    pool = Pool(_write(tmp_path / "big", [[70000, 1]], vocab=100_000))
    assert pool.tokens.dtype == np.uint32 and pool[0].tolist() == [70000, 1]
    w = PoolWriter(tmp_path / "half", vocab_size=10)
    w.add(np.array([1]), doc_id="x", source="s")
    with pytest.raises(FileNotFoundError, match="not a finished dsdm pool"):
        Pool(tmp_path / "half")


def test_pad_batch_truncates_to_pad_to():
    tokens, mask = pad_batch([np.array([1, 2, 3]), np.array([4])], pad_to=2)
    assert tokens.tolist() == [[1, 2], [4, 0]] and mask.tolist() == [[True, True], [True, False]]
