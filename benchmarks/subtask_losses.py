"""Holdout loss per sub-kind of a task family, for every model of an experiment run directory, printed as a table.

A family such as `algorithmic` mixes kinds (addition, sorting, copying) whose losses can move in opposite directions
with compute, and the family's mean hides which one does (docs/results/curve-full/README.md). The kind is the second
field of the example id (`holdout-addition-00000` -> addition). Every model of RUN/models/ is evaluated on the whole
holdout split with the run's pool tokenizer (the experiments evaluate a seeded subsample of it, so the "all" column
differs slightly from results.csv); rows are grouped by model name without its seed suffix, mean (per-seed values).

Run:  .venv/bin/python benchmarks/subtask_losses.py RUN TASK   (e.g. runs/curve-full runs/data-full/tasks/algorithmic)
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from dsdm.evaluate import evaluate_examples
from dsdm.model import load_model
from dsdm.tasks import load_task


def group_order(name: str) -> list[tuple]:
    """Sort key of a model group name: its `_`-separated fields, numbers by value (29440 before 117760) and before
    words, so names with a number and a word in the same field (`..._16x` against `..._29440_e1`) still compare."""
    return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in name.split("_")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="experiment run directory (models/, pool/tokenizer.json)")
    ap.add_argument("task", help="task directory or JSONL (dsdm.tasks)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    task = load_task(args.task)
    examples = task.split("holdout")
    kinds = np.array([e.id.split("-")[1] if e.id.count("-") >= 2 else "all" for e in examples])
    tokenizer = Tokenizer.from_file(str(args.run / "pool" / "tokenizer.json"))
    losses: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    models = sorted(d for d in (args.run / "models").iterdir() if (d / "model.safetensors").exists())
    if not models:
        raise SystemExit(f"{args.run}/models holds no trained model")
    for d in models:
        loss = evaluate_examples(load_model(d), tokenizer, examples, "cpu", args.batch_size)["loss"]
        group = re.sub(r"_s\d+$", "", d.name)
        for kind in sorted(set(kinds)):
            losses[group][kind].append(float(loss[kinds == kind].mean()))
        losses[group]["all"].append(float(loss.mean()))
    columns = [*sorted(set(kinds) - {"all"}), "all"]
    print(f"{task.name} holdout loss per kind (n = {len(examples)}; ln V = {np.log(tokenizer.get_vocab_size()):.3f})")
    print("| model | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for group in sorted(losses, key=group_order):
        cells = [f"{np.mean(v):.3f} ({' '.join(f'{x:.2f}' for x in v)})" for v in (losses[group][c] for c in columns)]
        print(f"| {group} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
