"""SemDeDup's memory: every embedding in RAM (finish(parts)) against the on-disk store (score_pool's path), as a table.

Synthetic unit embeddings, N x d float32 (default 200,000 x 128 = 102 MB), made in 4,096-row batches from a seeded
stream; in each batch the last 10% of rows are near-copies (noise 0.01) of its first rows. Each row of the table is
one fresh process running one path on the same embeddings, with a fixed eps (one pass of the greedy rule):

  ram      the batches concatenated in RAM, then SemDeDup.dedup on the array (what finish(parts) does)
  memmap   the batches written into an .npy memmap as they are made, then dedup on the memmap (score_pool's path)

Columns: tracemalloc's peak (numpy's heap: the arrays dsdm allocates; faiss's C++ buffers are not seen), VmHWM (the
process's peak resident set from /proc: it also counts the store's file pages while they are mapped, which the kernel
may drop, and the interpreter with its imports), wall seconds. One run each; on a shared machine the seconds are
indicative.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/semdedup_scale.py [--n 200000] [--dim 128] [--sample 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

BATCH = 4_096  # rows made at a time, as a pool chunk is embedded (dsdm.baselines.CHUNK = 2,048)


def batches(n: int, d: int, seed: int):
    """(start, (b, d) float32 unit rows) for consecutive batches; the last 10% of each batch copy its first rows."""
    for start in range(0, n, BATCH):
        rng = np.random.default_rng((seed, start))
        b = min(BATCH, n - start)
        x = rng.standard_normal(size=(b, d), dtype=np.float32)  # float32 throughout: no float64 batch to count
        dup = b // 10
        x[b - dup :] = x[:dup] + 0.01 * rng.standard_normal(size=(dup, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield start, x


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(path: str, n: int, d: int, sample: int, eps: float) -> dict:
    """Run one path in this process; -> its measurements."""
    from dsdm.baselines.semdedup import SemDeDup
    from dsdm.io import open_memmap

    est = SemDeDup(target_keep_fraction=0.0, eps=eps, kmeans_sample=sample, seed=0)
    started = time.time()
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as tmp:
        if path == "ram":
            x = np.concatenate([rows for _, rows in batches(n, d, 0)])
        else:
            store = open_memmap(Path(tmp) / "embeddings.npy", (n, d), np.float32)
            for start, rows in batches(n, d, 0):
                store[start : start + len(rows)] = rows
            store.flush()
            del store
            x = np.load(Path(tmp) / "embeddings.npy", mmap_mode="r")
        keep = est.dedup(x)
        del x
    _, peak = tracemalloc.get_traced_memory()
    return {
        "path": path,
        "sample": sample,
        "seconds": time.time() - started,
        "traced_mb": peak / 1e6,
        "hwm_mb": peak_rss_mb(),
        "kept": int(keep.sum()),
        "clusters": int(est.centroids_.shape[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--sample", type=int, default=20_000, help="kmeans_sample of the sampled memmap row")
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one path in this process, print JSON
    args = ap.parse_args()
    if args.one:
        path, sample = args.one.split(":")
        print(json.dumps(one(path, args.n, args.dim, int(sample), args.eps)))
        return
    size = args.n * args.dim * 4 / 1e6
    print(f"SemDeDup memory: N = {args.n:,} embeddings of d = {args.dim} float32 ({size:.0f} MB), eps = {args.eps}")
    print("| path | k-means trained on | tracemalloc peak (MB) | VmHWM (MB) | seconds | clusters | kept |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path, sample in (("ram", 0), ("memmap", 0), ("memmap", args.sample)):
        cmd = [sys.executable, __file__, "--n", str(args.n), "--dim", str(args.dim), "--eps", str(args.eps)]
        out = subprocess.run(cmd + ["--one", f"{path}:{sample}"], check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        trained = f"{sample:,}" if sample else f"all {args.n:,}"
        print(
            f"| {path} | {trained} | {r['traced_mb']:.1f} | {r['hwm_mb']:.0f} | {r['seconds']:.1f} "
            f"| {r['clusters']} | {r['kept']:,} |"
        )


if __name__ == "__main__":
    main()
