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
Writes under --out: config.yaml (resolved), pool/, proxies/, features/, scores/<method>_<target>/,
selections/<method>_<target>_<k>_s<seed>/, models/<cell>/, eval/<cell>/metrics.json,
results.csv (target, method, k, epochs, seed, tokens, eval_task, loss, accuracy, mc_accuracy, chance),
report.md, report.html and figures/.

Every stage folder ends with a record, _done.json: its config slice, the keys of its inputs and the sha256 of every
file it wrote. A re-run skips every stage whose record matches and resumes the rest (a killed run loses at most the
stage in progress, and training resumes from its last checkpoint). Before any work, every dependency of the config
is checked and every finished stage is compared with what this config would produce: a changed setting is refused,
naming the stages and keys (e.g. score.ridge), and nothing is written; --force recomputes exactly those stages and
everything downstream of them. One process at a time per --out (a lock names the holder's pid).
Check a finished run with `dsdm verify DIR`.
"""

DEMO_HELP = """\
The demo: configs/demo.yaml on the embedded data in data/demo/ (made by `dsdm data build-demo`).
Sized to finish in about 10 minutes on 2 CPU cores; prints the comparison table and the report's path.
Writes the same run directory as `dsdm experiment` under --out (default runs/demo).
Its evaluation models train as Ray tasks on a local Ray cluster, two at once on 2 cores (`training: {executor:
ray}`, needs `pip install 'dsdm[ray]'`, which `make demo` installs); without Ray: --set training.executor=local.
"""

REPORT_HELP = """\
Re-render report.md, report.html and figures/ of a run directory from its results.csv, selections/ and scores/
(e.g. after an interrupted run, or after changing dsdm.report). Reads and writes only inside DIR.
"""


VERIFY_HELP = """\
Check a run directory (or any folder written by a dsdm stage) against its stage records: every _done.json lists the
sha256 of each file its stage wrote, and the keys of the stages it read. verify re-hashes every listed file and names
each one that changed, is missing, or whose stage depends on an input that was recomputed after it.
Exit code 0 when everything matches, 1 when something does not. Reads only; writes nothing.
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

    p = subparsers.add_parser(
        "verify",
        help="re-hash every artifact of a run directory and name any file that changed, is missing or is stale",
        description=VERIFY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="DIR", help="a run directory, or any stage folder with a _done.json")
    p.set_defaults(func=main_verify)


def _run(cfg, out: Path, force: bool) -> int:
    import time

    from dsdm import results
    from dsdm.experiment import run as run_experiment
    from dsdm.report import comparison_table, text_table

    started = time.time()
    html = run_experiment(cfg, out, force=force)
    header, rows = comparison_table(results.read(out / "results.csv"), "loss")
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


def main_verify(args) -> int:
    from dsdm.io import verify

    problems, checked = verify(args.run_dir)
    for p in problems:
        print(p)
    print(f"{args.run_dir}: {checked} files checked, {len(problems)} problem(s)")
    return 1 if problems else 0
