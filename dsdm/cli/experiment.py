"""`dsdm experiment CONFIG --out DIR`, `dsdm demo --out DIR` and `dsdm report DIR`: the comparison that closes the
experiment (docs/method.md §6, §9.2 steps 5-7), its embedded-data demo, and re-rendering a report."""

from __future__ import annotations

import argparse
from pathlib import Path

EXPERIMENT_HELP = """\
Run the whole comparison described by CONFIG (see configs/ and docs/experiments.md):
build (or open) the pool, train the proxies, featurize and score (DsDm), run every baseline, and for each target,
method, selection size k and seed train an evaluation model at the fixed token budget and evaluate it on every
holdout and unseen task. Random-data models at 1x, 2x, 4x... the budget give the compute curve.

Reads: CONFIG (YAML), the pool inputs or pool directory, the task directories it names.
Writes under --out: config.yaml (resolved), pool/, proxies/, features/, scores/,
selections/<method>_<target>_<k>_s<seed>/, models/<cell>/, eval/<cell>.json,
results.csv (target, method, k, epochs, seed, tokens, eval_task, loss, accuracy),
report.md, report.html and figures/. Every stage and cell is cached: a re-run skips finished work; a changed setting
is refused naming the key (use another --out, or --force to redo).
"""

DEMO_HELP = """\
The demo: configs/demo.yaml on the embedded data in data/demo/ (made by `dsdm data build-demo`).
Sized to finish in about 10 minutes on 2 CPU cores; prints the comparison table and the report's path.
Writes the same run directory as `dsdm experiment` under --out (default runs/demo).
"""

REPORT_HELP = """\
Re-render report.md, report.html and figures/ of a run directory from its results.csv, selections/ and scores/
(e.g. after an interrupted run, or after changing dsdm.report). Reads and writes only inside DIR.
"""


def register(subparsers) -> None:
    from dsdm.cli import add_config_args

    p = subparsers.add_parser(
        "experiment",
        help="select with every method, train + evaluate a model per selection, write results.csv and a report",
        description=EXPERIMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="experiment YAML (same as --config)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (created; re-runs resume it)")
    add_config_args(p)
    p.set_defaults(func=main_experiment)

    p = subparsers.add_parser(
        "demo",
        help="the experiment on the embedded demo data (configs/demo.yaml), ~10 min on 2 CPU cores",
        description=DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory (default runs/demo)")
    add_config_args(p)
    p.set_defaults(func=main_demo)

    p = subparsers.add_parser(
        "report",
        help="re-render report.md / report.html of a run directory from its results.csv",
        description=REPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="DIR", help="run directory of `dsdm experiment` or `dsdm demo`")
    p.set_defaults(func=main_report)


def _run(cfg, out: Path, force: bool) -> int:
    import time

    from dsdm.experiment import read_results
    from dsdm.experiment import run as run_experiment
    from dsdm.report import comparison_table, text_table

    started = time.time()
    html = run_experiment(cfg, out, force=force)
    header, rows = comparison_table(read_results(out / "results.csv"), "loss")
    print("\nHoldout loss (mean per-token NLL of the continuation), mean ± s.d. over seeds:\n")
    print(text_table(header, rows))
    print(f"\nresults: {out / 'results.csv'}\nreport:  {html}\nwall time: {time.time() - started:.0f} s")
    return 0


def main_experiment(args) -> int:
    from dsdm.experiment import load_experiment

    path = args.config_file or args.config
    if not path:
        raise ValueError("give the experiment config: dsdm experiment CONFIG.yaml --out DIR")
    if args.config_file and args.config:
        raise ValueError("give the config once: either CONFIG or --config")
    return _run(load_experiment(path, args.overrides), Path(args.out), args.force)


def main_demo(args) -> int:
    from dsdm.experiment import REPO_ROOT, load_experiment

    path = args.config or REPO_ROOT / "configs" / "demo.yaml"
    if not (REPO_ROOT / "data" / "demo").is_dir():
        raise FileNotFoundError(
            f"{REPO_ROOT / 'data' / 'demo'} not found: the demo needs the embedded data; build it with "
            "`dsdm data build-demo` (or check out a dsdm version that ships data/demo/)"
        )
    return _run(load_experiment(path, args.overrides, base_dir=REPO_ROOT), Path(args.out), args.force)


def main_report(args) -> int:
    from dsdm.report import render

    print(render(args.run_dir))
    return 0
