"""`dsdm` command line: one subcommand per pipeline stage, each a thin wrapper around `<module>.run(...)`.

Each command group lives in its own file under dsdm/cli/ and exposes `register(subparsers)`, which adds its
subcommand(s) and sets `func` to a function taking the parsed args and returning an exit code. The CLI parses
arguments, loads and validates the config and calls the stage; it holds no pipeline logic. Heavy imports (torch,
transformers) happen inside the command functions, so `dsdm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name shown in --help order -> module providing register(subparsers)
COMMANDS: list[str] = [
    "dsdm.cli.baselines",
    "dsdm.cli.estimator",
    "dsdm.cli.experiment",
    "dsdm.cli.data",
    "dsdm.cli.pool",
    "dsdm.cli.tasks",
    "dsdm.cli.models",
    "dsdm.cli.plan",
]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config FILE.yaml, --set key=value (repeatable) and --force, shared by every stage command."""
    parser.add_argument("--config", metavar="YAML", help="YAML file with this stage's settings (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one setting, dotted (e.g. --set proj_dim=512); repeatable; unknown keys are an error",
    )
    parser.add_argument("--force", action="store_true", help="redo the stage even if its outputs are marked done")


def config_from_args(cls, args, **explicit):
    """YAML (--config) -> --set overrides -> explicit flags (those not None) -> validated dataclass `cls`."""
    from dsdm.config import apply_overrides, from_dict, load_yaml

    data = apply_overrides(load_yaml(args.config) if args.config else {}, args.overrides)
    data.update({k: v for k, v in explicit.items() if v is not None})
    return from_dict(cls, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsdm",
        description=(
            "DsDm: model-aware dataset selection with datamodels (Engstrom, Feldmann, Madry, ICML 2024). "
            "Build a tokenized pool, train proxy LMs, featurize with projected gradients, score the pool against "
            "target tasks, select the top k, and compare against baselines by training and evaluating models."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from dsdm import __version__

    parser.add_argument("--version", action="version", version=f"dsdm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Offline by design: nothing may reach a model or dataset hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from dsdm.common import MissingDependency

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, MissingDependency) as e:
        # User-facing errors (bad input, bad config, a missing extra) end with one clear line and exit code 2, as
        # argparse does for bad arguments; DSDM_DEBUG=1 shows the traceback instead.
        if os.environ.get("DSDM_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"dsdm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's trouble, not the input's (disk full, permissions): one line, exit 1
        if os.environ.get("DSDM_DEBUG"):
            raise
        print(f"dsdm {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
