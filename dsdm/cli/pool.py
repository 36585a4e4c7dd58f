"""`dsdm pool build` and `dsdm pool info`: documents -> the tokenized pool store (dsdm.ingest, dsdm.pool)."""

from __future__ import annotations

import argparse

BUILD_HELP = """\
Tokenize documents into a pool directory (the store every later stage reads).

Reads INPUT...: .jsonl/.ndjson/.json files (optionally .gz or .zst), Parquet files, globs or directories of them,
Hugging Face `datasets` save_to_disk directories, and .txt files or directories (one document per file). The text
comes from --text-field; `source` and `doc_id` columns are used when present (default source: the file stem or the
directory name); other scalar columns are kept as metadata.

Writes under --out: tokens.bin, offsets.npy, meta.parquet, tokenizer.json, pool.json (counts, skipped documents by
reason, input sha256s), config.yaml and _done.json. Re-running with the same inputs and settings does nothing.

Bad input (malformed JSON, missing text field, non-UTF-8, NUL bytes, empty or over-large documents, a truncated or
corrupt .gz/.zst file) stops the build with the file, line and fix, unless --on-error skip, which skips, counts by
reason and reports (a truncated file keeps the documents before the cut).

Scale out (README "Scale out"): --executor ray [--ray-address auto|ray://HOST:PORT] tokenizes one input file per
Ray task (the inputs and --out on a filesystem every worker sees); the pool is bitwise the local one.

Examples:
  dsdm pool build data/*.jsonl.gz --out pools/web --tokenizer gpt2 --seq-len 1024
  dsdm pool build corpus.parquet notes/ --out pools/mine --tokenizer train:8192 --on-error skip
  dsdm pool build data/*.jsonl.zst --out pools/web --tokenizer gpt2 --executor ray --ray-address auto
"""


def register(sub) -> None:
    from dsdm.cli import add_config_args

    p = sub.add_parser("pool", help="build a tokenized pool from documents, or describe one")
    psub = p.add_subparsers(dest="pool_command", metavar="SUBCOMMAND")
    b = psub.add_parser(
        "build",
        help="tokenize JSONL / Parquet / datasets / .txt documents into a pool directory",
        description=BUILD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("inputs", nargs="+", metavar="INPUT", help="files, globs or directories")
    b.add_argument("--out", required=True, metavar="DIR", help="the pool directory to write")
    b.add_argument("--tokenizer", help="tokenizer.json, a HF tokenizer directory, gpt2, or train:VOCAB (train:8192)")
    b.add_argument("--seq-len", type=int, help="tokens per example (default 512)")
    b.add_argument(
        "--pack",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="join documents with EOS and cut into seq-len examples (default), or one example per document",
    )
    b.add_argument("--min-tokens", type=int, help="drop documents with fewer tokens (default 1)")
    b.add_argument("--text-field", help="column / JSON key with the text (default text)")
    b.add_argument("--on-error", choices=["raise", "skip"], help="bad documents: stop (default) or skip and count")
    b.add_argument("--workers", type=int, help="tokenizer processes (default: CPU cores - 1, at most 8)")
    b.add_argument(
        "--executor", choices=["local", "ray"], help="local (default) | ray: one Ray task per input file tokenizes it"
    )
    b.add_argument(
        "--ray-address", metavar="ADDR", help="executor=ray: auto | ray://HOST:PORT (default: a local cluster)"
    )
    add_config_args(b)
    b.set_defaults(func=build)
    i = psub.add_parser("info", help="counts, length histogram and per-source documents/tokens of a pool")
    i.add_argument("dir", help="a pool directory")
    i.set_defaults(func=info)
    p.set_defaults(func=lambda a: p.print_help() or 2)


# = PoolBuildConfig keys
FLAGS = ("tokenizer", "seq_len", "pack", "min_tokens", "text_field", "on_error", "workers", "executor", "ray_address")


def build(args) -> int:
    from dsdm.cli import config_from_args
    from dsdm.ingest import PoolBuildConfig, build_pool

    cfg = config_from_args(PoolBuildConfig, args, **{k: getattr(args, k) for k in FLAGS})
    out = build_pool(args.inputs, args.out, cfg, force=args.force)
    print(out)
    return 0


def length_histogram(lengths, bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) over equal-width length bins from the shortest to the longest example."""
    import numpy as np

    lo, hi = (int(lengths.min()), int(lengths.max())) if lengths.size else (0, 0)
    edges = np.unique(np.linspace(lo, hi + 1, bins + 1).astype(np.int64))
    counts, _ = np.histogram(lengths, bins=edges)
    return [(int(lo), int(hi) - 1, int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def info(args) -> int:
    import numpy as np

    from dsdm.pool import Pool

    pool = Pool(args.dir)
    m = pool.manifest
    print(f"pool        {pool.path}")
    print(f"examples    {len(pool):,}  ({m['mode']}, seq_len {pool.seq_len})")
    print(f"tokens      {pool.num_tokens:,}  ({m['token_dtype']}, vocab {pool.vocab_size:,}, eos {pool.eos_id})")
    print(f"tokenizer   {m.get('tokenizer', '?')}")
    if "docs" in m:
        d = m["docs"]
        sampled = f", sampled out {d['sampled_out']:,} (sample_fraction)" if d.get("sampled_out") else ""
        tail = m.get("tail_tokens_dropped", 0)
        print(f"documents   read {d['read']:,}, kept {d['kept']:,}, too short {d['too_short']:,}, "
              f"truncated {d['truncated']:,}{sampled}; tail tokens dropped {tail:,}")  # fmt: skip
    skipped = m.get("skipped", {})
    print("skipped     " + (", ".join(f"{r} {n:,}" for r, n in skipped.items()) or "none"))
    print("\nlength      examples")
    width = max((c for _, _, c in length_histogram(pool.lengths)), default=1)
    for lo, hi, c in length_histogram(pool.lengths):
        print(f"{lo:>5}-{hi:<5} {c:>9,}  {'#' * round(40 * c / max(width, 1))}")
    codes, labels = pool.codes("source")  # (N,) int32, streamed by row group: no Python string per example
    examples = dict(zip(labels, np.bincount(codes, minlength=len(labels)).tolist()))
    weighted = np.bincount(codes, weights=pool.lengths, minlength=len(labels))  # float64: exact below 2**53 tokens
    tokens = dict(zip(labels, weighted.tolist()))
    docs = m.get("sources", {})
    print(f"\n{'source':24s} {'docs':>10s} {'doc tokens':>12s} {'examples':>10s} {'tokens':>12s}")
    for s in sorted(set(labels) | set(docs)):
        d = docs.get(s, {})
        print(f"{s[:24]:24s} {d.get('docs', 0):>10,} {d.get('tokens', 0):>12,} {examples.get(s, 0):>10,} "
              f"{int(tokens.get(s, 0)):>12,}")  # fmt: skip
    return 0
