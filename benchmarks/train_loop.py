"""End-to-end throughput of the trainer's loop (dsdm.train.train: data order, batch assembly, step, logging) on a
synthetic pool, printed as one table row per variant. benchmarks/models.py times the bare step; this adds what the
loop does around it, and the per-step cost of the data order as the selection grows (issue 15 item 1).

Variants are TrainConfig overrides, e.g. `--variant prefetch=0 --variant fused_optimizer=true --variant compile=true`
(the first row is always the defaults). `--order-sizes` times batch_indices (the per-step definition, O(n)) against
batch_stream (each epoch's permutation drawn once) per step at several selection sizes.

Run:  .venv/bin/python benchmarks/train_loop.py [--preset nano] [--steps 150] [--variant k=v[,k=v]] ...
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_pool(path: Path, n: int, seq_len: int, vocab: int):
    from dsdm.pool import Pool, PoolWriter

    rng = np.random.default_rng(0)
    w = PoolWriter(path, vocab_size=vocab)
    for i in range(n):
        w.add(rng.integers(0, vocab, size=seq_len), doc_id=f"d{i}", source="s")
    return Pool(w.close({"seq_len": seq_len, "mode": "document", "eos_id": 0}, config={"bench": True}))


def parse(variant: str) -> dict:
    import yaml

    return {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in variant.split(",") if kv)}


def main() -> None:
    from dsdm.train import TrainConfig, batch_indices, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--pool-size", type=int, default=4000)
    ap.add_argument("--variant", action="append", default=[], help="k=v[,k=v] TrainConfig overrides; repeatable")
    ap.add_argument("--order-sizes", default="100000,1000000,8000000", help="selection sizes for the order timing")
    args = ap.parse_args()

    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}; {args.preset}, {args.steps} steps x "
          f"{args.batch_size} x {args.seq_len}, pool of {args.pool_size}")  # fmt: skip
    print("| variant | tokens/s | s total |")
    print("|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        pool = synthetic_pool(Path(tmp) / "pool", args.pool_size, args.seq_len, args.vocab)
        for i, variant in enumerate([""] + args.variant):
            cfg = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, device="cpu",
                              checkpoint_every=10**9, **parse(variant))  # fmt: skip
            t0 = time.perf_counter()
            train(pool, None, cfg, Path(tmp) / f"run{i}")
            t = time.perf_counter() - t0
            tps = args.steps * args.batch_size * args.seq_len / t
            print(f"| {variant or 'defaults'} | {tps:,.0f} | {t:.1f} |", flush=True)

    try:
        from dsdm.train import batch_stream
    except ImportError:  # before issue 15
        return
    print("\n| selection size | batch_indices ms/step | batch_stream ms/step (incl. one draw per epoch) |")
    print("|---:|---:|---:|")
    for n in (int(x) for x in args.order_sizes.split(",")):
        idx = np.arange(n, dtype=np.int64)
        t0 = time.perf_counter()
        for s in range(3):
            batch_indices(idx, s, args.batch_size, 0)
        old = (time.perf_counter() - t0) / 3
        stream = batch_stream(idx, 0, args.batch_size, 0)
        next(stream)  # the epoch's draw
        t0 = time.perf_counter()
        steps = 2000
        for _ in range(steps):
            next(stream)
        new = (time.perf_counter() - t0) / steps
        print(f"| {n:,} | {1000 * old:.1f} | {1000 * new:.4f} |", flush=True)


if __name__ == "__main__":
    main()
