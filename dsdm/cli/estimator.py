"""The DsDm estimator commands: `dsdm proxies train`, `dsdm featurize`, `dsdm score`, `dsdm select`,
`dsdm validate-lds`. Parsing only; the work is in dsdm.proxies / featurize / datamodel / validate."""

from __future__ import annotations

import argparse

from dsdm.cli import config_from_args

RAW = argparse.RawDescriptionHelpFormatter


def register(subparsers) -> None:
    from dsdm.cli import add_config_args

    # dsdm proxies train
    p = subparsers.add_parser("proxies", help="train the proxy models the estimator differentiates")
    psub = p.add_subparsers(dest="proxies_command", metavar="SUBCOMMAND")
    t = psub.add_parser(
        "train",
        help="train M proxies, each on its own seeded random fraction of the pool",
        formatter_class=RAW,
        description=(
            "Train M proxy LMs, proxy m on a seeded random subset (fraction of the pool) drawn from (seed, m).\n\n"
            "Reads: the pool directory (--pool).\n"
            "Writes under --out: subsets/proxy_<m>.npy (int64 indices), proxy_<m>/ (the trainer's checkpoint),\n"
            "manifest.json, _done.json. Finished proxies are skipped on a rerun. Trainer settings: --set train.KEY=V\n"
            "(dsdm.train.TrainConfig keys) or --config YAML shaped like the `proxy:` section of configs/demo.yaml.\n"
            "--executor ray trains the proxies side by side, one Ray task per proxy (--set ray_worker_cpus=N CPUs\n"
            "and torch threads each, or one GPU each on cuda); needs `pip install 'dsdm[ray]'`."
        ),
    )
    t.add_argument("--pool", required=True, metavar="DIR", help="pool directory (dsdm pool build)")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory for the proxies")
    t.add_argument("--n", type=int, help="number of proxies M (default 4)")
    t.add_argument("--fraction", type=float, help="fraction of the pool per proxy (default 0.4)")
    t.add_argument("--seed", type=int, help="seed of the subset draws (default 0)")
    t.add_argument(
        "--snapshots",
        type=_fractions,
        metavar="F[,F..]",
        help="also save and ensemble each proxy after these fractions of its training, e.g. 0.5 (default none)",
    )
    t.add_argument(
        "--executor", choices=["local", "ray"], help="local: one proxy after another (default); ray: side by side"
    )
    t.add_argument(
        "--ray-address", metavar="ADDR", help="executor=ray: auto | ray://HOST:PORT (default: a local cluster)"
    )
    add_config_args(t)
    t.set_defaults(func=_proxies)

    f = subparsers.add_parser(
        "featurize",
        help="projected per-example gradients of every proxy over the pool (resumable feature store)",
        formatter_class=RAW,
        description=(
            "Featurize the pool with every proxy: g(z) = sketch of grad f(z), f = mean per-token margin.\n"
            "  factorized (default): per-nn.Linear Kronecker sketch from activations and output gradients (fast)\n"
            "  dense: exact per-example gradients (torch.func) x seeded blockwise Rademacher matrix (reference);\n"
            "    --set dense_projection=srht applies a subsampled randomized Hadamard transform instead (O(p log p)\n"
            "    per example rather than p x k random signs per batch: the dense path for larger models)\n\n"
            "Reads: --pool, --proxies (dsdm proxies train).\n"
            "Writes under --out: manifest.json; per proxy proxy_<m>/features.npy (N, dim) float16|32, q.npy (N,),\n"
            "done.npy (N,) bool, while filling grams/gram_<a>_<b>.npy (one float64 Gram per group of gram_group\n"
            "shards), gram.npy (dim, dim) float64, manifest.json, _done.json; then _done.json. Interrupted runs\n"
            "resume shard by shard with bitwise-identical results.\n"
            "More settings via --set (batch_size, shard_size, gram_group, storage_dtype, seed, device, dense_params,\n"
            "dense_projection, executor, ray_worker_cpus).\n\n"
            'Scale out (README "Scale out"): --executor ray [--ray-address auto|ray://HOST:PORT] fills the stores\n'
            "with Ray actors; or run N jobs with --shard-index I --num-shards N on one --out, then once --finalize."
        ),
    )
    f.add_argument("--pool", required=True, metavar="DIR", help="pool directory")
    f.add_argument("--proxies", required=True, metavar="DIR", help="proxies directory (dsdm proxies train)")
    f.add_argument("--out", required=True, metavar="DIR", help="feature store directory")
    f.add_argument("--proj-dim", type=int, help="projection budget k (default 4096)")
    f.add_argument("--projector", choices=["factorized", "dense"], help="sketch type (default factorized)")
    f.add_argument(
        "--precondition",
        choices=["none", "adam"],
        help="adam: scale gradients by the proxies' AdamW second moment^-1/4 (docs/estimator.md); default none",
    )
    f.add_argument("--executor", choices=["local", "ray"], help="local (default) or ray: one actor per CPU worker/GPU")
    f.add_argument(
        "--ray-address", metavar="ADDR", help="executor=ray: auto | ray://HOST:PORT (default: a local cluster)"
    )
    f.add_argument(
        "--shard-index", type=int, metavar="I", help="fill only slice I of --num-shards N (a SLURM array job)"
    )
    f.add_argument("--num-shards", type=int, metavar="N", help="number of slices the jobs split the shards into")
    f.add_argument("--finalize", action="store_true", help="after the slices: reduce the Gram (refused if any missing)")
    add_config_args(f)
    f.set_defaults(func=_featurize)

    s = subparsers.add_parser(
        "score",
        help="DsDm scores of every pool example for target task(s) (larger = more helpful)",
        formatter_class=RAW,
        description=(
            "Per proxy: mean projected gradient over each task's target split, W = (K + lam I)^-1 gbar by Cholesky\n"
            "(float64, lam = ridge x mean diag K), scores = features @ W streamed in blocks; averaged over proxies,\n"
            "times the mean Q; tasks weighted equally. Larger = more helpful; select the k largest.\n\n"
            "Reads: --features (dsdm featurize), its pool and proxies, the task(s).\n"
            "Writes: --out (N,) float32 (task mix), <out>.tasks.npy (N, T) float32, <out>.json (tasks, settings)."
        ),
    )
    s.add_argument("--features", required=True, metavar="DIR", help="feature store (dsdm featurize)")
    s.add_argument(
        "--target", required=True, nargs="+", metavar="TASK", help="task(s): dir, FILE.jsonl or TARGET,HOLDOUT"
    )
    s.add_argument("--out", required=True, metavar="FILE.npy", help="score file to write")
    s.add_argument("--device", default="auto", help="device for target gradients (default auto)")
    add_config_args(s)
    s.set_defaults(func=_score)

    c = subparsers.add_parser(
        "select",
        help="the k largest scores -> indices.npy (best first) + selection.json",
        formatter_class=RAW,
        description=(
            "Keep the k largest scores (ties: lower index first), or the k smallest with --inverse.\n\n"
            "Reads: --scores (dsdm score, or any (N,) .npy where larger = keep) and its .json sidecar.\n"
            "Writes under --out: indices.npy (k,) int64 best first, selection.json (method, k, target, seed,\n"
            "config, pool fingerprint), optionally documents.jsonl|parquet (--docs)."
        ),
    )
    c.add_argument("--scores", required=True, metavar="FILE.npy", help="score file")
    c.add_argument("--k", type=int, required=True, help="number of examples to keep")
    c.add_argument("--out", required=True, metavar="DIR", help="selection directory")
    c.add_argument("--inverse", action="store_true", help="keep the k smallest (the paper's inverse control)")
    c.add_argument("--docs", choices=["none", "jsonl", "parquet"], default="none", help="also write the documents")
    c.set_defaults(func=_select)

    v = subparsers.add_parser(
        "validate-lds",
        help="linear datamodeling score + top-k / bottom-k sanity checks (trains models)",
        formatter_class=RAW,
        description=(
            "Train models on --subsets random subsets (--fraction of the pool each), measure their target loss and\n"
            "report the Spearman correlation with the datamodel's prediction (sum of scores over the subset; the\n"
            "LDS). Then train on the top-k, k random and the bottom-k examples and compare holdout losses.\n\n"
            "Reads: --pool, --features (dsdm featurize), --target.\n"
            "Writes under --out: scores.npy, subsets/, models/, lds.json. Trainer settings: --set train.KEY=V."
        ),
    )
    v.add_argument("--pool", required=True, metavar="DIR")
    v.add_argument("--features", required=True, metavar="DIR")
    v.add_argument("--target", required=True, metavar="TASK")
    v.add_argument("--out", required=True, metavar="DIR")
    v.add_argument("--subsets", type=int, help="number of LDS subsets (default 20)")
    v.add_argument("--fraction", type=float, help="fraction of the pool per subset (default 0.5)")
    add_config_args(v)
    v.set_defaults(func=_validate)

    r = subparsers.add_parser(
        "lds-rescore",
        help="LDS of other score files on the models an earlier validate-lds trained (no training)",
        formatter_class=RAW,
        description=(
            "Reuse the subsets and measured losses of a validate-lds run to compute the LDS of other score vectors\n"
            "of the same pool (larger = more helpful): another projection, k or ridge, or a baseline's scores.\n\n"
            "Reads: --lds DIR/lds.json, DIR/subsets/, DIR/scores.npy (for N); each --scores FILE.npy, shape (N,).\n"
            "Prints a table: LDS on the target split, its p-value, LDS on the holdout split."
        ),
    )
    r.add_argument("--lds", required=True, metavar="DIR", help="output directory of dsdm validate-lds")
    r.add_argument("--scores", required=True, nargs="+", metavar="FILE.npy", help="score vector(s), shape (N,)")
    r.set_defaults(func=_rescore)

    w = subparsers.add_parser(
        "lds-sweep",
        help="LDS of many estimator variants and baselines on the models one validate-lds run trained",
        formatter_class=RAW,
        description=(
            "Score estimator variants (ScoreConfig switches: use_q, ridge, normalize, kernel, exclude_layers,\n"
            "num_proxies; or other feature stores of the same pool) and baselines (DSIR) for every task a\n"
            "validate-lds run evaluated (its --set eval_tasks=[...]), on its subsets and losses: no training\n"
            "unless topk_fraction > 0.\n\n"
            "Reads: --lds DIR (lds.json, subsets/), --features DIR [NAME=DIR ...], --variants FILE.yaml (optional:\n"
            "name -> {ScoreConfig key: value, features: NAME, select: {rule: top_k | tempered, temperature: T |\n"
            "balanced, by: COLUMN}}; default: dsdm.lds_sweep.DEFAULT_VARIANTS).\n"
            "Writes under --out: sweep.csv (variant, target, lds, p, lds_holdout, subsets, regime, features,\n"
            "config, k, topk_loss, random_loss, random_loss_se), sweep.png, arms/ (selection-arm models),\n"
            "_done.json. Settings: --set regime='...' baselines=[dsir] device=cpu topk_fraction=0.074\n"
            "random_arms=3 (topk_fraction > 0: per variant and task, train the LDS run's recipe on the k examples\n"
            "the variant selects and report its holdout loss beside random k-subsets: what selection uses);\n"
            "arm_seeds=2 (each arm's loss the mean of that many training seeds; the first is reused);\n"
            "choose_on=[A,B] (per task, the variant with the best LDS on subsets A..B-1 and, as row `chosen`, its\n"
            "LDS on the other subsets: a held-out automatic choice, e.g. of the ridge);\n"
            "subset_range=[A,B] (those subsets only); replicas=[2,3] (a train_seeds > 1 run read against the mean\n"
            "of those training seeds only)."
        ),
    )
    w.add_argument("--lds", required=True, metavar="DIR", help="output directory of dsdm validate-lds")
    w.add_argument(
        "--features",
        required=True,
        nargs="+",
        metavar="[NAME=]DIR",
        help="the main feature store (DIR), and others as NAME=DIR for variants that name them",
    )
    w.add_argument("--variants", metavar="FILE.yaml", help="variants file (default: the built-in list)")
    w.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_config_args(w)
    w.set_defaults(func=_sweep)


def _fractions(text: str) -> list[float]:
    """--snapshots 0.25,0.5 -> [0.25, 0.5] (argparse turns the ValueError into a usage error naming the flag)."""
    return [float(x) for x in text.split(",") if x.strip()]


def _proxies(args) -> int:
    from dsdm.proxies import ProxiesConfig, run

    cfg = config_from_args(
        ProxiesConfig,
        args,
        n=args.n,
        fraction=args.fraction,
        seed=args.seed,
        snapshots=args.snapshots,
        executor=args.executor,
        ray_address=args.ray_address,
    )
    print(run(args.pool, args.out, cfg, force=args.force))
    return 0


def _featurize(args) -> int:
    from dsdm.featurize import FeaturizeConfig, run

    cfg = config_from_args(
        FeaturizeConfig,
        args,
        proj_dim=args.proj_dim,
        projector=args.projector,
        precondition=args.precondition,
        executor=args.executor,
        ray_address=args.ray_address,
    )
    if (args.shard_index is None) != (args.num_shards is None):
        raise ValueError("--shard-index and --num-shards go together (e.g. --shard-index $SLURM_ARRAY_TASK_ID)")
    slices = dict(shard_index=args.shard_index, num_shards=args.num_shards, finalize=args.finalize)
    print(run(args.pool, args.proxies, args.out, cfg, force=args.force, **slices))
    return 0


def _score(args) -> int:
    from dsdm.common import resolve_device
    from dsdm.datamodel import ScoreConfig, run

    cfg = config_from_args(ScoreConfig, args)
    print(run(args.features, args.target, args.out, cfg, resolve_device(args.device)[0]))
    return 0


def _select(args) -> int:
    from dsdm.datamodel import run_select

    rec = run_select(args.scores, args.k, args.out, inverse=args.inverse, docs=args.docs)
    print(f"{args.out}/indices.npy: {rec['k']} examples, {rec['rule']}")
    return 0


def _validate(args) -> int:
    from dsdm.validate import ValidateConfig, run

    cfg = config_from_args(ValidateConfig, args, subsets=args.subsets, fraction=args.fraction)
    rec = run(args.pool, args.features, args.target, args.out, cfg)
    print(f"LDS {rec['lds_target']:.3f} (target), {rec['lds_holdout']:.3f} (holdout); details in {args.out}/lds.json")
    if "sanity" in rec:
        print(
            f"top-k beats random: {rec['sanity']['top_beats_random']}; "
            f"bottom-k loses to random: {rec['sanity']['bottom_loses_to_random']}"
        )
    return 0


def _rescore(args) -> int:
    from dsdm.validate import rescore

    rows = rescore(args.lds, args.scores)
    print("| scores | LDS (target) | p | LDS (holdout) |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['scores']} | {row['lds_target']:+.3f} | {row['lds_target_p']:.2f} | {row['lds_holdout']:+.3f} |")
    return 0


def _sweep(args) -> int:
    from dsdm.lds_sweep import SweepConfig, markdown_table, read_variants, sweep

    cfg = config_from_args(SweepConfig, args)
    features = {}
    for item in args.features:
        name, _, path = item.partition("=") if "=" in item else ("main", "", item)
        if name in features:
            raise ValueError(f"--features: {name!r} given twice; name extra stores NAME=DIR")
        features[name] = path
    variants = read_variants(args.variants) if args.variants else None
    rows = sweep(args.lds, features, args.out, cfg, variants)
    print(markdown_table(rows))
    print(f"{args.out}/sweep.csv")
    return 0
