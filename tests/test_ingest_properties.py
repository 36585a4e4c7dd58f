"""Property-based tests (hypothesis) for pool ingest (dsdm.readers, dsdm.ingest): arbitrary Unicode, NULs, huge lines,
non-UTF-8 bytes and random truncation of .gz/.zst files end in a clear one-line error or a counted skip, never a
crash and never a silently short pool.

Each example builds a real pool with a fixed, pre-trained tokenizer (no training per example); max_examples is
kept small so the file runs in a few seconds. Run: pytest tests/test_ingest_properties.py
"""

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import zstandard

from dsdm.ingest import PoolBuildConfig, build_pool
from dsdm.pool import Pool
from dsdm.tokenizer import EOS_TOKEN, save_tokenizer, train_bpe

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MAX_DOC_BYTES = 2000
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORDS = "the cat sat on a mat while dogs ran far away from home under grey skies".split()


@lru_cache(maxsize=1)
def tokenizer_file() -> str:
    """One byte-level BPE for every example (every byte has an id, so any text encodes and decodes exactly)."""
    path = Path(tempfile.mkdtemp(prefix="dsdm-prop-")) / "tokenizer.json"
    save_tokenizer(train_bpe([" ".join(WORDS)] * 50, 300), path)
    return str(path)


def _cfg(**kw) -> PoolBuildConfig:
    base = {"tokenizer": tokenizer_file(), "pack": False, "seq_len": 1 << 16, "workers": 1}
    return PoolBuildConfig(**{**base, "max_doc_bytes": MAX_DOC_BYTES, **kw})


def _usable(text: str) -> bool:
    """The rule a document must pass (dsdm.readers.check_text), restated: non-blank, no NUL, valid Unicode, small."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return bool(text.strip()) and "\x00" not in text and size <= MAX_DOC_BYTES


def _one_line_error_naming(e: ValueError, path: Path) -> None:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg, msg


# a line is a JSON document (any Unicode, including NULs, lone surrogates and huge texts), or raw bytes
texts = st.one_of(
    st.text(st.characters(codec=None), max_size=40),
    st.text(st.sampled_from("ab \x00\ud800é🙂"), max_size=8),
    st.integers(100, 3 * MAX_DOC_BYTES).map(lambda n: "y" * n),
    st.integers(70_000, 90_000).map(lambda n: "z" * n),  # past the reader's line limit (6 x 2000 + 65536 bytes)
)
lines = st.one_of(
    texts.map(lambda t: ("doc", t)),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b).map(lambda b: ("raw", b)),
)


def _encode(kind, value, ensure_ascii: bool) -> bytes:
    return json.dumps({"text": value}, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass") if kind == "doc" \
        else value  # fmt: skip


@PROPERTY
@given(rows=st.lists(lines, min_size=1, max_size=12), ensure_ascii=st.booleans())
def test_any_jsonl_is_a_clear_error_or_every_line_accounted_for(rows, ensure_ascii):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        src.write_bytes(b"\n".join(_encode(k, v, ensure_ascii) for k, v in rows) + b"\n")
        raw_lines = src.read_bytes().split(b"\n")[:-1]
        nonblank = sum(bool(line.strip()) for line in raw_lines)
        expected = [v for k, v in rows if k == "doc" and _usable(v)]
        all_good = len(expected) == nonblank  # every non-blank line is a usable document
        try:
            out = build_pool([str(src)], Path(tmp) / "raise", _cfg())
        except ValueError as e:
            _one_line_error_naming(e, src) if nonblank else None
            assert not all_good or not expected
        else:
            assert all_good and [Pool(out).decode(i) for i in range(len(expected))] == [t + EOS_TOKEN for t in expected]
        try:
            out = build_pool([str(src)], Path(tmp) / "skip", _cfg(on_error="skip"))
        except ValueError as e:
            assert not expected and "no examples" in str(e) and "\n" not in str(e)
            return
        pool = Pool(out)
        m = pool.manifest
        # raw byte lines may hold a usable JSON document by chance; whatever they hold, every line is counted
        assert m["docs"]["read"] + sum(m["skipped"].values()) == nonblank
        assert len(pool) == m["docs"]["kept"] == m["docs"]["read"] >= len(expected)
        decoded = [pool.decode(i)[: -len(EOS_TOKEN)] for i in range(len(pool))]
        assert all(_usable(t) for t in decoded) and set(expected) <= set(decoded)


def _compress(raw: bytes, codec: str) -> bytes:
    return gzip.compress(raw, mtime=0) if codec == "gz" else zstandard.ZstdCompressor(level=1).compress(raw)


@PROPERTY
@given(
    docs=st.lists(
        st.lists(st.sampled_from(WORDS + ["é", "\u2603"]), min_size=1, max_size=30).map(" ".join),
        min_size=1,
        max_size=200,
    ),  # fmt: skip
    codec=st.sampled_from(["gz", "zst"]),
    cut=st.floats(0, 1, exclude_max=True),
)
def test_truncated_gz_or_zst_is_a_clear_error_or_a_counted_skip(docs, codec, cut):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"in.jsonl.{codec}"
        data = _compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode(), codec)
        src.write_bytes(data[: int(cut * len(data))])  # always shorter than the whole file
        with pytest.raises(ValueError) as e:
            build_pool([str(src)], Path(tmp) / "raise", _cfg())
        _one_line_error_naming(e.value, src)
        try:
            out = build_pool([str(src)], Path(tmp) / "skip", _cfg(on_error="skip"))
        except ValueError as e:  # nothing readable before the cut: a clear error, not an empty pool
            _one_line_error_naming(e, src)
            return
        pool = Pool(out)
        m = pool.manifest
        skipped = m["skipped"].get("truncated_file", 0) + m["skipped"].get("corrupt_file", 0)
        assert skipped == 1, m["skipped"]  # the cut is always counted
        kept = [pool.decode(i)[: -len(EOS_TOKEN)] for i in range(len(pool))]
        # a prefix, in order (all of them when only the end-of-stream trailer was cut)
        assert 0 < len(kept) <= len(docs) and kept == docs[: len(kept)]
