"""The CPU learning regime (issue 12 item 1): which preset x vocabulary x sequence length x lr x batch size learns
most in a fixed wall-clock budget, scored against the pool's n-gram references and chance.

Learning curves (loss after N training tokens) do not depend on machine load; wall time does. So the sweep has two
phases that can run on differently loaded machines:

  speed   quiet tokens/s of each configuration: the trainer itself (dsdm.train.train) for `--seconds` at
          `--threads` threads (run it under the CPU lock on a quiet machine). -> DIR/speed.csv
  learn   trains each configuration on tokens = quiet tokens/s x budget x multiplier (the schedule sized to that
          budget, as an evaluation model's would be) and evaluates it on the target families and the unseen tasks:
          holdout loss, greedy accuracy, multiple-choice accuracy with its bootstrap CI and chance, next to the
          pool's unigram/bigram references (dsdm.references). Single-threaded is fine (`--threads 1`): only the
          numbers matter, not the time. -> DIR/learn.csv (one row per run x task; finished runs are skipped)
  table   the markdown table of DIR/learn.csv (also printed at the end of `learn`).

A configuration is PRESET/VOCAB/SEQ_LEN/LR/BATCH, e.g. nano/1024/128/3e-3/16. Pools are built from the demo docs
(`--docs`) with a `train:VOCAB` BPE, cached under DIR/pools/.

Run (the sweep of docs/benchmarks.md "Learning regime"):
  flock /tmp/dsdm-cpu.lock .venv/bin/python benchmarks/regime.py speed --configs nano/1024/128/3e-3/16 ...
  OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/regime.py learn --threads 1 --configs ... \
      --budget-seconds 60 --multipliers 1,4 --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

TARGETS = ["lambada_style", "squad_style", "jeopardy_style", "algorithmic"]
UNSEEN = ["kjv_verse", "fortune_completion", "country_capital", "devils_definition", "jargon_definition"]
FIELDS = [
    "config", "preset", "vocab", "seq_len", "lr", "batch_size", "params", "budget_s", "multiplier", "seed",
    "tokens", "tokens_per_param", "epochs", "quiet_tok_s", "final_train_loss", "task", "kind", "n", "loss",
    "loss_lo", "loss_hi", "unigram", "bigram", "accuracy", "mc_accuracy", "mc_lo", "mc_hi", "chance", "n_mc",
]  # fmt: skip


def parse_config(spec: str) -> dict:
    """'nano/1024/128/3e-3/16' -> {preset, vocab, seq_len, lr, batch_size, name}."""
    try:
        preset, vocab, seq_len, lr, bs = spec.split("/")
        cfg = {"preset": preset, "vocab": int(vocab), "seq_len": int(seq_len), "lr": float(lr), "batch_size": int(bs)}
    except ValueError:
        raise SystemExit(f"--configs: {spec!r} is not PRESET/VOCAB/SEQ_LEN/LR/BATCH (e.g. nano/1024/128/3e-3/16)")
    cfg["name"] = f"{preset}-v{vocab}-L{seq_len}-lr{lr}-b{bs}"
    return cfg


def get_pool(root: Path, docs: str, vocab: int, seq_len: int):
    """The demo docs tokenized with a train:VOCAB BPE into seq_len examples (built once, cached)."""
    from dsdm.ingest import PoolBuildConfig, build_pool
    from dsdm.pool import Pool

    out = root / "pools" / f"v{vocab}-L{seq_len}"
    build_pool([docs], out, PoolBuildConfig(tokenizer=f"train:{vocab}", seq_len=seq_len))
    return Pool(out)


def params_of(cfg: dict) -> int:
    from dsdm.model import build_model, num_params

    return num_params(build_model(cfg["preset"], cfg["vocab"], cfg["seq_len"], 0))


def train_cfg(cfg: dict, seed: int, tokens: int = 0, steps: int = 0):
    from dsdm.train import TrainConfig

    return TrainConfig(
        preset=cfg["preset"], tokens=tokens, steps=steps, batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed,
        device="cpu", log_every=50,
    )  # fmt: skip


def cmd_speed(args) -> None:
    """Quiet tokens/s per configuration: a short calibration run, then one sized to --seconds."""
    from dsdm.common import log
    from dsdm.train import train

    out = args.dir / "speed.csv"
    rows = {r["config"]: r for r in _read(out)}
    for spec in args.configs:
        cfg = parse_config(spec)
        pool = get_pool(args.dir, args.docs, cfg["vocab"], cfg["seq_len"])
        tok_step = cfg["batch_size"] * cfg["seq_len"]
        d = args.dir / "speed" / cfg["name"]
        steps, wall = 20, 0.0
        while wall < 0.8 * args.seconds:  # grow the run until it lasts about --seconds (the first is a warm-up)
            steps = max(steps, int(steps * args.seconds / max(wall, 1e-3))) if wall else steps
            t0 = time.perf_counter()
            train(pool, None, train_cfg(cfg, 0, steps=steps), d, force=True)
            wall = time.perf_counter() - t0
        rows[cfg["name"]] = {
            "config": cfg["name"], "threads": torch.get_num_threads(), "steps": steps, "seconds": f"{wall:.2f}",
            "tok_s": f"{steps * tok_step / wall:.0f}", "load_1min": f"{_load():.2f}",
        }  # fmt: skip
        log(f"speed {cfg['name']}: {steps * tok_step / wall:,.0f} tokens/s ({steps} steps, {wall:.1f} s)")
        _write(out, list(rows.values()), list(rows[cfg["name"]]))
    print("| config | threads | tokens/s | load |\n|---|---:|---:|---:|")
    for r in rows.values():
        print(f"| {r['config']} | {r['threads']} | {int(r['tok_s']):,} | {r['load_1min']} |")


def cmd_learn(args) -> None:
    from dsdm.common import log
    from dsdm.evaluate import evaluate_task
    from dsdm.model import load_model
    from dsdm.references import ngram_references
    from dsdm.tasks import load_task
    from dsdm.train import train

    # lr does not change the step's cost: a configuration without its own row uses one that differs only in lr
    speeds = {_shape(r["config"]): float(r["tok_s"]) for r in _read(args.dir / "speed.csv")}
    out = args.dir / "learn.csv"
    rows = _read(out)
    done = {(r["config"], r["budget_s"], r["multiplier"], r["seed"]) for r in rows}
    tasks = {n: load_task(Path(args.tasks) / n) for n in TARGETS + UNSEEN}
    runs = [(parse_config(s), m, seed) for s in args.configs for m in args.multipliers for seed in args.seeds]
    for i, (cfg, mult, seed) in enumerate(runs):
        key = (cfg["name"], str(args.budget_seconds), str(mult), str(seed))
        if key in done:
            continue
        if _shape(cfg["name"]) not in speeds and not args.tokens:
            raise SystemExit(f"{cfg['name']}: no quiet tokens/s in {args.dir}/speed.csv; run `speed` first")
        pool = get_pool(args.dir, args.docs, cfg["vocab"], cfg["seq_len"])
        refs_path = args.dir / "pools" / f"refs-v{cfg['vocab']}-L{cfg['seq_len']}-n{args.max_examples}.json"
        if not refs_path.exists():
            refs = ngram_references(pool, list(tasks.values()), max_examples=args.max_examples)
            refs_path.write_text(json.dumps(refs, indent=1))
        refs = json.loads(refs_path.read_text())
        tok_s = speeds.get(_shape(cfg["name"]), 0.0)
        tokens = int(args.tokens * mult) if args.tokens else int(tok_s * args.budget_seconds * mult)
        params = params_of(cfg)
        log(f"[{i + 1}/{len(runs)}] {cfg['name']} x{mult} seed {seed}: {tokens:,} tokens, {tokens / params:.1f}/param")
        mdir = args.dir / "models" / f"{cfg['name']}-t{tokens}-s{seed}"
        t0 = time.perf_counter()
        train(pool, None, train_cfg(cfg, seed, tokens=tokens), mdir)
        summary = json.loads((mdir / "train.json").read_text())
        model = load_model(mdir).eval()
        for name, task in tasks.items():
            r = evaluate_task(model, pool.tokenizer, task, max_examples=args.max_examples, batch_size=32)
            rows.append({
                "config": cfg["name"], "preset": cfg["preset"], "vocab": cfg["vocab"], "seq_len": cfg["seq_len"],
                "lr": cfg["lr"], "batch_size": cfg["batch_size"], "params": params, "budget_s": args.budget_seconds,
                "multiplier": mult, "seed": seed, "tokens": summary["tokens"],
                "tokens_per_param": f"{summary['tokens'] / params:.1f}", "epochs": f"{summary['epochs']:.2f}",
                "quiet_tok_s": f"{tok_s:.0f}", "final_train_loss": f"{summary['final_loss']:.4f}", "task": name,
                "kind": "target" if name in TARGETS else "unseen", "n": r["n"], "loss": f"{r['loss']:.4f}",
                "loss_lo": f"{r['loss_ci'][0]:.4f}", "loss_hi": f"{r['loss_ci'][1]:.4f}",
                "unigram": f"{refs[name]['unigram']:.4f}", "bigram": f"{refs[name]['bigram']:.4f}",
                "accuracy": f"{r['accuracy']:.3f}", "mc_accuracy": _f(r["mc_accuracy"]),
                "mc_lo": _f(r["mc_ci"] and r["mc_ci"][0]), "mc_hi": _f(r["mc_ci"] and r["mc_ci"][1]),
                "chance": _f(r["chance"]), "n_mc": r["n_mc"],
            })  # fmt: skip
        _write(out, rows, FIELDS)
        log(f"  done in {time.perf_counter() - t0:.0f} s; train loss {summary['final_loss']:.3f}")
    print(table(rows))


def table(rows: list[dict]) -> str:
    """One line per (config, budget, multiplier): target losses (mean over seeds, ± s.e. with >1 seed) and how many
    are below the bigram reference; MC tasks whose 95% CI excludes chance (of all tasks, seed 0)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["budget_s"], r["multiplier"]), []).append(r)
    head = (
        "| config | params | tokens | tok/param | quiet tok/s | budget | seeds | "
        + " | ".join(t.replace("_style", "") for t in TARGETS)
        + " | < bigram | loss − bigram | MC > chance | MC kjv / fortune / capital (chance) |"
    )
    lines = [head, "|" + "---|" * 7 + "---:|" * len(TARGETS) + "---:|---:|---:|---|"]
    for (name, budget, mult), rs in groups.items():
        by_task = {t: [r for r in rs if r["task"] == t] for t in TARGETS + UNSEEN}
        seeds = sorted({r["seed"] for r in rs})
        cells, below, gap = [], 0, 0.0
        for t in TARGETS:
            v = np.array([float(r["loss"]) for r in by_task[t]])
            se = f" ± {v.std(ddof=1) / math.sqrt(len(v)):.3f}" if len(v) > 1 else ""
            big = float(by_task[t][0]["bigram"])
            below += v.mean() < big
            gap += (v.mean() - big) / len(TARGETS)  # per token of each vocabulary, but against its own bigram
            cells.append(f"{v.mean():.3f}{se}")
        first = [r for r in rs if r["seed"] == seeds[0]]
        above = sum(1 for r in first if r["mc_lo"] and float(r["mc_lo"]) > float(r["chance"]))
        mc = " / ".join(
            _mc([r for r in by_task[t] if r["seed"] == seeds[0]][0]) for t in ("kjv_verse", "fortune_completion",
                                                                            "country_capital")
        )  # fmt: skip
        r0 = rs[0]
        lines.append(
            f"| {name} | {int(r0['params']) / 1e6:.2f}M | {int(r0['tokens']) / 1e6:.2f}M | {r0['tokens_per_param']} | "
            f"{int(float(r0['quiet_tok_s'])):,} | {budget} s x{mult} | {len(seeds)} | "
            + " | ".join(cells)
            + f" | {below}/4 | {gap:+.3f} | {above}/{len(first)} | {mc} |"
        )
    refs = {}
    for r in rows:
        refs.setdefault(f"v{r['vocab']}-L{r['seq_len']}", {})[r["task"]] = (r["unigram"], r["bigram"])
    lines += ["", "| pool | reference | " + " | ".join(t.replace("_style", "") for t in TARGETS) + " |"]
    lines.append("|---|---|" + "---:|" * len(TARGETS))
    for pool, ref in sorted(refs.items()):
        for j, kind in enumerate(("unigram", "bigram")):
            lines.append(f"| {pool} | {kind} | " + " | ".join(f"{float(ref[t][j]):.3f}" for t in TARGETS) + " |")
    return "\n".join(lines)


def _shape(name: str) -> str:
    """A configuration name without its lr."""
    return re.sub(r"-lr.*-b", "-b", name)  # the lr itself may hold a '-' (3e-3)


def _mc(r: dict) -> str:
    return "-" if not r["mc_accuracy"] else f"{float(r['mc_accuracy']):.2f} ({float(r['chance']):.2f})"


def _f(v) -> str:
    return "" if v is None else f"{v:.4f}"


def _load() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["speed", "learn", "table"])
    ap.add_argument("--configs", nargs="+", default=["nano/1024/128/3e-3/16"], help="PRESET/VOCAB/SEQ_LEN/LR/BATCH")
    ap.add_argument(
        "--dir", type=Path, default=Path("runs/regime"), help="pools, models and CSVs (default %(default)s)"
    )
    ap.add_argument("--docs", default="data/demo/docs/*.parquet", help="documents to build the pools from")
    ap.add_argument("--tasks", default="data/demo/tasks", help="folder of the task families")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seconds", type=float, default=30.0, help="speed: seconds of training per configuration")
    ap.add_argument("--budget-seconds", type=float, default=60.0, help="learn: quiet wall-clock budget at 1x")
    ap.add_argument("--tokens", type=int, default=0, help="learn: a fixed token budget at 1x instead")
    ap.add_argument("--multipliers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    ap.add_argument("--max-examples", type=int, default=300, help="holdout examples per task")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase == "speed":
        cmd_speed(args)
    elif args.phase == "learn":
        cmd_learn(args)
    else:
        print(table(_read(args.dir / "learn.csv")))


if __name__ == "__main__":
    main()
