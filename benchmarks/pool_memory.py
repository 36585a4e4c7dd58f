"""Pool build memory and speed: generate a JSONL of about --mb megabytes in a temporary directory, build a pool from it
and print a Markdown table row: input size, documents, tokens, wall time, docs/s, tokens/s and peak RSS of the main
process and of the largest tokenizer worker (bounded memory: both must stay far below the input size).

    .venv/bin/python benchmarks/pool_memory.py                       # ~200 MB, train:8192, seq_len 512
    .venv/bin/python benchmarks/pool_memory.py --mb 20 --workers 1   # quick

The build runs in a fresh process; peak RSS comes from getrusage there: RUSAGE_SELF for the build's main process,
RUSAGE_CHILDREN for the largest tokenizer worker (forked: its RSS includes pages shared with the main process).
"RSS at start" is the build process before any work (Python and dsdm's imports, torch included).
The tokenizer is trained once on a separate small sample, so the timing is the ingest itself (see --tokenizer).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = 20_000


def make_jsonl(path: Path, megabytes: float, seed: int = 0) -> int:
    """Zipf-distributed pseudo-words, documents of 50-2,000 words; returns the number of documents."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(WORDS)]
    target, n, written = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            ids = np.minimum(rng.zipf(1.2, size=int(rng.integers(50, 2000))), WORDS) - 1
            line = json.dumps({"text": " ".join(vocab[i] for i in ids), "source": f"s{n % 4}"}) + "\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _build(queue, inputs, out, cfg) -> None:
    from dsdm.ingest import build_pool

    start_rss = peak_rss_mb(resource.RUSAGE_SELF)  # inherited at fork: Python + imports (torch via dsdm.common)
    t = time.time()
    build_pool(inputs, out, cfg)
    wall = time.time() - t
    queue.put((wall, start_rss, peak_rss_mb(resource.RUSAGE_SELF), peak_rss_mb(resource.RUSAGE_CHILDREN)))


def main() -> None:
    from dsdm.ingest import PoolBuildConfig, resolve_workers
    from dsdm.readers import Errors, expand_inputs, iter_documents
    from dsdm.tokenizer import load_tokenizer, save_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200, help="size of the generated JSONL (default 200)")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: auto)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokenizer", default="train:8192", help="train:VOCAB is trained here first, on 5 MB")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.time()
        n_docs = make_jsonl(tmp / "docs.jsonl", args.mb)
        gen_s = time.time() - t
        size_mb = (tmp / "docs.jsonl").stat().st_size / 1e6
        spec = args.tokenizer
        if spec.startswith("train:"):
            cfg0 = PoolBuildConfig()
            texts = (d[0] for d, _ in zip(iter_documents(expand_inputs([str(tmp / "docs.jsonl")]), cfg0, Errors()),
                                          range(2000)))  # fmt: skip
            save_tokenizer(load_tokenizer(spec, texts), tmp / "tokenizer.json")
            spec = str(tmp / "tokenizer.json")
        cfg = PoolBuildConfig(tokenizer=spec, seq_len=args.seq_len, workers=args.workers)
        ctx = multiprocessing.get_context("fork")  # a fresh process: its peak RSS is the build's alone
        queue = ctx.Queue()
        proc = ctx.Process(target=_build, args=(queue, [str(tmp / "docs.jsonl")], tmp / "pool", cfg))
        proc.start()
        wall, rss_start, rss_main, rss_worker = queue.get()
        proc.join()
        m = json.loads((tmp / "pool" / "pool.json").read_text())

        row = {
            "input MB": f"{size_mb:.0f}",
            "docs": f"{m['docs']['read']:,}",
            "tokens": f"{m['doc_tokens']:,}",
            "workers": resolve_workers(args.workers),
            "wall s": f"{wall:.1f}",
            "docs/s": f"{m['docs']['read'] / wall:,.0f}",
            "tokens/s": f"{m['doc_tokens'] / wall:,.0f}",
            "RSS at start MB": f"{rss_start:.0f}",
            "peak RSS main MB": f"{rss_main:.0f}",
            "peak RSS worker MB": f"{rss_worker:.0f}" if resolve_workers(args.workers) > 1 else "- (in-process)",
        }
        print(f"# generated {n_docs:,} documents in {gen_s:.0f}s; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs")  # fmt: skip
        print("| " + " | ".join(row) + " |")
        print("|" + "---|" * len(row))
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
