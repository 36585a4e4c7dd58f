"""The experiment runner: select with every method, train an evaluation model per selection at a fixed token budget,
evaluate it on every holdout and unseen task, and collect one `results.csv` (docs/method.md §6, §9.2 steps 5-7).

Protocol (docs/method.md §6.2, §9.2 step 5). Every evaluation model sees the same number of training tokens T
(`budget.tokens`), whatever the method:
- targeted methods (dsdm, dsdm-inverse, dsir, classifier) select k = T / (epochs * L) examples and repeat them for
  `budget.epochs` epochs (4, as in the paper), plus a 1-epoch variant with k = T / L that separates selection from
  repetition (docs/method.md §8 item 5);
- untargeted methods (random, semdedup) select k = T / L and train one epoch;
- `budget.ks` adds explicit selection sizes per target for the "loss vs k" plot (epochs = T / (k L), fractional
  allowed);
- random data at `budget.compute_multipliers` x T tokens gives the compute curve; the report reads each method's
  holdout loss on that curve as an "equivalent x compute" (log-linear interpolation, dsdm.report.equivalent_compute).
L is the pool's sequence length. The compute-heavy stages (pool, proxies, features, DsDm scores) run once per run dir
and are shared by every target, method, k and seed.

Run directory (every stage and every cell is cached by its config and a `_done.json`; a re-run skips finished work):

    <out>/config.yaml                               the resolved config, written before any work
    <out>/pool/                                     the tokenized pool (unless pool.path points at an existing one)
    <out>/proxies/proxy_<m>/                        the M proxy models
    <out>/features/proxy_<m>/, manifest.json        projected gradients per proxy (dsdm.featurize)
    <out>/scores/<method>_<target>.npy              (N,) score per pool example (larger = keep), or a keep mask
    <out>/selections/<method>_<target>_<k>_s<seed>/ indices.npy (sorted int64) + selection.json + _done.json
    <out>/models/<cell>/                            the evaluation model trained on one selection
    <out>/eval/<cell>.json                          its metrics on every eval task
    <out>/results.csv                               one row per (cell, eval task), rebuilt from eval/*.json
    <out>/report.md, report.html, figures/          dsdm.report
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TARGETED = ("dsdm", "dsdm-inverse", "dsir", "classifier")
UNTARGETED = ("random", "semdedup")
ALL_METHODS = UNTARGETED + TARGETED
UNTARGETED_NAME = "untargeted"  # the `target` column of cells whose selection does not depend on a target
RESULT_COLUMNS = ["target", "method", "k", "epochs", "seed", "tokens", "eval_task", "loss", "accuracy"]
REPO_ROOT = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# Config


@dataclass
class PoolSpec:
    path: str = ""
    """An existing pool directory (written by `dsdm pool build`); used as is. Exclusive with `inputs`."""
    inputs: list[str] = field(default_factory=list)
    """Document files (Parquet/JSONL with a `text` column, globs allowed) to build the pool from into <out>/pool/."""
    build: dict[str, Any] = field(default_factory=dict)
    """Settings of the pool build (dsdm.ingest PoolBuildConfig fields: tokenizer, seq_len, ...)."""

    def __post_init__(self):
        if bool(self.path) == bool(self.inputs):
            raise ValueError("pool: give exactly one of pool.path (an existing pool) or pool.inputs (files to build)")


@dataclass
class TargetSpec:
    name: str = ""
    """Short name used in file names and tables, e.g. `squad` or `mix`."""
    tasks: list[str] = field(default_factory=list)
    """Task specs (a directory with target.jsonl + holdout.jsonl, see dsdm.tasks). Several = an equal-weight task mix
    (docs/method.md §2.4): DsDm averages the per-task scores; DSIR and Classifier fit on the union of the target texts."""

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-." for c in self.name):
            raise ValueError(f"targets[].name must be non-empty letters/digits/-/., got {self.name!r}")
        if not self.tasks:
            raise ValueError(f"targets[{self.name}].tasks must list at least one task")


@dataclass
class BudgetConfig:
    tokens: int = 0
    """T, training tokens of every evaluation model (docs/method.md §6.2)."""
    epochs: int = 4
    """Epochs over a targeted selection (paper: 4); k = T / (epochs * L)."""
    one_epoch_variant: bool = True
    """Also train targeted methods for 1 epoch on k = T / L examples (selection vs repetition, docs/method.md §8.5)."""
    ks: dict[str, list[int]] = field(default_factory=dict)
    """Extra selection sizes per target name (for loss vs k); each trained at budget T, epochs = T / (k L)."""
    compute_multipliers: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    """Random-data models at these multiples of T: the compute curve. Must include 1 (the random baseline)."""

    def __post_init__(self):
        if self.tokens <= 0:
            raise ValueError(f"budget.tokens must be positive, got {self.tokens}")
        if self.epochs < 1:
            raise ValueError(f"budget.epochs must be >= 1, got {self.epochs}")
        if 1.0 not in [float(m) for m in self.compute_multipliers] or min(self.compute_multipliers) <= 0:
            raise ValueError(
                f"budget.compute_multipliers must be positive and include 1, got {self.compute_multipliers}"
            )
        for t, ks in self.ks.items():
            if not all(isinstance(k, int) and k > 0 for k in ks):
                raise ValueError(f"budget.ks.{t} must be positive integers, got {ks}")


@dataclass
class EvalSpec:
    max_examples: int = 0
    """Holdout examples per eval task (a seeded subsample); 0 = all."""
    batch_size: int = 32
    """Examples per forward pass during evaluation."""


@dataclass
class ReportSpec:
    case_study: int = 5
    """Top- and bottom-ranked documents shown per method and target."""
    snippet_chars: int = 240
    """Characters of each decoded document shown in the case study."""


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    """Free-form name, shown in the report."""
    pool: PoolSpec = field(default_factory=lambda: PoolSpec(path="?"))
    """Where the candidate pool comes from."""
    targets: list[TargetSpec] = field(default_factory=list)
    """Targets to select for: single tasks (paper §3) and task mixes (paper §4)."""
    unseen: list[str] = field(default_factory=list)
    """Task specs never targeted, evaluated on their holdout split (paper §4's untargeted benchmarks)."""
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    """Methods to compare: random, semdedup, dsdm, dsdm-inverse, dsir, classifier."""
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-method hyper-parameters passed to the dsdm.baselines class, e.g. {dsir: {num_buckets: 4096}}."""
    budget: BudgetConfig = field(default_factory=lambda: BudgetConfig(tokens=1))
    """Token budget, epochs and selection sizes (the protocol above)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of each cell: selection randomness (random, DSIR noise, SemDeDup draws) and model training."""
    proxy: dict[str, Any] = field(default_factory=dict)
    """Proxy training settings (dsdm.proxies config: preset, num_proxies, subset fraction, train recipe)."""
    featurize: dict[str, Any] = field(default_factory=dict)
    """Featurizer settings (dsdm.featurize.FeaturizeConfig: proj_dim, projector, batch_size, ...)."""
    score: dict[str, Any] = field(default_factory=dict)
    """DsDm scoring settings (dsdm.datamodel.ScoreConfig: ridge, use_q, ...)."""
    eval_model: dict[str, Any] = field(default_factory=dict)
    """Evaluation-model training settings (dsdm.train.TrainConfig: preset, lr, batch size, ...). The token budget
    and epochs are set per cell by the runner."""
    eval: EvalSpec = field(default_factory=EvalSpec)
    """Evaluation settings."""
    report: ReportSpec = field(default_factory=ReportSpec)
    """Report settings."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N, for proxies, featurization, scoring, training and evaluation."""

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown}; choose from {list(ALL_METHODS)}")
        if not self.targets and any(m in TARGETED for m in self.methods):
            raise ValueError("targets: targeted methods need at least one target")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"targets: names must be unique, got {names}")
        if UNTARGETED_NAME in names:
            raise ValueError(f"targets: {UNTARGETED_NAME!r} is reserved")
        bad = sorted(set(self.budget.ks) - set(names))
        if bad:
            raise ValueError(f"budget.ks: {bad} are not target names ({names})")
        bad = sorted(set(self.method_options) - set(self.methods))
        if bad:
            raise ValueError(f"method_options: {bad} are not among methods {self.methods}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")


def load_experiment(path: str | Path | None, overrides=(), base_dir: str | Path | None = None) -> ExperimentConfig:
    """YAML -> overrides -> validated config, with every relative data path resolved against `base_dir` (default:
    the current directory)."""
    from dsdm.config import load_config

    cfg = load_config(ExperimentConfig, path, overrides)
    return resolve_paths(cfg, Path(base_dir) if base_dir else Path.cwd())


def resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    def fix(p: str) -> str:
        if not p:
            return p
        parts = [str(q if Path(q).is_absolute() else (base / q)) for q in p.split(",")]  # "T.jsonl,H.jsonl" specs
        return ",".join(parts)

    cfg.pool.path = fix(cfg.pool.path)
    cfg.pool.inputs = [fix(p) for p in cfg.pool.inputs]
    for t in cfg.targets:
        t.tasks = [fix(p) for p in t.tasks]
    cfg.unseen = [fix(p) for p in cfg.unseen]
    return cfg


# -----------------------------------------------------------------------------
# Cell planning (pure)


@dataclass(frozen=True)
class Cell:
    """One evaluation model: the selection (method, target, k, seed) trained for `epochs` over `tokens` tokens."""

    target: str
    method: str
    k: int
    epochs: float
    seed: int
    tokens: int

    @property
    def selection(self) -> str:
        return f"{self.method}_{self.target}_{self.k}_s{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.method}_{self.target}_{self.k}_e{self.epochs:g}_s{self.seed}"


def plan_cells(cfg: ExperimentConfig, seq_len: int, pool_size: int) -> list[Cell]:
    """Every cell of the experiment, deduplicated, in a stable order (cheap untargeted cells first)."""
    T, L = cfg.budget.tokens, seq_len

    def cell(target, method, k, seed, tokens=T) -> Cell:
        if k < 1:
            raise ValueError(f"budget.tokens={T} gives k={k} < 1 for {method}/{target}; raise budget.tokens")
        if k > pool_size:
            raise ValueError(
                f"{method}/{target}: k={k} exceeds the pool ({pool_size} examples); lower budget.tokens or "
                "budget.compute_multipliers, or use a bigger pool"
            )
        return Cell(target, method, int(k), round(tokens / (k * L), 3), seed, int(tokens))

    cells: list[Cell] = []
    for seed in cfg.seeds:
        if "random" in cfg.methods:
            for m in sorted(float(x) for x in cfg.budget.compute_multipliers):
                tokens = int(round(m * T))
                cells.append(cell(UNTARGETED_NAME, "random", min(pool_size, tokens // L), seed, tokens))
        if "semdedup" in cfg.methods:
            cells.append(cell(UNTARGETED_NAME, "semdedup", T // L, seed))
        for t in cfg.targets:
            for method in (m for m in cfg.methods if m in TARGETED):
                ks = [T // (cfg.budget.epochs * L)]
                if cfg.budget.one_epoch_variant:
                    ks.append(T // L)
                ks += list(cfg.budget.ks.get(t.name, []))
                for k in ks:
                    cells.append(cell(t.name, method, k, seed))
    return list(dict.fromkeys(cells))


# -----------------------------------------------------------------------------
# Upstream stages, imported lazily so a missing module fails with a message naming it


def _stage_cfg(cls, data: dict, key: str, **fixed):
    from dsdm.config import from_dict

    names = {f.name for f in dataclasses.fields(cls)}
    return from_dict(cls, {**data, **{k: v for k, v in fixed.items() if k in names}}, prefix=key + ".")


class Runner:
    """Runs an experiment in `out`; every step checks its cache first. `force` redoes cells whose config changed."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, force: bool = False):
        from dsdm.common import resolve_device

        self.cfg, self.out, self.force = cfg, Path(out), force
        self.device, self.device_reason = resolve_device(cfg.device)
        self._tasks: dict[str, Any] = {}

    def eval_groups(self) -> dict[str, list[str]]:
        """Eval task names per target (its own holdouts) and under "unseen": how the report groups results."""
        groups = {t.name: [self.task(s).name for s in t.tasks] for t in self.cfg.targets}
        groups["unseen"] = [self.task(s).name for s in self.cfg.unseen]
        return groups

    # -- shared, compute-heavy stages ---------------------------------------------------------------------------

    def pool(self):
        from dsdm.pool import Pool

        if self.cfg.pool.path:
            return Pool(self.cfg.pool.path)
        out = self.out / "pool"
        if not (out / "_done.json").exists() or self.force:
            from dsdm.ingest import PoolBuildConfig, build_pool

            cfg = _stage_cfg(PoolBuildConfig, self.cfg.pool.build, "pool.build")
            build_pool(self.cfg.pool.inputs, out, cfg, force=self.force)
        return Pool(out)

    def task(self, spec: str):
        from dsdm.tasks import load_task

        if spec not in self._tasks:
            self._tasks[spec] = load_task(spec)
        return self._tasks[spec]

    def eval_tasks(self) -> list[str]:
        specs = [s for t in self.cfg.targets for s in t.tasks] + list(self.cfg.unseen)
        return list(dict.fromkeys(specs))

    def features(self, pool) -> Path:
        """Train the M proxies (dsdm.proxies) and featurize the pool with each (dsdm.featurize), once per run dir;
        returns <out>/features, which dsdm.datamodel reads."""
        from dsdm.featurize import FeaturizeConfig
        from dsdm.featurize import run as featurize_run
        from dsdm.proxies import ProxiesConfig
        from dsdm.proxies import run as proxies_run

        pcfg = _stage_cfg(ProxiesConfig, self.cfg.proxy, "proxy")
        pdir = proxies_run(pool.path, self.out / "proxies", pcfg, force=self.force)
        fcfg = _stage_cfg(FeaturizeConfig, self.cfg.featurize, "featurize", device=self.cfg.device)
        return Path(featurize_run(pool.path, pdir, self.out / "features", fcfg, force=self.force))

    # -- scores and selections ----------------------------------------------------------------------------------

    def estimator(self, name: str, target: TargetSpec | None, seed: int):
        """The dsdm.baselines object for `name` (dsdm / dsdm-inverse read this run's score file for `target`)."""
        from dsdm.baselines import make

        opts = dict(self.cfg.method_options.get(name, {}))
        if name in ("dsdm", "dsdm-inverse"):
            opts["scores"] = str(self.dsdm_scores(target))
        if name == "random":
            opts.setdefault("seed", seed)
        return make(name, opts)

    def dsdm_scores(self, target: TargetSpec) -> Path:
        """<out>/scores/dsdm_<target>.npy: the equal-weight task-mix DsDm scores (dsdm.datamodel.run)."""
        from dsdm.datamodel import ScoreConfig
        from dsdm.datamodel import run as score_run

        out = self.out / "scores" / f"dsdm_{target.name}.npy"
        if not out.exists():
            feats = self.features(self._pool)
            score_run(feats, target.tasks, out, _stage_cfg(ScoreConfig, self.cfg.score, "score"), self.device)
        return out

    def scores(self, pool, method: str, target: TargetSpec | None, seed: int):
        """(method object, (N,) scores or keep mask). Cached in <out>/scores/ except the seed-dependent random ones.

        Fitting (pool sample, k-means) uses seed 0 whatever the cell seed, so scores are shared across seeds; the
        cell seed drives the selection draw (DSIR's Gumbel noise, SemDeDup's uniform draw, random's scores)."""
        from dsdm.baselines import fit_and_score, target_texts
        from dsdm.common import log
        from dsdm.io import read_json, save_npy, write_json

        est = self.estimator(method, target, seed)
        if method == "random":
            return est, fit_and_score(est, pool, [], seed)[0]
        tname = target.name if target else UNTARGETED_NAME
        path = self.out / "scores" / f"{_score_stem(method, tname)}.npy"
        if method in ("dsdm", "dsdm-inverse"):
            est.fit()
            return est, np.load(path)
        key = {"options": self.cfg.method_options.get(method, {}), "pool": pool.fingerprint}
        key["tasks"] = list(target.tasks) if target else []
        side = path.with_suffix(".json")
        if path.exists() and side.exists() and read_json(side) == key:
            return est, np.load(path)
        t0 = time.time()
        tasks = [self.task(s) for s in target.tasks] if target else []
        s, _ = fit_and_score(est, pool, target_texts(tasks), 0)
        save_npy(path, np.asarray(s))
        write_json(side, key)
        log(f"scores {method}/{tname}: {time.time() - t0:.1f}s -> {path}")
        return est, s

    def selection(self, pool, cell: Cell) -> np.ndarray:
        from dsdm.common import numpy_rng
        from dsdm.io import is_done, mark_done, save_npy, write_json

        d = self.out / "selections" / cell.selection
        key = {"method": cell.method, "target": cell.target, "k": cell.k, "seed": cell.seed, "pool": pool.fingerprint}
        key["options"] = self.cfg.method_options.get(cell.method, {})
        if is_done(d, key, self.force):
            return np.load(d / "indices.npy")
        t0 = time.time()
        target = next((t for t in self.cfg.targets if t.name == cell.target), None)
        obj, s = self.scores(pool, cell.method, target, cell.seed)
        idx = np.sort(np.asarray(obj.select(s, cell.k, numpy_rng((cell.seed, 2))), dtype=np.int64))
        assert idx.shape == (cell.k,) and np.all(np.diff(idx) > 0), f"{cell.selection}: not k sorted unique indices"
        save_npy(d / "indices.npy", idx)
        sources = np.asarray(pool.meta.column("source").to_pylist(), dtype=object)[idx]
        names, counts = np.unique(sources.astype(str), return_counts=True)
        write_json(
            d / "selection.json",
            {
                **key,
                "scores": None if cell.method == "random" else f"scores/{_score_stem(cell.method, cell.target)}.npy",
                "composition": {str(n): int(c) for n, c in zip(names, counts)},
                "sign": "larger score = more helpful; top-k kept (dsdm-inverse: bottom-k)",
            },
        )
        mark_done(d, key, started=t0)
        return idx

    # -- evaluation models ------------------------------------------------------------------------------------------

    def train_and_eval(self, pool, cell: Cell, indices: np.ndarray) -> dict:
        from dsdm.evaluate import evaluate_task
        from dsdm.io import _diff_keys, read_json, write_json
        from dsdm.model import load_model
        from dsdm.train import TrainConfig, train

        eval_path = self.out / "eval" / f"{cell.name}.json"
        key = {**dataclasses.asdict(cell), "eval_model": self.cfg.eval_model, "eval": dataclasses.asdict(self.cfg.eval)}
        key["eval_tasks"] = self.eval_tasks()
        if eval_path.exists() and not self.force:
            old = read_json(eval_path).get("key")
            if old == json.loads(json.dumps(key)):
                return read_json(eval_path)
            changed = ", ".join(_diff_keys(old or {}, json.loads(json.dumps(key)))) or "(unknown)"
            raise ValueError(
                f"{eval_path} was produced by a different configuration (changed: {changed}). "
                "Use another output directory, or pass --force to redo it."
            )
        tcfg = _stage_cfg(
            TrainConfig, self.cfg.eval_model, "eval_model", seed=cell.seed, device=self.cfg.device, tokens=cell.tokens
        )
        model_dir = train(pool, indices, tcfg, self.out / "models" / cell.name)
        model = load_model(model_dir).to(self.device)
        metrics = {}
        for spec in self.eval_tasks():
            task = self.task(spec)
            r = evaluate_task(
                model,
                pool.tokenizer,
                task,
                split="holdout",
                max_examples=self.cfg.eval.max_examples or None,
                batch_size=self.cfg.eval.batch_size,
            )
            metrics[task.name] = {k: r.get(k) for k in ("loss", "accuracy", "mc_accuracy", "loss_ci", "n")}
        record = {"key": key, "cell": dataclasses.asdict(cell), "model": str(model_dir), "metrics": metrics}
        write_json(eval_path, record)
        return record

    # -- the whole experiment ---------------------------------------------------------------------------------------

    def run(self) -> Path:
        from dsdm.common import log, progress
        from dsdm.config import save_config
        from dsdm.io import write_json

        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "config.yaml")
        log(f"device {self.device}: {self.device_reason}")
        pool = self._pool = self.pool()
        cells = plan_cells(self.cfg, pool.seq_len, len(pool))
        write_json(self.out / "eval_groups.json", self.eval_groups())
        log(
            f"{len(cells)} cells: {len(self.cfg.methods)} methods x {len(self.cfg.targets)} targets x "
            f"{len(self.cfg.seeds)} seeds; budget {self.cfg.budget.tokens} tokens, seq_len {pool.seq_len}"
        )
        bar = progress(cells, desc="cells", unit="cell")
        for cell in bar:
            bar.set_postfix_str(cell.name)
            self.train_and_eval(pool, cell, self.selection(pool, cell))
        path = write_results(self.out)
        log(f"wrote {path}")
        return path


def _score_stem(method: str, target: str) -> str:
    """File stem under scores/: dsdm-inverse reads dsdm's scores (it keeps the bottom k)."""
    return f"{'dsdm' if method == 'dsdm-inverse' else method}_{target}"


# -----------------------------------------------------------------------------
# results.csv


def collect_results(out: str | Path) -> list[dict]:
    """One row per (cell, eval task) from <out>/eval/*.json, sorted."""
    from dsdm.io import read_json

    rows = []
    for path in sorted((Path(out) / "eval").glob("*.json")):
        rec = read_json(path)
        c = rec["cell"]
        for task, m in rec["metrics"].items():
            rows.append(
                {
                    **{k: c[k] for k in RESULT_COLUMNS[:6]},
                    "eval_task": task,
                    "loss": m["loss"],
                    "accuracy": m["accuracy"],
                }
            )
    rows.sort(key=lambda r: tuple(str(r[k]) for k in ("target", "method", "eval_task")) + (r["k"], r["seed"]))
    return rows


def write_results(out: str | Path) -> Path:
    from dsdm.io import atomic_path

    path = Path(out) / "results.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        w.writerows(collect_results(out))
    return path


def read_results(path: str | Path) -> list[dict]:
    """results.csv -> rows with k, seed, tokens as int and epochs, loss, accuracy as float (NaN if empty)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `dsdm experiment CONFIG --out {path.parent}` first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(RESULT_COLUMNS) - set(rows[0]):
        raise ValueError(f"{path}: missing columns {sorted(set(RESULT_COLUMNS) - set(rows[0]))}")
    for r in rows:
        for k in ("k", "seed", "tokens"):
            r[k] = int(r[k])
        for k in ("epochs", "loss", "accuracy"):
            r[k] = float(r[k]) if r[k] not in ("", "None") else math.nan
    return rows


def run(cfg: ExperimentConfig, out: str | Path, force: bool = False) -> Path:
    """Run (or resume) the experiment in `out`, then render the report; returns the report.html path."""
    from dsdm.report import render

    Runner(cfg, out, force).run()
    return render(out)
