"""Evaluation models one after another (2 torch threads) against as Ray tasks (one thread each, two at once).

An experiment's evaluation models are independent; at nano size a 2-thread step uses 2 cores poorly (docs/benchmarks.md
"Evaluation models in parallel": 62k tokens/s for one 2-thread process, 2 x 43k for two 1-thread ones). This times
the runner's own resume of a finished run with `training.executor` local and ray: each arm copies the run's upstream
stages (pool, proxies, features, references, scores, selections) into a fresh folder and runs `dsdm.experiment.run`
there, so it trains and evaluates every model and renders the report. It prints one row per arm (wall seconds, the
training tokens over that time, the ratio to local) and how far the arms' holdout losses are apart (threads change
float rounding, not the recipe).

Run alone on the machine (the arms are timed; anything else on the cores distorts them):
    .venv/bin/dsdm demo --out runs/demo --set training.executor=local      # or any finished run
    .venv/bin/python benchmarks/parallel_models.py runs/demo --out runs/parallel-models
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from dsdm import results
from dsdm.experiment import load_experiment, plan_cells, run
from dsdm.pool import Pool

DOWNSTREAM = ("models", "eval", "results.csv", "report.md", "report.html", "figures")


def copy_upstream(src: Path, dst: Path) -> None:
    """dst = src without the evaluation models and what is made from them."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if Path(d) == src and n in DOWNSTREAM])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished experiment run directory (its config.yaml is used)")
    p.add_argument("--out", type=Path, default=Path("runs/parallel-models"), help="where the arms run")
    p.add_argument("--arms", default="local,ray", help="comma-separated: local, ray")
    p.add_argument("--cpus-per-model", type=float, default=1, help="ray arm: training.cpus_per_model")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides for both arms (KEY=VALUE)")
    args = p.parse_args(argv)

    rows, losses = [], {}
    for arm in args.arms.split(","):
        where = ["training.executor=local"] if arm == "local" else [
            "training.executor=ray", f"training.cpus_per_model={args.cpus_per_model:g}"]  # fmt: skip
        cfg = load_experiment(args.run / "config.yaml", args.set + where)
        dst = args.out / arm
        copy_upstream(args.run, dst)
        started = time.perf_counter()
        run(cfg, dst)
        seconds = time.perf_counter() - started
        pool = Pool(dst / "pool")
        cells = plan_cells(cfg, pool.seq_len, len(pool), pool.vocab_size)
        tokens = sum(c.tokens for c in cells)
        rows.append((arm, len(cells), tokens, seconds))
        key = results.KEY_COLUMNS + ["eval_task"]
        losses[arm] = {tuple(r[c] for c in key): r["loss"] for r in results.read(dst / "results.csv")}

    base = rows[0][3]
    print(f"\n{args.run}: {rows[0][1]} evaluation models, {rows[0][2]:,} training tokens in all\n")
    print("| arm | wall s (train + evaluate + report) | training tokens/s over that time | time / first arm |")
    print("|---|---:|---:|---:|")
    for arm, _, tokens, seconds in rows:
        print(f"| {arm} | {seconds:.1f} | {tokens / seconds:,.0f} | {seconds / base:.2f} |")
    if len(losses) == 2:
        a, b = losses.values()
        diff = np.abs(np.array([a[k] - b[k] for k in a]))
        print(f"\nholdout loss, |{' - '.join(losses)}| over {diff.size} (model, task) pairs: "
              f"mean {diff.mean():.4f}, max {diff.max():.4f} nats")  # fmt: skip


if __name__ == "__main__":
    main()
