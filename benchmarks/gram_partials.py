"""The feature store's Gram (issue 16, store format 2; docs/estimator.md "Feature store"): the time to sum the Gram
of n stored float16 rows the old way (format 1: in the featurize loop, one (dim, dim) product and add per batch, a
partial per shard) and the new way (dsdm.featurize.rows_gram: read back from features.npy, one product per block of
1,024 rows within each shard), one BLAS thread; then the Gram partials' count and disk in both formats at a given
scale. Prints markdown tables.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gram_partials.py --rows 4096 --dim 2048
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from dsdm.featurize import FeaturizeConfig, rows_gram


def per_batch(feats: np.ndarray, shard: int, batch: int) -> np.ndarray:
    """Format 1's reduction: per shard, acc += x.T @ x per batch of stored rows; shards summed in order."""
    n, dim = feats.shape
    total = np.zeros((dim, dim))
    for s0 in range(0, n, shard):
        part = np.zeros((dim, dim))
        for b0 in range(s0, min(s0 + shard, n), batch):
            x = np.asarray(feats[b0 : min(b0 + batch, s0 + shard, n)], dtype=np.float64)
            part += x.T @ x
        total += part
    return total


def blocked(feats: np.ndarray, shard: int) -> np.ndarray:
    """Format 2's reduction of one group holding every row: rows_gram of each shard, in row order."""
    acc = None
    for s0 in range(0, feats.shape[0], shard):
        acc = rows_gram(feats, s0, min(s0 + shard, feats.shape[0]), "cpu", "float64", acc)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16, help="featurize batch size (format 1 summed per batch)")
    ap.add_argument("--scale-rows", type=float, default=2e8, help="pool size for the partials table")
    ap.add_argument("--scale-dim", type=int, default=15680)
    args = ap.parse_args()
    shard = FeaturizeConfig().shard_size
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(1, user_api="blas"):
        path = Path(tmp) / "features.npy"
        np.save(path, rng.standard_normal((args.rows, args.dim)).astype(np.float16))
        feats = np.load(path, mmap_mode="r")
        times, ways = (
            {},
            {
                "format 1: per batch": lambda: per_batch(feats, shard, args.batch),
                "format 2: blocks of 1,024 read back": lambda: blocked(feats, shard),
            },
        )
        for name, fn in ways.items():
            fn()  # warm the page cache
            t = time.perf_counter()
            out = fn()
            times[name] = (time.perf_counter() - t, out)
    (_, g1), (_, g2) = times.values()
    print(f"Gram of {args.rows:,} float16 rows x {args.dim:,}, shards of {shard:,}, batch {args.batch}, 1 thread\n")
    print("| reduction | s | rows/s |\n|---|---:|---:|")
    for name, (t, _) in times.items():
        print(f"| {name} | {t:.2f} | {args.rows / t:,.0f} |")
    print(f"\nmax |difference| / max |Gram|: {np.abs(g1 - g2).max() / np.abs(g2).max():.1e}\n")
    n, dim, group = args.scale_rows, args.scale_dim, FeaturizeConfig().gram_group
    shards, size = math.ceil(n / shard), dim * dim * 8
    print(f"Partials at {n:.0e} rows, dim {dim:,} (float16 features {n * dim * 2 / 1e12:.1f} TB)\n")
    print("| format | files | each GB | total TB |\n|---|---:|---:|---:|")
    for name, files in (
        ("1: one per shard", shards),
        (f"2: one per group of {group} shards", math.ceil(shards / group)),
    ):
        print(f"| {name} | {files:,} | {size / 1e9:.2f} | {files * size / 1e12:.1f} |")


if __name__ == "__main__":
    main()
