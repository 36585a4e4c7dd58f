"""`dsdm baseline NAME`: run one baseline selection method (or a DsDm score file) on a pool."""

from __future__ import annotations

import argparse

HELP = """\
Select k pool examples with one of DsDm's comparison methods (docs/method.md §4) and write them to --out:

  random        uniform without replacement (seeded)
  dsir          hashed uni+bigram importance weights towards the target, Gumbel top-k
  classifier    target-vs-pool logistic regression (or fastText) on hashed n-grams, top-k of the log-odds
  semdedup      embed + k-means + greedy near-duplicate removal (untargeted), k uniform draws from the kept set
  dsdm          top-k of a DsDm score file (--set scores=FILE.npy, written by `dsdm score`)
  dsdm-inverse  bottom-k of a DsDm score file (the paper's inverse control)

Reads: the pool directory (--pool), the target task(s) (--target, for dsir and classifier), a score file for dsdm.
Writes under --out: scores.npy ((N,) float32, larger = keep) or keep.npy ((N,) bool, semdedup), indices.npy
((k,) int64, ascending), selection.json (method, k, target, seed, settings, pool fingerprint, rule, kept fraction)
and _done.json. A finished --out with the same settings is left as is.

Method settings go through --set key=value (e.g. --set num_buckets=5000 --set features=tokens for dsir,
--set pareto_alpha=9 for classifier, --set target_keep_fraction=0.3 for semdedup); docs/baselines.md lists them.

Scale out (docs/baselines.md "Scale out"): --executor ray [--ray-address auto|ray://HOST:PORT] scores the pool's
chunks on Ray actors (dsir, classifier; the fit stays here), bitwise the scores of a local run.
"""


def register(subparsers) -> None:
    from dsdm.baselines import BASELINES, CHUNK
    from dsdm.cli import add_config_args

    p = subparsers.add_parser(
        "baseline",
        help="select k pool examples with random, dsir, classifier, semdedup, dsdm or dsdm-inverse",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=list(BASELINES), help="the selection method")
    p.add_argument("--pool", required=True, metavar="DIR", help="pool directory built by `dsdm pool build`")
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="TASK",
        help="target task (directory, FILE.jsonl or TARGET.jsonl,HOLDOUT.jsonl); repeatable; its target split is used",
    )
    p.add_argument("--k", type=int, required=True, help="number of pool examples to select")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--executor", choices=["local", "ray"], default="local", help="local (default) | ray (dsir, classifier)"
    )
    p.add_argument(
        "--ray-address", metavar="ADDR", help="executor=ray: auto | ray://HOST:PORT (default: a local cluster)"
    )
    p.add_argument("--ray-worker-cpus", type=float, default=1, metavar="C", help="executor=ray: CPUs per actor (1)")
    p.add_argument("--chunk-size", type=int, default=CHUNK, metavar="N", help=f"examples per chunk ({CHUNK})")
    add_config_args(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from dsdm.baselines import ExecutorConfig, run
    from dsdm.config import apply_overrides, load_yaml

    params = load_yaml(args.config) if args.config else {}
    params = apply_overrides(params, args.overrides)
    where = ExecutorConfig(args.executor, args.ray_address, args.ray_worker_cpus, args.chunk_size)
    opts = dict(seed=args.seed, params=params, force=args.force, where=where)
    record = run(args.name, args.pool, args.k, args.out, args.target, **opts)
    extra = ""
    if "kept_fraction" in record:
        extra = f", kept fraction {record['kept_fraction']:.3f} (eps {record['eps']:.4f})"
    print(f"{args.out}/indices.npy: {record['k']} examples by {record['method']} ({record['rule']}){extra}")
    return 0
