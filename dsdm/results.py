"""results.csv: one row per (evaluation model, eval task), the table every report and comparison reads.

This module owns the columns and their read/write; the runner writes rows through it and the report reads them
through it (neither imports the other). Rows come from the planned cells' `eval/<cell>/metrics.json` only, so a cell
left over from an earlier configuration of the same run directory can never enter the table.

Columns:
    target, method, k, epochs, seed, tokens   the cell (dsdm.experiment.Cell)
    eval_task                                  the task whose holdout split was scored
    loss                                       mean per-token NLL of the continuation (nats)
    accuracy                                   greedy exact match of the whole continuation
    mc_accuracy, chance                        multiple-choice accuracy and its chance level (empty: no MC form)
    d_model, compute                           the model's width (0: the configured evaluation model's) and its
                                               training FLOPs / those of the 1x random-data model (the compute
                                               curve's multiplier; empty in runs from before the columns existed)
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from dsdm.io import atomic_path, read_json

UNTARGETED_NAME = "untargeted"  # the `target` of cells whose selection does not depend on a target
KEY_COLUMNS = ["target", "method", "k", "epochs", "seed", "tokens"]
METRICS = ["loss", "accuracy", "mc_accuracy", "chance"]
CELL_EXTRAS = {"d_model": 0, "compute": None}  # cell fields after the key, with their value in older records
COLUMNS = KEY_COLUMNS + ["eval_task"] + METRICS + list(CELL_EXTRAS)
OPTIONAL = ("mc_accuracy", "chance", *CELL_EXTRAS)  # absent from results.csv files written before they existed
INTS = ("k", "seed", "tokens", "d_model")
FLOATS = ("epochs", "loss", "accuracy", "mc_accuracy", "chance", "compute")


def rows_of(metrics_record: dict) -> list[dict]:
    """The rows of one evaluation record ({"cell": {...}, "metrics": {task: {...}}})."""
    cell = metrics_record["cell"]
    extras = {k: cell.get(k, default) for k, default in CELL_EXTRAS.items()}
    return [
        {**{k: cell[k] for k in KEY_COLUMNS}, "eval_task": task, **{c: m.get(c) for c in METRICS}, **extras}
        for task, m in metrics_record["metrics"].items()
    ]


def sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in ("target", "method", "eval_task")) + (r["k"], r["seed"]))


def collect(metrics_files: list[Path]) -> list[dict]:
    """Rows of the given metrics.json files, sorted."""
    return sort_rows([row for path in metrics_files for row in rows_of(read_json(path))])


def write(path: str | Path, rows: list[dict]) -> Path:
    """Write `rows` as results.csv, atomically; None becomes an empty cell."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({c: ("" if r.get(c) is None else r[c]) for c in COLUMNS} for r in rows)
    return path


def read(path: str | Path) -> list[dict]:
    """results.csv -> rows with k, seed, tokens as int and the metrics as float (NaN where empty)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `dsdm experiment CONFIG --out {path.parent}` first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = sorted(set(COLUMNS) - set(OPTIONAL) - set(rows[0])) if rows else []
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; is it a dsdm results.csv?")
    for r in rows:
        for k in INTS:
            r[k] = int(r.get(k) or 0) if k in OPTIONAL else int(r[k])  # d_model: absent in older files
        for k in FLOATS:
            v = r.get(k, "")
            r[k] = float(v) if v not in ("", "None", None) else math.nan
    return rows
