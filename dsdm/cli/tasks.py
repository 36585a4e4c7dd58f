"""`dsdm tasks check` and `dsdm tasks check-leak`: validate target-task files, and find holdout examples that
occur in a pool (dsdm.tasks)."""

from __future__ import annotations

import argparse

TASK_SPEC = (
    "a directory with target.jsonl + holdout.jsonl, one JSONL with a split field, or TARGET.jsonl,HOLDOUT.jsonl "
    "(named after the two files' common stem: qa.target.jsonl,qa.holdout.jsonl is 'qa'); any of them behind "
    "name=NAME: takes that name, e.g. name=qa:t.jsonl,h.jsonl"
)


def register(sub) -> None:
    p = sub.add_parser("tasks", help="validate task files; check holdouts for leaks into a pool")
    tsub = p.add_subparsers(dest="tasks_command", metavar="SUBCOMMAND")
    c = tsub.add_parser(
        "check",
        help="load and validate tasks, print their sizes",
        description="Loads each TASK (" + TASK_SPEC + "), validates every row (errors name the file and line) and "
        "prints the split sizes and example kinds. Task text may hold TAB and newline but no other control character. "
        "Exits 1 if any task is invalid. Writes nothing.",
    )
    c.add_argument("tasks", nargs="+", metavar="TASK")
    c.set_defaults(func=check)
    leak = tsub.add_parser(
        "check-leak",
        help="report holdout examples whose text occurs in a pool",
        description="Reads a pool (--pool) and each TASK's holdout split, and reports the holdout examples whose "
        "normalized context + continuation (NFKC, lowercase, whitespace collapsed) occurs in the decoded pool text. "
        "Exits 1 if any leak is found. Writes nothing.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    leak.add_argument("--pool", required=True, metavar="DIR", help="pool directory (dsdm pool build)")
    leak.add_argument("tasks", nargs="+", metavar="TASK")
    leak.add_argument("--show", type=int, default=5, help="leaked example ids shown per task (default 5)")
    leak.set_defaults(func=check_leak)
    ex = tsub.add_parser(
        "export-lm-eval",
        help="write a task as an lm-evaluation-harness task folder (YAML + local data)",
        description="Reads TASK (" + TASK_SPEC + ") and writes under --out an lm-eval task: <split>.jsonl with "
        "the multiple-choice form dsdm evaluates (the task's own choices, or the answer and 3 seeded distractors "
        "drawn from the task) and dsdm_<name>.yaml (output_type multiple_choice, metrics acc and acc_norm; data "
        "named by absolute path). Run it with `dsdm evaluate --lm-eval DIR` or `lm_eval --include_path DIR "
        "--tasks dsdm_<name>`; both run offline.",
    )
    ex.add_argument("task", metavar="TASK")
    ex.add_argument("--out", required=True, metavar="DIR")
    ex.add_argument("--split", default="holdout", choices=["target", "holdout"])
    ex.add_argument("--seed", type=int, default=0, help="seed of the distractors (default 0, as dsdm evaluate)")
    ex.set_defaults(func=export_lm_eval)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _kinds(examples) -> str:
    mc = sum(ex.choices is not None for ex in examples)
    text = sum(ex.choices is None and not ex.context for ex in examples)
    parts = [f"{len(examples) - mc - text} context+continuation", f"{mc} multiple choice", f"{text} text"]
    return ", ".join(p for p in parts if not p.startswith("0 "))


def check(args) -> int:
    from dsdm.tasks import load_task

    failed = 0
    print(f"{'task':24s} {'target':>7s} {'holdout':>8s}  kinds")
    for spec in args.tasks:
        try:
            t = load_task(spec)
        except (ValueError, FileNotFoundError) as e:
            failed += 1
            print(f"{spec}: INVALID: {e}")
            continue
        print(f"{t.name[:24]:24s} {len(t.target):7d} {len(t.holdout):8d}  {_kinds(t.target + t.holdout)}")
    return 1 if failed else 0


def check_leak(args) -> int:
    from dsdm.pool import Pool
    from dsdm.tasks import find_leaks, load_task

    tasks = [load_task(spec) for spec in args.tasks]
    leaks = find_leaks(Pool(args.pool), tasks)
    print(f"{'task':24s} {'holdout':>8s} {'leaked':>7s}  examples")
    for t in tasks:
        ids = leaks[t.name]
        shown = ", ".join(ids[: args.show]) + (" ..." if len(ids) > args.show else "")
        print(f"{t.name[:24]:24s} {len(t.holdout):8d} {len(ids):7d}  {shown}")
    return 1 if any(leaks.values()) else 0


def export_lm_eval(args) -> int:
    from dsdm.harness import export_task
    from dsdm.tasks import load_task

    print(export_task(load_task(args.task), args.out, args.split, args.seed))
    return 0
