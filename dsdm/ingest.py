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

executor=ray (README "Scale out") tokenizes one input file per Ray task instead, each into a part file under
<out>/.parts/ (the inputs and --out must be on a filesystem every worker sees); this process then reads the parts
back in input order, packs and writes: the same bytes as the local build (tests/test_ray_pool.py). The parts take
4 bytes per token on disk until they are read back; one file is the unit of work, so a single big file gets one worker.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from dsdm.common import check_requirements, log, progress
from dsdm.config import to_dict
from dsdm.io import atomic_path
from dsdm.readers import Cursor, Doc, Errors, expand_inputs, iter_documents, scan_meta_columns
from dsdm.shards import plan_shards, ray_init, run_on_actors


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
    executor: str = "local"
    """local (tokenizer processes on this machine, `workers`) | ray (one Ray task per input file: a worker opens the
    file by its path and tokenizes it to a part file; packing and writing stay here: bitwise the same pool)."""
    ray_address: str | None = None
    """executor=ray: None starts a local Ray cluster; 'auto' joins the cluster this machine is in (`ray start`);
    'ray://HOST:PORT' a remote head."""

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
        if self.executor not in ("local", "ray"):
            raise ValueError(f"pool build: executor must be local or ray, got {self.executor!r}")


# Where and how the work runs, not what it computes: left out of the pool's completion key and pool.json.
WHERE_NOT_WHAT = ("workers", "batch_docs", "executor", "ray_address")


def build_settings(cfg: PoolBuildConfig) -> dict:
    """The settings that decide the pool's content (the build's cache key): cfg less WHERE_NOT_WHAT."""
    return {k: v for k, v in to_dict(cfg).items() if k not in WHERE_NOT_WHAT}


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
# Ray: one task per input file. A worker opens the file by its path, reads, samples and tokenizes it into a part file
# (nothing big travels through Ray); this process reads the parts back in input order and packs and writes them as
# the local build does, so the pool is bitwise the same. Packing crosses file boundaries, so it cannot be sharded.


def part_paths(parts: Path, i: int) -> tuple[Path, Path]:
    """Input file i's part: its token ids (uint32, back to back) and its documents (JSON lines)."""
    return parts / f"{i:06d}.ids", parts / f"{i:06d}.docs"


def tokenize_file(file, cfg: PoolBuildConfig, keep: frozenset, tok, parts: Path, i: int) -> dict:
    """Read, sample and tokenize input file i (a (path, kind, source) triple) into its part: the ids of every
    document and one line [doc_id, meta, tokens] per document. -> {"errors": Errors, "sampled_out": int}, or
    {"error": message} for the first bad document under on_error=raise (raised by the caller, in input order)."""
    errors, counts = Errors(cfg.on_error), {"sampled_out": 0}
    ids_path, docs_path = part_paths(parts, i)
    docs = sampled(iter_documents([file], cfg, errors, keep), cfg.sample_fraction, counts)
    try:
        with atomic_path(ids_path) as ids_tmp, atomic_path(docs_path) as docs_tmp:  # a retried task rewrites both
            with open(ids_tmp, "wb") as fi, open(docs_tmp, "w", encoding="utf-8") as fd:
                for batch in batched(docs, cfg.batch_docs):
                    ids, lengths = encode_texts([d[0] for d in batch], tok)
                    fi.write(ids.tobytes())
                    fd.writelines(json.dumps([d[1], d[2], int(n)]) + "\n" for d, n in zip(batch, lengths))
    except ValueError as e:
        return {"error": str(e)}
    return {"errors": errors, "sampled_out": counts["sampled_out"]}


class FileWorker:
    """A Ray actor of the pool build: loads the tokenizer once, then tokenizes each input file it is handed (by its
    index in `files`) with tokenize_file. Relative input paths are opened from `cwd`, the caller's directory."""

    def __init__(self, files, cfg: PoolBuildConfig, keep: frozenset, tokenizer_json: str, parts: str, cwd):
        from dsdm.tokenizer import single_threaded

        single_threaded()  # one thread per actor: the actors are the parallelism
        if cwd is not None:
            try:
                os.chdir(cwd)
            except OSError:
                raise ValueError(
                    f"pool build: the inputs are relative to {cwd}, which a Ray worker cannot see; give absolute "
                    "paths on a filesystem every worker sees"
                ) from None
        self.files, self.cfg, self.keep, self.parts, self.tok = files, cfg, keep, Path(parts), _load(tokenizer_json)

    def run(self, start: int, stop: int) -> list[dict]:
        return [tokenize_file(self.files[i], self.cfg, self.keep, self.tok, self.parts, i) for i in range(start, stop)]


def ray_batches(files, cfg: PoolBuildConfig, errors: Errors, keep, tokenizer_json: str, parts: Path, docs, cursor):
    """Tokenize every input file on Ray actors into `parts`, merge their counts into `errors` and `docs` in input
    order, and return the batches ([(doc_id, meta)], ids, lengths) read back from the parts in input order (the
    parts are deleted once read). A bad document under on_error=raise raises here: the first in input order."""
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    relative = any(not p.is_absolute() for p, _, _ in files)
    worker = dict(files=files, cfg=cfg, keep=keep, tokenizer_json=tokenizer_json, parts=str(parts.resolve()),
                  cwd=os.getcwd() if relative else None)  # fmt: skip
    try:
        shards = plan_shards(len(files), 1)
        results = run_on_actors(FileWorker, worker, shards, ray_address=cfg.ray_address, desc="pool build: files")
        results = [r for shard in results for r in shard]
        for r in results:
            if "error" in r:
                raise ValueError(r["error"])
    except BaseException:
        shutil.rmtree(parts, ignore_errors=True)
        raise
    for r in results:
        errors.merge(r["errors"])
        docs["sampled_out"] += r["sampled_out"]
    return _read_parts(files, parts, cfg.batch_docs, cursor)


def _read_parts(files, parts: Path, batch_docs: int, cursor: Cursor):
    try:
        for i, (path, _, _) in enumerate(files):
            ids_path, docs_path = part_paths(parts, i)
            with open(ids_path, "rb") as fi, open(docs_path, encoding="utf-8") as fd:
                for lines in batched(fd, batch_docs):
                    rows = [json.loads(line) for line in lines]
                    lengths = np.array([r[2] for r in rows], dtype=np.int64)
                    ids = np.frombuffer(fi.read(4 * int(lengths.sum())), dtype=np.uint32)
                    yield [(r[0], r[1]) for r in rows], ids, lengths
            cursor.base += path.stat().st_size
    finally:
        shutil.rmtree(parts, ignore_errors=True)


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
    `force`. The store is byte-identical for identical inputs and config, whatever `workers` and `executor` are.
    """
    import pyarrow as pa

    from dsdm import __version__
    from dsdm.config import save_config
    from dsdm.io import clear_done, is_done
    from dsdm.pool import PoolWriter
    from dsdm.tokenizer import eos_token, load_tokenizer, save_tokenizer

    started = time.time()
    if cfg.executor == "ray":
        check_requirements({"ray": "ray"}, "pool build with executor=ray")  # one line, before any work
    out = Path(out_dir)
    files = expand_inputs(list(inputs))
    fingerprints = input_fingerprints(files)
    # the store does not depend on how the work is spread, so those knobs are left out of the cache key
    settings = build_settings(cfg)
    done_config = {"pool_build": settings, "inputs": fingerprints}
    if is_done(out, done_config, force):
        log(f"{out} is already built from these inputs with this config; nothing to do")
        return out
    if cfg.executor == "ray":
        ray_init(cfg.ray_address)  # a wrong address fails here, before the tokenizer is trained
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
        shutil.rmtree(out / ".parts", ignore_errors=True)  # executor=ray: the tokenized files not read back yet
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
    if cfg.executor == "ray":  # every file tokenized by Ray workers first, then read back here in input order
        batches = ray_batches(files, cfg, errors, keep, tokenizer_json, writer.out_dir / ".parts", docs, cursor)
    else:
        batches = batched(
            sampled(iter_documents(files, cfg, errors, keep, cursor), cfg.sample_fraction, docs), cfg.batch_docs
        )
        batches = (
            ([(d[1], d[2]) for d in batch], ids, lengths)
            for batch, ids, lengths in tokenized_batches(batches, tokenizer_json, resolve_workers(cfg.workers))
        )
    bar = progress(total=total_bytes, desc="pool build", unit="B")
    t0 = time.time()
    for batch, ids, lengths in batches:  # batch: [(doc_id, meta)], ids: (sum n_i,) uint32, lengths: (B,)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for (doc_id, meta), a, b in zip(batch, starts[:-1], starts[1:]):
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
