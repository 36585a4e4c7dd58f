"""Where a task's answers can come from: the prompt itself, or the pool's text.

A holdout continuation a model can copy from its own prompt (squad_style: the answer is a span of the passage) is
learnable as a skill; one that appears nowhere in the prompt must be recalled from training data. This prints, per
task, the share of holdout continuations found verbatim in their own context, the share found anywhere in the pool's
documents (as " " + answer, so a word start), and the median number of pool occurrences. It reads the run's pool
(its meta.parquet names the documents it holds) and the documents it was built from.

Run (a few minutes: one substring count over the pool's text per distinct answer):
    .venv/bin/python benchmarks/answers_in_pool.py runs/repro-cpu --docs 'runs/data-full/docs/*.parquet' \
        --tasks runs/data-full/tasks/jeopardy_style runs/data-full/tasks/squad_style
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dsdm.common import progress
from dsdm.tasks import load_task


def pool_text(run: Path, docs: str) -> str:
    """The text of every document the run's pool holds, one per line."""
    held = set(pq.read_table(run / "pool" / "meta.parquet", columns=["doc_id"]).column("doc_id").to_pylist())
    files = sorted(glob.glob(docs))
    if not files:
        raise SystemExit(f"--docs {docs!r}: no files match; pass the parquet files the pool was built from")
    parts = []
    for f in files:
        t = pq.read_table(f, columns=["doc_id", "text"])
        parts += [x for d, x in zip(t.column("doc_id").to_pylist(), t.column("text").to_pylist()) if d in held]
    if not parts:
        raise SystemExit(f"{run / 'pool'}: none of its documents is in --docs {docs!r}")
    return "\n".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run directory with a pool/ (dsdm experiment)")
    p.add_argument("--docs", required=True, help="glob of the parquet documents the pool was built from")
    p.add_argument("--tasks", nargs="+", required=True, help="task directories")
    args = p.parse_args(argv)

    corpus = pool_text(args.run, args.docs)
    print(f"\n{args.run / 'pool'}: {len(corpus) / 1e6:.1f}M characters of document text\n")
    print("| task | holdout | continuation in its own context | in the pool's text | median pool occurrences |")
    print("|---|---:|---:|---:|---:|")
    for spec in args.tasks:
        examples = load_task(spec).split("holdout")
        answers = {e.continuation for e in examples}
        counts = {a: corpus.count(a if a.startswith(" ") else " " + a) for a in progress(answers, desc=spec)}
        in_context = np.mean([e.continuation.strip() in e.context for e in examples])
        found = np.array([counts[e.continuation] for e in examples])
        print(f"| {Path(spec).name} | {len(examples)} | {in_context:.3f} | {np.mean(found > 0):.3f} | "
              f"{np.median(found):g} |")  # fmt: skip


if __name__ == "__main__":
    main()
