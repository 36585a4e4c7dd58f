"""Readers: input specs -> files -> documents, with bad input raised or counted. The pool build (dsdm.ingest) consumes
what these yield; nothing here tokenizes or writes.

Inputs (expanded in sorted order, so the same inputs always give the same pool):
    *.jsonl / *.ndjson, optionally .gz or .zst             one JSON object per line (also *.json named explicitly)
    *.parquet, globs, directories of them                   read one record batch at a time (pyarrow)
    a Hugging Face `datasets` save_to_disk directory        its Arrow stream files, one record batch at a time
    *.txt files, or directories of them                     one document per file
The text is read from `text_field` (default `text`). `source` and `doc_id` columns are used when present (default
source: the input's name, i.e. the file stem or the directory name; default doc_id: FILE:LINE or FILE:ROW). Other
scalar columns found by a cheap pre-scan (the schema, or the first META_SCAN_LINES lines of a JSONL file) are kept
as string metadata columns; keys seen only later are counted in pool.json (`meta_keys_not_kept`), not stored.

Bad input (malformed JSON line, missing or non-string text field, non-UTF-8 bytes, NUL bytes, an empty document,
a document over `max_doc_bytes`, a truncated or corrupt .gz/.zst file) goes to one `Errors` object: with
on_error=raise (default) it is a one-line ValueError naming the file, the line or row, and the fix; with
on_error=skip it is counted by reason (and the first few locations per reason), for pool.json. A truncated
compressed file keeps the documents read before the cut and counts the cut once (`truncated_file`).

Every reader streams: memory does not grow with the input size.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import zlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

if TYPE_CHECKING:
    from dsdm.ingest import PoolBuildConfig  # readers use its text_field and max_doc_bytes

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSED = (".gz", ".zst")
STREAM_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError)  # a cut or damaged .gz / .zst
READ_CHUNK = 1 << 16  # compressed bytes read at a time
RESERVED = ("example_id", "doc_id", "source", "length", "content_hash")  # written by PoolWriter itself
META_SCAN_LINES = 100
MAX_EXAMPLES_PER_REASON = 5  # locations of skipped documents kept in pool.json per reason
Doc = tuple[str, str, dict, str]  # (text, doc_id, meta, where); meta holds `source` and the kept scalar columns


# -----------------------------------------------------------------------------
# Bad input: raise or count


class Errors:
    """One place that decides what a bad document does: raise a ValueError, or count it by reason.

    Also counts metadata keys met in JSONL rows but not kept as columns (they were absent from the pre-scan)."""

    def __init__(self, on_error: str = "raise"):
        self.on_error = on_error
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.unkept_keys: Counter = Counter()

    def bad(self, reason: str, where: str, detail: str, fix: str) -> None:
        if self.on_error == "raise":
            raise ValueError(f"{where}: {detail}. {fix}, or use --on-error skip to skip and count such documents")
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < MAX_EXAMPLES_PER_REASON:
            self.examples[reason].append(where)

    def merge(self, other: Errors) -> None:
        """Add the counts of `other`, which read the inputs after these (a Ray worker's file): merged in input order,
        the result is what one Errors reading every file in turn would hold."""
        self.counts.update(other.counts)
        for reason, wheres in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(wheres[: MAX_EXAMPLES_PER_REASON - len(kept)])
        self.unkept_keys.update(other.unkept_keys)


def check_text(text: Any, where: str, field: str, max_bytes: int, errors: Errors) -> bool:
    """True if `text` is a usable document; otherwise report it (raise or count) and return False."""
    if not isinstance(text, str):
        what = "null" if text is None else type(text).__name__
        errors.bad("text_not_string", where, f"field {field!r} is {what}, not a string", "fix the input")
        return False
    if not text.strip():
        errors.bad("empty_document", where, "empty document", "remove it from the input")
        return False
    if "\x00" in text:
        errors.bad("nul_bytes", where, "document contains NUL bytes", "strip them (e.g. tr -d '\\000')")
        return False
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:  # a lone surrogate from a JSON escape such as "\ud800"
        errors.bad("invalid_utf8", where, f"invalid Unicode (lone surrogate) at character {e.start}", "fix the text")
        return False
    if size > max_bytes:
        detail = f"document of {size:,} bytes exceeds max_doc_bytes={max_bytes:,}"
        errors.bad("doc_too_large", where, detail, f"raise it (--set max_doc_bytes={2 * size}) to keep it")
        return False
    return True


def _row_doc(row: dict, text_field: str, default_source: str, doc_id: str, keep: frozenset) -> tuple[str, dict]:
    """(doc_id, meta) from one input row: its `doc_id`/`source` if present, plus the kept scalar columns."""
    source = row.get("source")
    meta = {"source": source if isinstance(source, str) and source else default_source}
    for k in keep:
        v = row.get(k)
        meta[k] = None if v is None else v if isinstance(v, str) else json.dumps(v)
    rid = row.get("doc_id")
    return (str(rid) if rid is not None and rid != "" else doc_id), meta


# -----------------------------------------------------------------------------
# Readers: each yields (text, doc_id, meta, where) and reports bad documents to `errors`


class Cursor:
    """How far reading has got, in bytes on disk: `base` (files before this one) + the current reader's `pos()`.
    Drives the progress bar's ETA."""

    def __init__(self):
        self.base = 0
        self.pos = lambda: 0

    def bytes_read(self) -> int:
        return self.base + self.pos()


def _open_raw(path: Path, cursor: Cursor):
    """Binary line-readable handle for .jsonl / .jsonl.gz / .jsonl.zst; the cursor tracks the on-disk position."""
    fh = open(path, "rb")
    cursor.pos = fh.tell
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=fh, mode="rb"), fh
    if path.suffix == ".zst":
        return io.BufferedReader(ZstdFrames(fh), buffer_size=READ_CHUNK), fh
    return fh, fh


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file (one or more frames) as a raw stream that raises EOFError when the
    file ends inside a frame. zstandard's stream_reader returns a short read there instead, which would make a
    truncated file look complete and the pool silently short."""

    def __init__(self, fh):
        self.fh, self.dctx, self.frame = fh, zstandard.ZstdDecompressor(), None
        self.out, self.at, self.unused = memoryview(b""), 0, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at >= len(self.out):
            data, self.unused = self.unused or self.fh.read(READ_CHUNK), b""
            if not data:
                if self.frame is not None and not self.frame.eof:
                    raise EOFError("zstd stream ended inside a frame")
                return 0
            if self.frame is None or self.frame.eof:
                self.frame = self.dctx.decompressobj()  # the next frame of a multi-frame file
            self.out, self.at = memoryview(self.frame.decompress(data)), 0
            if self.frame.eof:
                self.unused = self.frame.unused_data
        n = min(len(buffer), len(self.out) - self.at)
        buffer[:n] = self.out[self.at : self.at + n]
        self.at += n
        return n


def _stream_error(e: Exception, path: Path, lineno: int, cursor: Cursor, errors: Errors) -> None:
    """Report a compressed file that ends early (EOFError) or does not decode: once per file, after the last whole
    line read. The documents before it stay in the pool."""
    size = path.stat().st_size
    at = f"after line {lineno:,} ({cursor.pos():,} of {size:,} bytes read)"
    if isinstance(e, EOFError):
        detail = f"compressed file is truncated: it ends before its end-of-stream marker, {at}"
        errors.bad("truncated_file", f"{path}", detail, "re-download or re-compress it")
    else:
        detail = f"compressed file is corrupt ({type(e).__name__}: {e}), {at}"
        errors.bad("corrupt_file", f"{path}", detail.replace("\n", " "), "re-download or re-compress it")


def read_jsonl(path: Path, cfg: PoolBuildConfig, errors: Errors, source: str, keep=frozenset(), cursor=None):
    """One JSON object per line; a line longer than the size limit is skipped over without being held in memory."""
    cursor = cursor or Cursor()
    known = keep | {cfg.text_field, "source", "doc_id"}
    limit = 6 * cfg.max_doc_bytes + 65_536  # JSON escapes (\uXXXX) take up to 6 bytes per text byte
    f, raw = _open_raw(path, cursor)
    lineno = 0
    with raw, f:
        try:
            while line := f.readline(limit):
                lineno += 1
                where = f"{path}:{lineno}"
                if len(line) >= limit and not line.endswith(b"\n"):
                    while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass  # drain the rest of the oversized line in 1 MB pieces
                    errors.bad(
                        "doc_too_large",
                        where,
                        f"line longer than {limit:,} bytes (max_doc_bytes={cfg.max_doc_bytes:,})",
                        f"raise max_doc_bytes (--set max_doc_bytes={4 * cfg.max_doc_bytes}) to keep such documents",
                    )
                    continue
                if not line.strip():
                    continue  # a blank line holds no document
                try:
                    row = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    errors.bad("invalid_utf8", where, f"invalid UTF-8 at byte {e.start}", "re-encode the file as UTF-8")
                    continue
                except json.JSONDecodeError as e:
                    errors.bad("malformed_json", where, f"not valid JSON ({e.msg} at column {e.colno})", "fix the line")
                    continue
                if not isinstance(row, dict):
                    detail = f"expected a JSON object, got {type(row).__name__}"
                    errors.bad("malformed_json", where, detail, "write one object per line")
                    continue
                if cfg.text_field not in row:
                    keys = ", ".join(sorted(row)[:10])
                    detail = f"no {cfg.text_field!r} field (keys: {keys})"
                    errors.bad("missing_text_field", where, detail, "name the text field with --text-field")
                    continue
                text = row[cfg.text_field]
                if check_text(text, where, cfg.text_field, cfg.max_doc_bytes, errors):
                    if row.keys() - known:
                        errors.unkept_keys.update(row.keys() - known)
                    doc_id, meta = _row_doc(row, cfg.text_field, source, f"{path.name}:{lineno}", keep)
                    yield text, doc_id, meta, where

        except STREAM_ERRORS as e:
            _stream_error(e, path, lineno, cursor, errors)


def _read_batches(batches, path: Path, cfg: PoolBuildConfig, errors: Errors, source: str, keep, schema):
    """Rows of Arrow record batches (Parquet or a datasets directory) as documents; rows numbered from 0."""
    if cfg.text_field not in schema.names:
        raise ValueError(
            f"{path}: no column {cfg.text_field!r} (columns: {', '.join(schema.names)}); "
            "name the text column with --text-field"
        )
    wanted = keep | {cfg.text_field, "source", "doc_id"}
    row0 = 0
    for batch in batches:
        columns = {name: batch.column(name).to_pylist() for name in batch.schema.names if name in wanted}
        texts = columns[cfg.text_field]
        for i, text in enumerate(texts):
            where = f"{path}: row {row0 + i}"
            if text is None:
                errors.bad("missing_text_field", where, f"{cfg.text_field!r} is null", "fill or drop the row")
                continue
            if check_text(text, where, cfg.text_field, cfg.max_doc_bytes, errors):
                row = {name: col[i] for name, col in columns.items()}
                doc_id, meta = _row_doc(row, cfg.text_field, source, f"{path.name}:{row0 + i}", keep)
                yield text, doc_id, meta, where
        row0 += batch.num_rows


def read_parquet(path: Path, cfg: PoolBuildConfig, errors: Errors, source: str, keep=frozenset(), cursor=None):
    """A Parquet file, one row group at a time."""
    pf = pq.ParquetFile(path)
    size, groups = path.stat().st_size, max(pf.num_row_groups, 1)
    done = [0]
    if cursor is not None:
        cursor.pos = lambda: size * done[0] // groups

    columns = [c for c in pf.schema_arrow.names if c in keep or c in (cfg.text_field, "source", "doc_id")]

    def batches():
        for g in range(pf.num_row_groups):
            yield from pf.iter_batches(batch_size=4096, row_groups=[g], columns=columns)
            done[0] = g + 1

    yield from _read_batches(batches(), path, cfg, errors, source, keep, pf.schema_arrow)


def arrow_files(directory: Path) -> list[Path]:
    """The Arrow stream files of a `datasets` save_to_disk directory (a Dataset, or every split of a DatasetDict)."""
    if (directory / "dataset_dict.json").exists():
        splits = json.loads((directory / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        return [f for s in splits for f in arrow_files(directory / s)]
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    return [directory / f["filename"] for f in state["_data_files"]]


def read_arrow(path: Path, cfg: PoolBuildConfig, errors: Errors, source: str, keep=frozenset(), cursor=None):
    """One Arrow stream file as written by `datasets` (memory-mapped, one record batch at a time)."""
    with pa.memory_map(str(path)) as mm:
        reader = pa.ipc.open_stream(mm)
        if cursor is not None:
            cursor.pos = mm.tell
        yield from _read_batches(reader, path, cfg, errors, source, keep, reader.schema)


def read_txt(path: Path, cfg: PoolBuildConfig, errors: Errors, source: str, keep=frozenset(), cursor=None):
    """One document per file; its size is checked before it is read."""
    where = str(path)
    size = path.stat().st_size
    if cursor is not None:
        cursor.pos = lambda: 0
    if size > cfg.max_doc_bytes:
        detail = f"document of {size:,} bytes exceeds max_doc_bytes={cfg.max_doc_bytes:,}"
        errors.bad("doc_too_large", where, detail, f"raise it (--set max_doc_bytes={2 * size}) to keep it")
        return
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        errors.bad("invalid_utf8", where, f"invalid UTF-8 at byte {e.start}", "re-encode the file as UTF-8")
        return
    if check_text(text, where, "(file)", cfg.max_doc_bytes, errors):
        yield text, path.name, {"source": source}, where


def input_kind(path: Path, in_directory: bool = False) -> str | None:
    """'jsonl' | 'parquet' | 'txt' for a file, or None for a file we do not read. Inside a directory, *.json files
    are left alone (they are usually metadata); named explicitly they are read as JSONL."""
    name = path.name.lower()
    suffixes = tuple(s for s in JSONL_SUFFIXES if not (in_directory and s == ".json"))
    for c in ("",) + COMPRESSED:
        if any(name.endswith(s + c) for s in suffixes):
            return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "txt"
    return None


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "arrow": read_arrow, "txt": read_txt}


def expand_inputs(inputs: list[str]) -> list[tuple[Path, str, str]]:
    """INPUT... -> sorted (file, kind, source) triples. Source default: the file stem, or the directory's name."""
    files = []
    for spec in inputs:
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise FileNotFoundError(f"input {spec!r} matches no file")
        for m in map(Path, matches):
            if not m.exists():
                raise FileNotFoundError(f"input {m} does not exist")
            if m.is_dir() and ((m / "state.json").exists() or (m / "dataset_dict.json").exists()):
                files += [(f, "arrow", m.name) for f in arrow_files(m)]
            elif m.is_dir():
                found = [(f, input_kind(f, True), m.name) for f in sorted(m.rglob("*")) if f.is_file()]
                found = [t for t in found if t[1] and not any(p.startswith(".") for p in t[0].relative_to(m).parts)]
                if not found:
                    raise FileNotFoundError(f"input directory {m} holds no .jsonl(.gz/.zst), .parquet or .txt file")
                files += found
            elif input_kind(m) is None:
                raise ValueError(
                    f"input {m}: unknown file type; expected .jsonl/.ndjson/.json (optionally .gz/.zst), .parquet, "
                    ".txt, or a directory"
                )
            else:
                files.append((m, input_kind(m), _stem(m)))
    return files


def _stem(path: Path) -> str:
    name = path.name
    for suffix in COMPRESSED + JSONL_SUFFIXES + (".parquet", ".txt"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def scan_meta_columns(files: list[tuple[Path, str, str]], text_field: str) -> list[str]:
    """Names of scalar columns to keep as metadata: from the schema (Parquet/Arrow) or the first lines (JSONL)."""
    names: dict[str, None] = {}
    for path, kind, _ in files:
        if kind == "parquet":
            schema = pq.read_schema(path)
        elif kind == "arrow":
            with pa.memory_map(str(path)) as mm:
                schema = pa.ipc.open_stream(mm).schema
        elif kind == "jsonl":
            cursor = Cursor()
            f, raw = _open_raw(path, cursor)
            with raw, f:
                try:
                    for _, line in zip(range(META_SCAN_LINES), f):
                        try:
                            row = json.loads(line)
                        except (ValueError, UnicodeDecodeError):
                            continue
                        if isinstance(row, dict):
                            names.update((k, None) for k, v in row.items() if isinstance(v, (str, int, float, bool)))
                except STREAM_ERRORS:
                    pass  # a cut or damaged file: the read itself reports it (raise or count)
            continue
        else:
            continue
        scalar = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating)
        names.update((f.name, None) for f in schema if any(t(f.type) for t in scalar + (pa.types.is_boolean,)))
    return sorted(n for n in names if n != text_field and n not in RESERVED)


def iter_documents(files, cfg: PoolBuildConfig, errors: Errors, keep=frozenset(), cursor=None) -> Iterator[Doc]:
    """Every usable document of every file, in order."""
    cursor = cursor or Cursor()
    for path, kind, source in files:
        yield from READERS[kind](path, cfg, errors, source, keep, cursor)
        cursor.base += path.stat().st_size
        cursor.pos = lambda: 0  # the reader has closed its file
