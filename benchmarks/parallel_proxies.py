"""Proxies one after another (the local executor, torch's default threads) against as Ray tasks side by side
(`proxy.executor: ray`, one task per proxy, `ray_worker_cpus` threads each).

The M proxies are independent, like the evaluation models (docs/benchmarks.md "Evaluation models in parallel"), so
on a cluster they train in the time of one; on this machine's 2 cores the question is whether two 1-thread nano
trainings beat one 2-thread one. Each arm trains a finished run's proxies again, from its config.yaml's `proxy:`
section and its pool, into a fresh folder with `dsdm.proxies.run`, and the script prints one row per arm (wall
seconds, training tokens/s over that time, the ratio to the first arm) and how far the arms' final weights are apart
(thread counts change float rounding, not the recipe; 1-thread Ray tasks are bitwise a 1-thread local run,
tests/test_ray.py).

Run alone on the machine (the arms are timed; anything else on the cores distorts them):
    .venv/bin/python benchmarks/parallel_proxies.py runs/repro-cpu --out runs/parallel-proxies
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from dsdm.config import from_dict
from dsdm.experiment import load_experiment
from dsdm.proxies import ProxiesConfig, run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished experiment run directory (its config.yaml and pool/)")
    p.add_argument("--out", type=Path, default=Path("runs/parallel-proxies"), help="where the arms train")
    p.add_argument("--arms", default="local,ray", help="comma-separated: local, ray")
    p.add_argument("--cpus-per-proxy", type=float, default=1, help="ray arm: proxy.ray_worker_cpus")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides for both arms (KEY=VALUE)")
    args = p.parse_args(argv)

    pool_dir = args.run / "pool"
    if not (pool_dir / "_done.json").exists():
        raise SystemExit(f"{pool_dir}: no finished pool there; pass a finished run directory (dsdm experiment)")
    rows, weights = [], {}
    for arm in args.arms.split(","):
        where = ["proxy.executor=local"] if arm == "local" else [
            "proxy.executor=ray", f"proxy.ray_worker_cpus={args.cpus_per_proxy:g}"]  # fmt: skip
        cfg = load_experiment(args.run / "config.yaml", args.set + where)
        pcfg = from_dict(ProxiesConfig, cfg.proxy, prefix="proxy.")
        dst = args.out / arm
        if dst.exists():
            shutil.rmtree(dst)
        started = time.perf_counter()
        run(pool_dir, dst, pcfg)
        seconds = time.perf_counter() - started
        tokens = sum(json.loads((dst / f"proxy_{m}" / "train.json").read_text())["tokens"] for m in range(pcfg.n))
        rows.append((arm, pcfg.n, tokens, seconds))
        weights[arm] = [load_file(dst / f"proxy_{m}" / "model.safetensors") for m in range(pcfg.n)]

    base = rows[0][3]
    print(f"\n{args.run}: {rows[0][1]} proxies, {rows[0][2]:,} training tokens in all\n")
    print("| arm | wall s | training tokens/s | time / first arm |")
    print("|---|---:|---:|---:|")
    for arm, _, tokens, seconds in rows:
        print(f"| {arm} | {seconds:.1f} | {tokens / seconds:,.0f} | {seconds / base:.2f} |")
    if len(weights) == 2:
        a, b = weights.values()
        diff = max(float(np.abs(x[k] - y[k]).max()) for x, y in zip(a, b) for k in x)
        same = all(x[k].tobytes() == y[k].tobytes() for x, y in zip(a, b) for k in x)
        print(f"\nfinal weights, {' vs '.join(weights)}: {'bitwise equal' if same else f'max |diff| {diff:.2e}'}")


if __name__ == "__main__":
    main()
