"""`dsdm plan CONFIG.yaml`: per-stage FLOPs, time, disk and memory of an experiment before any work (dsdm.plan)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="what an experiment config will cost (FLOPs, time, disk, memory per stage), before any work",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Per stage of `dsdm experiment CONFIG`: FLOPs, expected time on the named hardware, disk, peak RAM and\n"
            "GPU memory, and warnings naming the setting that makes it fit. CPU times come from a cost model fitted\n"
            'to measured throughputs (dsdm/plan.py, docs/benchmarks.md "`dsdm plan` against measured runs"); GPU\n'
            "times assume 35% of the bf16 peak until a GPU benchmark is recorded.\n"
            "Reads the config, the task files (their sizes) and, if pool.path exists, the pool's manifest; writes\n"
            "nothing."
        ),
    )
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--pool-examples", type=int, metavar="N", help="pool size N (default: the existing pool's)")
    p.add_argument("--gpus", type=int, default=1, metavar="G", help="devices the stages spread over (default 1)")
    p.add_argument("--gpu", default="cpu", choices=["cpu", "a100", "h200"], help="hardware to time on (default cpu)")
    p.add_argument("--out", default="runs", metavar="DIR", help="where the run would go (for the free-disk check)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    from pathlib import Path

    from dsdm.experiment import load_experiment
    from dsdm.plan import check_fit, plan, table

    cfg = load_experiment(args.config, args.overrides)
    seq_len, vocab, n = _pool_shape(cfg)
    n = args.pool_examples or n
    if not n:
        raise ValueError(f"{args.config}: pool.path does not exist yet; give its size with --pool-examples N")
    stages, warnings, note = plan(cfg, n, seq_len, vocab, args.gpus, args.gpu)
    print(f"{cfg.name}: pool {n:,} examples x {seq_len} tokens, vocabulary {vocab}; times on {args.gpus} x "
          f"{args.gpu}, {note}\n")  # fmt: skip
    print(table(stages))
    for w in warnings + check_fit(stages, Path(args.out)):
        print(f"warning: {w}")
    return 0


def _pool_shape(cfg) -> tuple[int, int, int]:
    """(seq_len, vocab, examples) of the existing pool, or (from pool.build, 0) when it is still to be built."""
    from pathlib import Path

    if cfg.pool.path and Path(cfg.pool.path).exists():
        from dsdm.pool import Pool

        pool = Pool(cfg.pool.path)
        return pool.seq_len, pool.vocab_size, len(pool)
    build = cfg.pool.build
    tok = str(build.get("tokenizer", "train:8192"))
    vocab = int(tok.split(":")[1]) if tok.startswith("train:") else 50257 if tok == "gpt2" else 8192
    return int(build.get("seq_len", 512)), vocab, 0
