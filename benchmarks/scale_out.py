"""Featurize scale-out on one machine (issue 16): 1 local process of 1 torch thread (or --local-threads) vs W Ray
actors of 1 thread each, on the same pool and proxy; the stores must be bitwise equal (with 1 local thread). Then
Ray's overhead per shard (a round trip to an actor doing nothing) and the shard size that keeps it under 2% of a
shard's work. Prints a markdown table.

    .venv/bin/python benchmarks/scale_out.py                      # 512 examples, seq 128, preset tiny, 2 workers
    .venv/bin/python benchmarks/scale_out.py --examples 256 --preset micro
    .venv/bin/python benchmarks/scale_out.py --examples 16384 --preset nano --vocab 512 --shard-size 1024 \
        --local-threads 2                                         # the repro's featurize: which executor on 2 cores

Run it on a quiet machine: with other jobs on the cores the speedup measures the contention, not dsdm.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dsdm import featurize as F
from dsdm.io import write_json
from dsdm.model import build_model, save_model
from dsdm.pool import Pool, PoolWriter


class Noop:
    """An actor that does nothing per shard: its round trip is Ray's overhead per shard."""

    def run(self, start, stop):
        return "done"


def build(root: Path, examples: int, seq_len: int, preset: str, vocab: int) -> None:
    rng = np.random.default_rng(0)
    w = PoolWriter(root / "pool", vocab_size=vocab)
    for i in range(examples):
        w.add(rng.integers(1, vocab, size=seq_len), doc_id=f"d{i}", source="s")
    pool = Pool(w.close({"seq_len": seq_len, "eos_id": 0}, {}))
    torch.manual_seed(0)
    save_model(build_model(preset, vocab_size=vocab, seq_len=seq_len), root / "proxies" / "proxy_0")
    write_json(root / "proxies" / "manifest.json", {"pool_fingerprint": pool.fingerprint, "models": ["proxy_0"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--proj-dim", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--local-threads", type=int, default=1, help="torch threads of the local arm (default 1)")
    args = ap.parse_args()
    os.environ.setdefault("DSDM_PROGRESS", "0")
    import ray

    from dsdm.shards import run_on_actors

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.examples, args.seq_len, args.preset, args.vocab)
        cfg = dict(proj_dim=args.proj_dim, batch_size=16, shard_size=args.shard_size, device="cpu")
        torch.set_num_threads(args.local_threads)
        t0 = time.perf_counter()
        F.run(root / "pool", root / "proxies", root / "local", F.FeaturizeConfig(**cfg))
        local = time.perf_counter() - t0
        torch.set_num_threads(1)
        ray.init(num_cpus=args.workers, include_dashboard=False)
        noop_shards = [(i, i + 1) for i in range(400)]
        run_on_actors(Noop, {}, noop_shards[:20], num_cpus=1)  # warm: workers started
        t0 = time.perf_counter()
        run_on_actors(Noop, {}, noop_shards, num_cpus=1, num_workers=1)
        overhead = (time.perf_counter() - t0) / len(noop_shards)
        t0 = time.perf_counter()
        F.run(root / "pool", root / "proxies", root / "ray", F.FeaturizeConfig(**cfg, executor="ray"))
        distributed = time.perf_counter() - t0
        ray.shutdown()
        same = all(
            np.load(root / "local/proxy_0" / n).tobytes() == np.load(root / "ray/proxy_0" / n).tobytes()
            for n in ("features.npy", "q.npy", "gram.npy")
        )
    per_example = local / args.examples
    n_shards = -(-args.examples // args.shard_size)
    print(
        f"pool {args.examples} x {args.seq_len} tokens, V = {args.vocab}, preset {args.preset}, k={args.proj_dim}, "
        f"{n_shards} shards"
    )
    print("| run | wall s | examples/s | speedup | bitwise equal |\n|---|---:|---:|---:|---|")
    local_arm = f"local, 1 process x {args.local_threads} thread{'s' if args.local_threads > 1 else ''}"
    print(f"| {local_arm} | {local:.1f} | {args.examples / local:.1f} | 1.00x | - |")
    print(
        f"| Ray, {args.workers} actors x 1 thread (incl. actor start) | {distributed:.1f} | "
        f"{args.examples / distributed:.1f} | {local / distributed:.2f}x | {same} |"
    )
    print(
        f"\nRay overhead per shard: {overhead * 1e3:.2f} ms (a no-op actor call, 400 calls); "
        f"{per_example * 1e3:.1f} ms per example here, so shards of >= {int(np.ceil(50 * overhead / per_example))} "
        "examples keep it under 2%"
    )


if __name__ == "__main__":
    main()
