"""The tokenized, memory-mapped candidate pool: the store every later stage reads.

Layout of a pool directory (written by `PoolWriter`, read by `Pool`):

    pool.json      manifest: format, counts, token dtype, seq_len, mode, eos id, vocab size, tokenizer file,
                   input fingerprints, skip counts, the build config, dsdm version, content fingerprint
    tokens.bin     every example's tokens back to back, one flat array (uint16 if the vocabulary fits, else uint32)
    offsets.npy    (N+1,) int64: example i is tokens[offsets[i]:offsets[i+1]]
    meta.parquet   one row per example: example_id, doc_id, source, length, content_hash (+ kept input columns)
                   in row groups of META_BATCH_ROWS rows; read by column and row group, never whole
    tokenizer.json the tokenizer that produced the ids (Hugging Face `tokenizers` format)
    _done.json     completion marker, written last: a directory without it is not a pool

Example i is a 1-D token array of length <= seq_len. Batches are right-padded with `mask` False on padding.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dsdm.io import DONE_FILE, atomic_path, mark_done, read_json, write_json

POOL_FORMAT = "dsdm-pool/1"
META_BATCH_ROWS = 65_536


def token_dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def pad_batch(rows: list[np.ndarray], pad_to: int | None = None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad 1-D token arrays into tokens (B, T) int64 and mask (B, T) bool (True = real token)."""
    width = max((len(r) for r in rows), default=0) if pad_to is None else pad_to
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for b, row in enumerate(rows):
        n = min(len(row), width)
        tokens[b, :n] = row[:n]
        mask[b, :n] = True
    return tokens, mask


class Pool:
    """Read-only view of a pool directory. len(pool), pool[i] -> (L_i,) token array (a memmap view);
    pool.column(name, rows), pool.value_counts(name, rows), pool.codes(name) read metadata by column and row group."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / DONE_FILE).exists():
            raise FileNotFoundError(
                f"{self.path} is not a finished dsdm pool (no {DONE_FILE}); build one with `dsdm pool build`"
            )
        self.manifest: dict[str, Any] = read_json(self.path / "pool.json")
        if self.manifest.get("format") != POOL_FORMAT:
            raise ValueError(f"{self.path}/pool.json: format {self.manifest.get('format')!r}, expected {POOL_FORMAT}")
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=self.manifest["token_dtype"], mode="r")
        self.offsets = np.load(self.path / "offsets.npy", mmap_mode="r")

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for a pool of {len(self)}")
        i = i % len(self)
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __repr__(self) -> str:
        return f"Pool({str(self.path)!r}, examples={len(self)}, tokens={self.num_tokens}, seq_len={self.seq_len})"

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def fingerprint(self) -> str:
        """sha256 over the token ids and offsets: identifies the pool's content, not its path."""
        return str(self.manifest["fingerprint"])

    @cached_property
    def lengths(self) -> np.ndarray:
        """(N,) int64 tokens per example."""
        return np.diff(np.asarray(self.offsets))

    @cached_property
    def _meta_footer(self) -> pq.FileMetaData:
        """The meta.parquet footer (schema and row groups); no rows are read."""
        return pq.read_metadata(self.path / "meta.parquet")

    @cached_property
    def _meta_starts(self) -> np.ndarray:
        """(G+1,) int64: the first row of each meta.parquet row group, then the row count."""
        sizes = [self._meta_footer.row_group(g).num_rows for g in range(self._meta_footer.num_row_groups)]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def meta_columns(self) -> list[str]:
        """Names of the metadata columns, from the Parquet footer."""
        return self._meta_footer.schema.to_arrow_schema().names

    @property
    def meta(self) -> pa.Table:
        """The whole metadata table in memory, for tests and small pools. Library code uses `column`,
        `value_counts` and `codes`, which hold one column of one row group at a time (plus their result)."""
        return pq.read_table(self.path / "meta.parquet")

    def column(self, name: str, rows=None) -> pa.ChunkedArray:
        """Metadata column `name`, for every row or for `rows` (an int index array or a range, in that order,
        repeats allowed). Reads only that column of the row groups holding those rows."""
        pieces = list(self._meta_pieces(name, rows))
        if rows is None:
            return pa.chunked_array([v for _, v in pieces], type=self._meta_type(name))
        if not pieces:
            return pa.chunked_array([], type=self._meta_type(name))
        positions = np.concatenate([p for p, _ in pieces])  # (n,) where each value of `values` goes
        values = pa.concat_arrays([v for _, v in pieces])
        inverse = np.empty_like(positions)
        inverse[positions] = np.arange(positions.size)
        return pa.chunked_array([values.take(pa.array(inverse))])

    def value_counts(self, name: str, rows=None) -> dict[str, int]:
        """{str(value): count} of column `name` over every row or over `rows`, sorted by key. Streams one row group
        at a time; only the distinct values of each become Python strings (str(None) = "None" for nulls)."""
        counts: Counter[str] = Counter()
        for _, values in self._meta_pieces(name, rows):
            for c in pc.value_counts(values).to_pylist():
                counts[str(c["values"])] += int(c["counts"])
        return dict(sorted(counts.items()))

    def codes(self, name: str, rows=None) -> tuple[np.ndarray, list[str]]:
        """(codes (n,) int32, labels) with labels[codes[i]] == str(column `name` at row i, or rows[i]) and labels
        sorted: the integer codes sort like the string labels, so np.unique-based grouping is unchanged."""
        n = len(self) if rows is None else len(rows)
        codes = np.zeros(n, dtype=np.int32)
        first_seen: dict[str, int] = {}  # label -> provisional code, in order of first appearance
        start = 0
        for positions, values in self._meta_pieces(name, rows):
            enc = pc.dictionary_encode(values, null_encoding="encode")
            ids = [first_seen.setdefault(str(v), len(first_seen)) for v in enc.dictionary.to_pylist()]
            piece = np.asarray(ids, dtype=np.int32)[enc.indices.to_numpy(zero_copy_only=False)]
            if positions is None:
                codes[start : start + len(piece)] = piece
                start += len(piece)
            else:
                codes[positions] = piece
        labels = sorted(first_seen)
        rank = {label: r for r, label in enumerate(labels)}
        remap = np.asarray([rank[label] for label in first_seen], dtype=np.int32)
        return (remap[codes] if remap.size else codes), labels

    def _meta_type(self, name: str) -> pa.DataType:
        return self._meta_footer.schema.to_arrow_schema().field(name).type

    def _meta_pieces(self, name: str, rows=None) -> Iterator[tuple[np.ndarray | None, pa.Array]]:
        """(positions, values) per meta.parquet row group that `rows` touches, reading column `name` only.

        rows None: every row group in order, positions None. rows an index array (n,): values[j] is the column at
        rows[positions[j]], and the positions of all pieces together are 0..n-1 once each."""
        if name not in self.meta_columns:
            raise KeyError(f"{self.path}/meta.parquet has no column {name!r}; it has {self.meta_columns}")
        pf = pq.ParquetFile(self.path / "meta.parquet", metadata=self._meta_footer)
        starts = self._meta_starts
        if rows is None:
            for g in range(starts.size - 1):
                yield None, pf.read_row_group(g, columns=[name]).column(0).combine_chunks()
            return
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"meta rows must be a 1-D index array, got shape {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"meta rows must lie in [0, {len(self)}); got {rows.min()}..{rows.max()}")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        group = np.searchsorted(starts, ordered, side="right") - 1  # (n,) row group of each sorted row
        cuts = np.flatnonzero(np.diff(group)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, rows.size]) if rows.size else ():
            g = int(group[lo])
            values = pf.read_row_group(g, columns=[name]).column(0)
            yield order[lo:hi], values.take(pa.array(ordered[lo:hi] - starts[g])).combine_chunks()

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / self.manifest.get("tokenizer_file", "tokenizer.json")))

    def decode(self, i: int) -> str:
        return self.tokenizer.decode(self[i].tolist(), skip_special_tokens=False)

    def batch(self, indices, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Examples `indices` as tokens (B, T) int64 and mask (B, T) bool, right-padded to pad_to or the longest."""
        return pad_batch([self[int(i)] for i in indices], pad_to=pad_to)

    def iter_batches(
        self, batch_size: int, indices=None, pad_to: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (indices (B,), tokens (B, T), mask (B, T)) over `indices` (default: the whole pool) in order."""
        indices = np.arange(len(self), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        for start in range(0, indices.shape[0], batch_size):
            idx = indices[start : start + batch_size]
            tokens, mask = self.batch(idx, pad_to=pad_to)
            yield idx, tokens, mask


class PoolWriter:
    """Stream examples into a new pool directory with bounded memory; `close()` publishes it.

    Everything is written under `<out>/.building/` and moved into place by close(); `_done.json` comes last, so an
    interrupted build never looks finished. Meta rows are flushed to Parquet every META_BATCH_ROWS rows, one row
    group per flush, so `Pool.column(name, rows)` can skip the row groups it does not need; offsets are streamed to
    a raw file and converted to .npy at the end.
    """

    def __init__(self, out_dir: str | Path, vocab_size: int, extra_meta_columns: dict[str, pa.DataType] | None = None):
        self.out_dir = Path(out_dir)
        self.build_dir = self.out_dir / ".building"
        if self.build_dir.exists():
            shutil.rmtree(self.build_dir)  # a previous interrupted build: start over
        self.build_dir.mkdir(parents=True)
        self.dtype = token_dtype_for(vocab_size)
        self.vocab_size = vocab_size
        self._tokens = open(self.build_dir / "tokens.bin", "wb")
        self._offsets = open(self.build_dir / "offsets.raw", "wb")
        self._offsets.write(np.zeros(1, dtype=np.int64).tobytes())
        self._hash = hashlib.sha256()
        self.num_examples = 0
        self.num_tokens = 0
        self.schema = pa.schema(
            [
                ("example_id", pa.int64()),
                ("doc_id", pa.string()),
                ("source", pa.string()),
                ("length", pa.int32()),
                ("content_hash", pa.string()),
                *((name, t) for name, t in (extra_meta_columns or {}).items()),
            ]
        )
        self._meta_rows: dict[str, list] = {name: [] for name in self.schema.names}
        self._meta_writer = pq.ParquetWriter(self.build_dir / "meta.parquet", self.schema)

    def add(self, tokens: np.ndarray, doc_id: str, source: str, **extra: Any) -> int:
        """Append one example; returns its index. tokens: 1-D ids < vocab_size."""
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"example from {doc_id} must be a non-empty 1-D token array, got shape {arr.shape}")
        if int(arr.max()) >= self.vocab_size or int(arr.min()) < 0:
            raise ValueError(f"example from {doc_id} has token ids outside [0, {self.vocab_size})")
        raw = arr.astype(self.dtype, copy=False).tobytes()
        self._tokens.write(raw)
        self._hash.update(raw)
        self.num_tokens += arr.size
        self._offsets.write(np.int64(self.num_tokens).tobytes())
        row = {
            "example_id": self.num_examples,
            "doc_id": doc_id,
            "source": source,
            "length": int(arr.size),
            "content_hash": hashlib.sha1(raw).hexdigest()[:16],
            **extra,
        }
        for name in self.schema.names:
            self._meta_rows[name].append(row.get(name))
        self.num_examples += 1
        if len(self._meta_rows["example_id"]) >= META_BATCH_ROWS:
            self._flush_meta()
        return self.num_examples - 1

    def _flush_meta(self) -> None:
        if self._meta_rows["example_id"]:
            table = pa.table(self._meta_rows, schema=self.schema)
            self._meta_writer.write_table(table, row_group_size=META_BATCH_ROWS)  # one row group per flush
            self._meta_rows = {name: [] for name in self.schema.names}

    def close(
        self,
        manifest: dict[str, Any],
        config: dict[str, Any],
        tokenizer_json: str | Path | None = None,
        started: float | None = None,
    ) -> Path:
        """Finish every file, write pool.json, move files into out_dir, then write _done.json. Returns out_dir."""
        self._flush_meta()
        self._meta_writer.close()
        self._tokens.close()
        self._offsets.close()
        raw = np.memmap(self.build_dir / "offsets.raw", dtype=np.int64, mode="r")
        self._hash.update(np.asarray(raw).tobytes())
        with atomic_path(self.build_dir / "offsets.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(raw))
        del raw
        (self.build_dir / "offsets.raw").unlink()
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, self.build_dir / "tokenizer.json")
        full_manifest = {
            "format": POOL_FORMAT,
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "token_dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "tokenizer_file": "tokenizer.json",
            "fingerprint": self._hash.hexdigest(),
            **manifest,
        }
        write_json(self.build_dir / "pool.json", full_manifest)
        for name in os.listdir(self.build_dir):
            os.replace(self.build_dir / name, self.out_dir / name)
        self.build_dir.rmdir()
        mark_done(self.out_dir, config, started=started if started is not None else time.time())
        return self.out_dir
