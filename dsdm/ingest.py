"""Ingest: documents on disk -> the tokenized pool store (dsdm.pool), streaming, in worker processes.

Reading is dsdm.readers: which inputs are accepted (JSONL optionally .gz/.zst, Parquet, `datasets` directories,
.txt), which columns become metadata, and what bad input does (with on_error=raise a one-line ValueError naming the
file, the line or row, and the fix; with on_error=skip a count by reason, printed and stored in pool.json). This
module samples, tokenizes, packs and writes. Nothing is dropped silently: skipped documents, documents shorter than
`min_tokens`, the sampled-out documents and the packing remainder are all counted in pool.json.

Modes (the paper packs, docs/method.md §9.1): pack=True joins documents with EOS and cuts the stream into seq_len-token
examples (the last partial one is dropped and counted); each example's `source` is the source contributing most of
its tokens, its doc_id and other metadata those of the document contributing most. pack=False keeps one example per
document: its tokens followed by EOS, truncated to seq_len.

Memory stays bounded whatever the input size: readers stream, at most `2 * workers` batches of `batch_docs`
documents are in flight, and PoolWriter streams to disk. Tokenization runs in `workers` processes; batches
are submitted with a bounded window of apply_async calls and collected in order (Pool.imap would read the whole
input ahead), so the output does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from dsdm.common import log, progress
from dsdm.readers import Cursor, Doc, Errors, expand_inputs, iter_documents, scan_meta_columns


@dataclass
class PoolBuildConfig:
    tokenizer: str = "train:8192"
    """A tokenizer.json, a Hugging Face tokenizer directory, `gpt2`, or `train:VOCAB` (dsdm.tokenizer)."""
    text_field: str = "text"
    """The column / JSON key holding each document's text."""
    seq_len: int = 512
    """L, tokens per example (the paper's pools use 1024 with GPT-2's tokenizer)."""
    pack: bool = True
    """True: join documents with EOS and cut into L-token examples; False: one example per document (truncated)."""
    min_tokens: int = 1
    """Documents with fewer tokens (EOS excluded) are dropped and counted, in both modes."""
    on_error: Literal["raise", "skip"] = "raise"
    """What a bad document does: raise (stop, naming file, line and fix) or skip (count by reason in pool.json)."""
    max_doc_bytes: int = 1_000_000
    """Documents larger than this (UTF-8 bytes) are bad input; raise it to keep very large documents."""
    workers: int = 0
    """Tokenizer processes; 0 = one per CPU core but one (at most 8); 1 = tokenize in the main process."""
    batch_docs: int = 512
    """Documents per tokenization batch."""
    tokenizer_sample_bytes: int = 20_000_000
    """train:VOCAB trains on about this many bytes of text, taken from the start of each input file in turn."""
    sample_fraction: float = 1.0
    """Keep each document with this probability, decided by a hash of its text (streaming, deterministic, the same
    documents whatever the file order); the rest are counted as sampled_out. For a smaller pool from big inputs."""

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"pool build: seq_len must be at least 2, got {self.seq_len}")
        if self.min_tokens < 1:
            raise ValueError(f"pool build: min_tokens must be at least 1, got {self.min_tokens}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"pool build: on_error must be raise or skip, got {self.on_error!r}")
        for key in ("max_doc_bytes", "batch_docs", "tokenizer_sample_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"pool build: {key} must be positive, got {getattr(self, key)}")
        if self.workers < 0:
            raise ValueError(f"pool build: workers must be >= 0, got {self.workers}")
        if not 0 < self.sample_fraction <= 1:
            raise ValueError(f"pool build: sample_fraction must be in (0, 1], got {self.sample_fraction}")


def tokenizer_sample(files, cfg: PoolBuildConfig) -> Iterator[str]:
    """About tokenizer_sample_bytes of text: the first documents of each file, the budget shared among the files
    still to read. Bad documents follow on_error (raise here already, or are skipped without being counted)."""
    remaining = cfg.tokenizer_sample_bytes
    for i, f in enumerate(files):
        budget = remaining // (len(files) - i)
        for text, *_ in iter_documents([f], cfg, Errors(cfg.on_error)):
            if budget <= 0:
                break
            n = len(text.encode("utf-8"))
            budget -= n
            remaining -= n
            yield text


# -----------------------------------------------------------------------------
# Tokenization in worker processes

_WORKER_TOKENIZER = None


def _load(tokenizer_json: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True  # "<|endoftext|>" typed in a document is text, not EOS
    return tok


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    from dsdm.tokenizer import single_threaded

    single_threaded()  # one thread per worker process: the processes are the parallelism
    _WORKER_TOKENIZER = _load(tokenizer_json)


def encode_texts(texts: list[str], tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each text, concatenated: (ids (sum n_i,) uint32, lengths (B,) int64). No special tokens added."""
    tok = tokenizer or _WORKER_TOKENIZER
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.concatenate([np.asarray(e.ids, dtype=np.uint32) for e in encodings] or [np.zeros(0, np.uint32)])
    return ids, lengths


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else max(1, min(8, (os.cpu_count() or 2) - 1))


def tokenized_batches(batches: Iterator[list[Doc]], tokenizer_json: str, workers: int):
    """Yield (docs, ids, lengths) per batch, in input order, with at most 2 * workers batches in flight."""
    if workers <= 1:
        tok = _load(tokenizer_json)  # in this process (tokenizers may still use its own threads)
        for docs in batches:
            yield (docs, *encode_texts([d[0] for d in docs], tok))
        return
    # fork where there is one: spawn would re-run an unguarded calling script in every worker. The children only
    # run tokenizers, single-threaded (it detects the fork and does not reuse the parent's thread pool).
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json,)) as pool:
        pending: deque = deque()
        for docs in batches:
            pending.append((docs, pool.apply_async(encode_texts, ([d[0] for d in docs],))))
            if len(pending) >= 2 * workers:
                docs0, result = pending.popleft()
                yield (docs0, *result.get())
        while pending:
            docs0, result = pending.popleft()
            yield (docs0, *result.get())


def text_unit_hash(text: str) -> float:
    """A uniform number in [0, 1) from the document's text (blake2b): the sampling coin of sample_fraction."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sampled(docs: Iterator[Doc], fraction: float, counts: dict) -> Iterator[Doc]:
    """Documents whose text hash is < fraction; counts["sampled_out"] counts the others."""
    for d in docs:
        if fraction >= 1.0 or text_unit_hash(d[0]) < fraction:
            yield d
        else:
            counts["sampled_out"] += 1


def batched(docs: Iterator[Doc], n: int) -> Iterator[list[Doc]]:
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# Packing


class Packer:
    """Documents (each followed by EOS) -> seq_len-token examples, written as soon as they are full."""

    def __init__(self, writer, seq_len: int, eos_id: int):
        self.writer, self.seq_len, self.eos = writer, seq_len, np.array([eos_id], dtype=np.uint32)
        self.pieces: deque = deque()  # [tokens, doc_index, doc_id, meta] not yet written
        self.buffered = 0
        self.docs_seen = 0

    def add(self, ids: np.ndarray, doc_id: str, meta: dict) -> None:
        tokens = np.concatenate([ids, self.eos])
        self.pieces.append([tokens, self.docs_seen, doc_id, meta])
        self.docs_seen += 1
        self.buffered += tokens.shape[0]
        while self.buffered >= self.seq_len:
            self._emit()

    def _emit(self) -> None:
        need, parts = self.seq_len, []
        by_doc: Counter = Counter()  # doc index -> tokens in this example
        by_source: Counter = Counter()
        info = {}
        while need:
            piece = self.pieces[0]
            take = piece[0][:need]
            parts.append(take)
            by_doc[piece[1]] += take.shape[0]
            by_source[piece[3]["source"]] += take.shape[0]
            info[piece[1]] = piece
            if piece[0].shape[0] > need:
                piece[0] = piece[0][need:]
            else:
                self.pieces.popleft()
            need -= take.shape[0]
        self.buffered -= self.seq_len
        # most tokens wins; ties go to the earliest (Counter.most_common keeps insertion order among equals)
        doc = info[by_doc.most_common(1)[0][0]]
        meta = {**doc[3], "source": by_source.most_common(1)[0][0]}
        self.writer.add(np.concatenate(parts), doc_id=doc[2], **meta)

    def remainder(self) -> int:
        """Tokens left over (< seq_len) at the end; they are dropped."""
        return self.buffered


# -----------------------------------------------------------------------------
# IO: the build


def input_fingerprints(files) -> list[dict]:
    from dsdm.io import sha256_file

    return [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p, _, _ in files]


def build_pool(inputs: list[str], out_dir: str | Path, cfg: PoolBuildConfig, force: bool = False) -> Path:
    """Tokenize `inputs` into a pool directory (layout: dsdm.pool). Returns out_dir.

    Re-running with the same inputs (by sha256) and config does nothing; a different config is refused unless
    `force`. The store is byte-identical for identical inputs and config, whatever `workers` is.
    """
    import pyarrow as pa

    from dsdm import __version__
    from dsdm.config import save_config, to_dict
    from dsdm.io import clear_done, is_done
    from dsdm.pool import PoolWriter
    from dsdm.tokenizer import eos_token, load_tokenizer, save_tokenizer

    started = time.time()
    out = Path(out_dir)
    files = expand_inputs(list(inputs))
    fingerprints = input_fingerprints(files)
    # the store does not depend on how the work is spread, so those knobs are left out of the cache key
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("workers", "batch_docs")}
    done_config = {"pool_build": settings, "inputs": fingerprints}
    if is_done(out, done_config, force):
        log(f"{out} is already built from these inputs with this config; nothing to do")
        return out
    clear_done(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    log(
        f"pool build: {len(files)} input file(s), tokenizer {cfg.tokenizer}, seq_len {cfg.seq_len}, "
        f"{'pack' if cfg.pack else 'one example per document'}, on_error={cfg.on_error}"
    )

    tok = load_tokenizer(cfg.tokenizer, tokenizer_sample(files, cfg))
    eos = eos_token(tok, cfg.tokenizer)
    eos_id = tok.token_to_id(eos)
    tok_path = out / ".tokenizer.json"
    save_tokenizer(tok, tok_path)
    keep = scan_meta_columns(files, cfg.text_field)
    writer = PoolWriter(out, tok.get_vocab_size(with_added_tokens=True), {k: pa.string() for k in keep})
    errors = Errors(cfg.on_error)
    try:
        stats = ingest(files, cfg, writer, errors, frozenset(keep), eos_id, tok_path.read_text(encoding="utf-8"))
    except BaseException:
        shutil.rmtree(writer.build_dir, ignore_errors=True)  # leave no half-built store behind
        tok_path.unlink(missing_ok=True)
        raise
    if writer.num_examples == 0:
        raise ValueError(
            f"pool build: no examples from {', '.join(inputs)} ({stats['docs']['kept']} usable documents, "
            f"{stats['tail_tokens_dropped']} tokens < seq_len={cfg.seq_len}); lower --seq-len or use --no-pack"
        )
    if errors.counts:
        log("skipped documents: " + ", ".join(f"{r}={n}" for r, n in sorted(errors.counts.items())))
    manifest = {
        "seq_len": cfg.seq_len,
        "mode": "pack" if cfg.pack else "document",
        "eos_id": eos_id,
        "eos_token": eos,
        "tokenizer": cfg.tokenizer,
        "text_field": cfg.text_field,
        "meta_columns": keep,
        **stats,
        "skipped": dict(sorted(errors.counts.items())),
        "skipped_examples": dict(sorted(errors.examples.items())),
        "inputs": fingerprints,
        "build_config": settings,
        "dsdm_version": __version__,
    }
    writer.close(manifest, done_config, tokenizer_json=tok_path, started=started)
    tok_path.unlink()
    log(f"wrote {out}: {writer.num_examples:,} examples, {writer.num_tokens:,} tokens in {time.time() - started:.1f}s")
    return out


def ingest(files, cfg, writer, errors, keep, eos_id, tokenizer_json) -> dict:
    """Read, tokenize and write every document; returns the counts stored in pool.json."""
    total_bytes = sum(p.stat().st_size for p, _, _ in files)
    cursor = Cursor()
    packer = Packer(writer, cfg.seq_len, eos_id) if cfg.pack else None
    docs = {"read": 0, "kept": 0, "too_short": 0, "truncated": 0, "sampled_out": 0}
    sources: dict[str, dict[str, int]] = {}
    doc_tokens = 0
    bar = progress(total=total_bytes, desc="pool build", unit="B")
    t0 = time.time()
    batches = batched(
        sampled(iter_documents(files, cfg, errors, keep, cursor), cfg.sample_fraction, docs), cfg.batch_docs
    )
    for batch, ids, lengths in tokenized_batches(batches, tokenizer_json, resolve_workers(cfg.workers)):
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for (text, doc_id, meta, where), a, b in zip(batch, starts[:-1], starts[1:]):
            docs["read"] += 1
            n = int(b - a)
            if n < cfg.min_tokens:
                docs["too_short"] += 1
                continue
            docs["kept"] += 1
            doc_tokens += n
            s = sources.setdefault(meta["source"], {"docs": 0, "tokens": 0})
            s["docs"] += 1
            s["tokens"] += n
            if packer is not None:
                packer.add(ids[a:b], doc_id, meta)
            else:
                tokens = np.append(ids[a:b], np.uint32(eos_id))[: cfg.seq_len]
                docs["truncated"] += n + 1 > cfg.seq_len
                writer.add(tokens, doc_id=doc_id, **meta)
        bar.n = min(total_bytes, cursor.bytes_read())
        dt = max(time.time() - t0, 1e-9)
        bar.set_postfix_str(f"{docs['read'] / dt:,.0f} docs/s, {doc_tokens / dt:,.0f} tok/s", refresh=False)
        bar.update(0)
    bar.n = total_bytes
    bar.close()
    dt = max(time.time() - t0, 1e-9)
    log(
        f"{docs['read']:,} documents, {doc_tokens:,} tokens: {docs['read'] / dt:,.0f} docs/s, {doc_tokens / dt:,.0f} "
        "tokens/s"
    )
    return {
        "docs": docs,
        "doc_tokens": doc_tokens,
        "tail_tokens_dropped": packer.remainder() if packer is not None else 0,
        "sources": dict(sorted(sources.items())),
        "meta_keys_not_kept": dict(sorted(errors.unkept_keys.items())),
    }
