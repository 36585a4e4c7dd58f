"""Which sources a selection draws from, against the pool: the diagnostic behind docs/estimator.md round 15.

Two uses, each printing one row per selection with every source's share (pool first):
- `--selections DIR [DIR ...]`: the indices.npy of finished selections (e.g. an experiment's selections/*), so DsDm's
  and DSIR's choices for one target can be read side by side.
- `--features DIR --target TASK [...]`: DsDm's scores for each target task from a feature store (`dsdm score`'s code,
  ScoreConfig overrides with --set), their top `--fraction` of the pool, and the share of the standardized scores'
  variance that lies between sources (sum over sources of share x squared source mean; 0 = the score ranks examples
  only within sources, 1 = only by source).

Run:  .venv/bin/python benchmarks/selection_sources.py --pool runs/repro-cpu15/pool \
        --selections runs/repro-cpu15/selections/dsdm_squad_7360_s0 runs/repro-cpu15/selections/dsir_squad_7360_s0
      .venv/bin/python benchmarks/selection_sources.py --pool runs/regime/demo/pool \
        --features runs/lds/features8-k1024 --target data/demo/tasks/squad_style --set num_proxies=8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dsdm.config import load_config
from dsdm.datamodel import ScoreConfig, score_tasks
from dsdm.pool import Pool
from dsdm.select import top_k


def shares(codes: np.ndarray, order: np.ndarray, indices: np.ndarray | None = None) -> list[float]:
    """Fraction of `indices` (default: the whole pool) from each source code of `order`; codes from Pool.codes."""
    picked = np.bincount(codes if indices is None else codes[indices], minlength=int(codes.max()) + 1)
    return (picked[order] / picked.sum()).tolist()


def between_share(scores: np.ndarray, codes: np.ndarray) -> float:
    """Share of the variance of the standardized scores explained by the source means, (N,), (N,) -> [0, 1]."""
    z = (scores - scores.mean()) / scores.std()
    return float(sum((codes == c).mean() * z[codes == c].mean() ** 2 for c in np.unique(codes)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, required=True, help="pool directory (its meta.parquet has `source`)")
    ap.add_argument("--selections", type=Path, nargs="+", default=[], help="selection directories (indices.npy)")
    ap.add_argument("--features", type=Path, help="feature store to score targets with")
    ap.add_argument("--target", nargs="+", default=[], help="target task(s), each scored on its own")
    ap.add_argument("--fraction", type=float, default=0.178, help="top fraction of the pool (default: the repro's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ScoreConfig override")
    args = ap.parse_args()
    if bool(args.features) != bool(args.target):
        raise SystemExit("--features and --target go together")
    codes, labels = Pool(args.pool).codes("source")
    order = np.argsort(-np.bincount(codes, minlength=len(labels)), kind="stable")  # most common first
    print("| selection | k | between | " + " | ".join(labels[c] for c in order) + " |")
    print("|---|---:|---:|" + "---:|" * len(order))
    print(f"| pool | {codes.size} | | " + " | ".join(f"{x:.3f}" for x in shares(codes, order)) + " |")
    for d in args.selections:
        idx = np.load(d / "indices.npy")
        print(
            f"| {d.parent.parent.name}/{d.name} | {idx.size} | | "
            + " | ".join(f"{x:.3f}" for x in shares(codes, order, idx))
            + " |"
        )
    if args.features:
        cfg = load_config(ScoreConfig, None, args.set)
        scores, names = score_tasks(args.features, args.target, cfg, "cpu")
        k = int(round(args.fraction * codes.size))
        for j, name in enumerate(names):
            idx = top_k(scores[:, j], k)
            row = " | ".join(f"{x:.3f}" for x in shares(codes, order, idx))
            print(f"| dsdm {name} {' '.join(args.set)} | {k} | {between_share(scores[:, j], codes):.3f} | {row} |")


if __name__ == "__main__":
    main()
