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
- random data at `budget.compute_multipliers` x the 1x compute gives the compute curve; the report reads each method's
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

import dataclasses
import functools
import glob
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dsdm import results, selections
from dsdm.baselines import (
    METHODS,
    RULES,
    ExecutorConfig,
    fit_and_score,
    make,
    score_file_name,
    score_stage_name,
    target_texts,
)
from dsdm.common import check_requirements, log, numpy_rng, progress, resolve_device
from dsdm.config import from_dict, load_config, save_config, to_dict
from dsdm.datamodel import ScoreConfig, score_targets, task_mix
from dsdm.evaluate import evaluate_task
from dsdm.featurize import FeaturizeConfig
from dsdm.featurize import run as featurize_run
from dsdm.ingest import PoolBuildConfig, build_pool, build_settings, expand_inputs, input_fingerprints
from dsdm.io import (
    DONE_FILE,
    _diff_keys,
    canonical_json,
    mark_done,
    plain,
    read_json,
    read_record,
    record_key,
    run_lock,
    save_npy,
    sha256_text,
    write_json,
)
from dsdm.model import PRESETS, load_model, preset_flops_per_token, width_for_flops
from dsdm.pool import Pool
from dsdm.proxies import ProxiesConfig
from dsdm.proxies import run as proxies_run
from dsdm.references import ngram_references
from dsdm.report import ReportSpec, render
from dsdm.results import UNTARGETED_NAME
from dsdm.shards import EXECUTOR_KEYS
from dsdm.tasks import load_task, parse_spec, resolve_spec
from dsdm.train import TrainConfig, train

ALL_METHODS = tuple(METHODS)
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
    """Task specs (a directory with target.jsonl + holdout.jsonl, see dsdm.tasks). Several = an equal-weight task
    mix (docs/method.md §2.4): DsDm averages the per-task scores; DSIR and Classifier fit on the union of the target
    texts."""

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-." for c in self.name):
            raise ValueError(f"targets[].name must be non-empty letters/digits/-/., got {self.name!r}")
        if not self.tasks:
            raise ValueError(f"targets[{self.name}].tasks must list at least one task")


COMPUTE_SCALINGS = ("tokens", "balanced")


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
    """Random-data models at these multiples of the 1x model's training compute: the compute curve. Must include 1
    (the random baseline)."""
    compute_scaling: str = "tokens"
    """How a random-data model gets c x the compute (docs/experiments.md "The compute curve"): tokens (the
    evaluation model's shape on c x T tokens; for a 1x model short of ~20 tokens per parameter, which more data
    helps most) | balanced (FLOPs per token and tokens each grow by sqrt(c): a wider model of the same depth on
    ~sqrt(c) x T tokens, total training FLOPs c x the 1x model's, as the paper's larger random-data baselines are;
    for a 1x model at or past ~20 tokens per parameter)."""

    def __post_init__(self):
        if self.tokens <= 0:
            raise ValueError(f"budget.tokens must be positive, got {self.tokens}")
        if self.epochs < 1:
            raise ValueError(f"budget.epochs must be >= 1, got {self.epochs}")
        if 1.0 not in [float(m) for m in self.compute_multipliers] or min(self.compute_multipliers) <= 0:
            raise ValueError(
                f"budget.compute_multipliers must be positive and include 1, got {self.compute_multipliers}"
            )
        if self.compute_scaling not in COMPUTE_SCALINGS:
            raise ValueError(
                f"budget.compute_scaling must be one of {', '.join(COMPUTE_SCALINGS)}, got {self.compute_scaling!r}"
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
class TrainingExecutorConfig:
    """Where the evaluation models train and are evaluated: how, never what (no part of any stage's key;
    docs/runner.md "Training the evaluation models in parallel")."""

    executor: str = "local"
    """local (one cell after another in this process, torch's default threads) | ray (every cell whose model or
    evaluation is not done as its own Ray task that trains, then evaluates; as many at once as the cluster has
    room for)."""
    ray_address: str | None = None
    """executor=ray: None starts a local Ray cluster; 'auto' joins the cluster this machine is in (`ray start`);
    'ray://HOST:PORT' a remote head."""
    cpus_per_model: float = 1
    """executor=ray: CPUs each model's task reserves; it trains with that many torch threads. At nano size one
    thread per model is the fastest use of the cores (docs/benchmarks.md "Evaluation models in parallel")."""
    gpus_per_model: float = 0
    """executor=ray: GPUs (or a fraction, e.g. 0.25: four small models share one GPU) each model's task reserves."""

    def __post_init__(self):
        if self.executor not in ("local", "ray"):
            raise ValueError(f"training.executor must be local or ray, got {self.executor!r}")
        if self.cpus_per_model < 1:
            raise ValueError(f"training.cpus_per_model must be >= 1, got {self.cpus_per_model}")
        if self.gpus_per_model < 0:
            raise ValueError(f"training.gpus_per_model must be >= 0, got {self.gpus_per_model}")


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
    """Proxy training settings (dsdm.proxies.ProxiesConfig: n, subset fraction, seed, train recipe; executor ray trains
    them side by side, no part of the stage's key)."""
    featurize: dict[str, Any] = field(default_factory=dict)
    """Featurizer settings (dsdm.featurize.FeaturizeConfig: proj_dim, projector, batch_size, ...)."""
    baselines: dict[str, Any] = field(default_factory=dict)
    """Where DSIR and classifier score the pool (dsdm.baselines.ExecutorConfig: executor, ray_address,
    ray_worker_cpus, chunk_size); absent = local. Not part of any stage's key: the scores are the same."""
    score: dict[str, Any] = field(default_factory=dict)
    """DsDm scoring settings (dsdm.datamodel.ScoreConfig: ridge, use_q, ...)."""
    eval_model: dict[str, Any] = field(default_factory=dict)
    """Evaluation-model training settings (dsdm.train.TrainConfig: preset, lr, batch size, ...). The token budget
    and epochs are set per cell by the runner."""
    training: TrainingExecutorConfig = field(default_factory=TrainingExecutorConfig)
    """Where the evaluation models train and are evaluated (executor, ray_address, cpus_per_model,
    gpus_per_model); absent = here, one after another. Not part of any stage's key."""
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
        if not self.targets and any(METHODS[m].targeted for m in self.methods):
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

    cfg = load_config(ExperimentConfig, path, overrides)
    return resolve_paths(cfg, Path(base_dir) if base_dir else Path.cwd())


def resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    def fix(p: str) -> str:
        return str(p if not p or Path(p).is_absolute() else base / p)

    cfg.pool.path = fix(cfg.pool.path)
    cfg.pool.inputs = [fix(p) for p in cfg.pool.inputs]
    for t in cfg.targets:
        t.tasks = [resolve_spec(p, base) for p in t.tasks]  # "T.jsonl,H.jsonl" and name=NAME:... specs too
    cfg.unseen = [resolve_spec(p, base) for p in cfg.unseen]
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
    d_model: int = 0
    """The model's width when not the evaluation model's own (0): the balanced compute curve's wider models."""
    compute: float = 1.0
    """Training FLOPs / those of the 1x model (the evaluation model's shape on T tokens): the curve's multiplier."""

    @property
    def selection(self) -> str:
        return f"{self.method}_{self.target}_{self.k}_s{self.seed}"

    @property
    def name(self) -> str:
        width = f"_d{self.d_model}" if self.d_model else ""
        return f"{self.method}_{self.target}_{self.k}_e{self.epochs:g}{width}_s{self.seed}"


def plan_cells(cfg: ExperimentConfig, seq_len: int, pool_size: int, vocab_size: int = 0) -> list[Cell]:
    """Every cell of the experiment, deduplicated, in a stable order (cheap untargeted cells first). vocab_size: the
    pool's, needed by budget.compute_scaling balanced (the LM head is part of a model's FLOPs per token)."""
    T, L = cfg.budget.tokens, seq_len
    if cfg.budget.compute_scaling == "balanced" and vocab_size < 1:
        raise ValueError("plan_cells: budget.compute_scaling balanced needs the pool's vocab_size")
    if cfg.budget.compute_scaling == "balanced" and cfg.eval_model.get("init_from"):
        raise ValueError(
            "budget.compute_scaling balanced widens a fresh eval_model.preset, but eval_model.init_from continues an "
            "existing model; set budget.compute_scaling: tokens"
        )

    def cell(target, method, k, seed, tokens=T, d_model=0, compute=1.0) -> Cell:
        if k < 1:
            raise ValueError(f"budget.tokens={T} gives k={k} < 1 for {method}/{target}; raise budget.tokens")
        if k > pool_size:
            raise ValueError(
                f"{method}/{target}: k={k} exceeds the pool ({pool_size} examples); lower budget.tokens or "
                "budget.compute_multipliers, or use a bigger pool"
            )
        return Cell(target, method, int(k), round(tokens / (k * L), 3), seed, int(tokens), d_model, compute)

    def curve_point(multiplier: float) -> tuple[int, int]:
        """(tokens, d_model; 0 = the preset's) of the random-data model at `multiplier` x the 1x compute."""
        if cfg.budget.compute_scaling == "tokens" or multiplier == 1:
            return int(round(multiplier * T)), 0
        preset = cfg.eval_model.get("preset", TrainConfig.preset)
        width = width_for_flops(preset, vocab_size, L, multiplier**0.5)
        ratio = preset_flops_per_token(preset, vocab_size, L) / preset_flops_per_token(preset, vocab_size, L, width)
        examples = round(multiplier * T * ratio / L)  # whole examples: one epoch of k
        return examples * L, (0 if width == PRESETS[preset][2] else width)

    curve = {m: curve_point(m) for m in sorted(float(x) for x in cfg.budget.compute_multipliers)}

    cells: list[Cell] = []
    untargeted = sorted(
        (m for m in cfg.methods if not METHODS[m].targeted),
        key=lambda m: (not METHODS[m].reference, ALL_METHODS.index(m)),  # the reference (random) first
    )
    for seed in cfg.seeds:
        for method in untargeted:
            if METHODS[method].reference:  # the compute curve: c x the 1x compute, one epoch of its data
                for m, (tokens, d_model) in curve.items():
                    k = min(pool_size, tokens // L)
                    cells.append(cell(UNTARGETED_NAME, method, k, seed, tokens, d_model, m))
            else:
                cells.append(cell(UNTARGETED_NAME, method, T // L, seed))
        for t in cfg.targets:
            for method in (m for m in cfg.methods if METHODS[m].targeted):
                ks = [T // (cfg.budget.epochs * L)]
                if cfg.budget.one_epoch_variant:
                    ks.append(T // L)
                ks += list(cfg.budget.ks.get(t.name, []))
                for k in ks:
                    cells.append(cell(t.name, method, k, seed))
    return list(dict.fromkeys(cells))


# -----------------------------------------------------------------------------
# Stages: one folder of the run directory each, decided by its record (docs/runner.md)


@dataclass
class Stage:
    """One unit of work: `name` is its folder under the run directory.

    `config` is the stage's own config slice (plain JSON, top-level keys named after the experiment config's keys, so a
    difference reads as `score.ridge`); `inputs` the upstream stages it reads. The stage's key is sha256 of the slice
    and its inputs' keys, so a changed setting changes the key of its stage and of everything downstream."""

    name: str
    config: dict
    inputs: list[str]
    work: Callable[[bool], None]
    """Does the work; its argument is True when an out-of-date result is being replaced."""
    job: Callable[[bool], dict] | None = None
    """models/* and eval/* stages: the same work as a plain description (paths, settings) a Ray task can run."""


def task_fingerprint(task) -> str:
    """sha256 of a task's examples (both splits): a changed task file changes every stage that reads it."""

    return sha256_text(
        canonical_json({s: [dataclasses.asdict(e) for e in task.split(s)] for s in ("target", "holdout")})
    )


def _train_recipe(cfg: ExperimentConfig) -> dict:
    # device / dtype / compile / logging change speed, not the recipe (as in dsdm.train's own record)
    return {k: v for k, v in cfg.eval_model.items() if k not in ("device", "dtype", "compile", "log_every")}


def stage_key(stage: Stage, keys: dict[str, str]) -> str:
    return record_key(stage.config, {name: keys[name] for name in stage.inputs})


def plan_stages(cfg: ExperimentConfig, ctx: "Context", cells: list[Cell]) -> list[Stage]:
    """Every stage of the experiment after the pool, in execution order (pure: nothing runs)."""
    stages: list[Stage] = []
    pool_input = ["pool"]  # the run's pool stage, or the key of the existing pool at pool.path
    ref = {"eval": {"max_examples": cfg.eval.max_examples}, "eval_tasks": ctx.task_hashes(ctx.eval_specs)}
    stages.append(Stage("references", ref, pool_input, ctx.references))
    where = ("device", *EXECUTOR_KEYS)  # where the work runs, not what it computes
    needs_features = any(METHODS[m].estimator_scores for m in cfg.methods)
    if needs_features:
        feat = {k: v for k, v in cfg.featurize.items() if k not in where}
        proxy_slice = {"proxy": {k: v for k, v in cfg.proxy.items() if k not in where}}
        if feat.get("precondition") == "adam":  # proxies trained before dsdm saved AdamW's state must be retrained
            proxy_slice["featurize"] = {"precondition": "adam"}
        stages.append(Stage("proxies", proxy_slice, pool_input, ctx.train_proxies))
        stages.append(Stage("features", {"featurize": feat}, pool_input + ["proxies"], ctx.featurize))
    score_stages: dict[str, Stage] = {}
    for method in cfg.methods:
        cls = METHODS[method]
        if cls.seed_dependent_scores:
            continue  # drawn per seed in the selection stage
        for target in cfg.targets if cls.targeted else [None]:
            name = score_stage_name(method, target.name if target else UNTARGETED_NAME)
            if name in score_stages:
                continue
            if cls.estimator_scores:  # one stage for every target: one pass over the feature store
                targets = {t.name: ctx.task_hashes(t.tasks) for t in cfg.targets}
                score = {k: v for k, v in cfg.score.items() if k != "tasks" and k not in where}
                slice_ = {"score": score, "targets": targets}
                st = Stage(name, slice_, ["features"], functools.partial(ctx.estimator_scores, name))
            else:
                tasks = ctx.task_hashes(target.tasks if target else [])
                slice_ = {"method": method, "method_options": cfg.method_options.get(method, {}), "tasks": tasks}
                st = Stage(name, slice_, pool_input, functools.partial(ctx.baseline_scores, name, method, target))
            score_stages[name] = st
    stages += list(score_stages.values())
    planned = set()
    for cell in cells:
        cls = METHODS[cell.method]
        sel = f"selections/{cell.selection}"
        if sel not in planned:
            planned.add(sel)
            scores = [] if cls.seed_dependent_scores else [score_stage_name(cell.method, cell.target)]
            slice_ = {
                "method": cell.method,
                "method_options": cfg.method_options.get(cell.method, {}),
                "target": cell.target,
                "k": cell.k,
                "seed": cell.seed,
            }
            stages.append(Stage(sel, slice_, pool_input + scores, functools.partial(ctx.select, sel, cell)))
        model = f"models/{cell.name}"
        slice_ = {"eval_model": _train_recipe(cfg), "tokens": cell.tokens, "seed": cell.seed}
        if cell.d_model:  # only the balanced curve's wider models: every other model's key is as before
            slice_["d_model"] = cell.d_model
        work, job = (functools.partial(f, model, sel, cell) for f in (ctx.train_model, ctx.model_job))
        stages.append(Stage(model, slice_, pool_input + [sel], work, job))
        ev = f"eval/{cell.name}"
        slice_ = {"eval": to_dict(cfg.eval), "eval_tasks": ctx.task_hashes(ctx.eval_specs)}
        work, job = (functools.partial(f, ev, model, cell) for f in (ctx.evaluate, ctx.eval_job))
        stages.append(Stage(ev, slice_, [model], work, job))
    return stages


class StaleRun(ValueError):
    """The run directory holds results of other settings, and the user did not ask to replace them."""


def preflight(out: Path, stages: list[Stage], keys: dict[str, str]) -> list[tuple[str, list[str]]]:
    """[(stage, changed keys)] of every stage whose record was produced by other settings or inputs, in order.

    A stage whose own settings are unchanged but whose input changed lists `inputs.<name>`."""

    stale = []
    for st in stages:
        run = ((read_record(out / st.name) or {}).get("run")) or {}
        if run and run.get("key") != keys[st.name]:
            changed = _diff_keys(run.get("config", {}), plain(st.config))
            old_inputs = run.get("inputs") or {}
            changed += [f"inputs.{n}" for n in st.inputs if old_inputs.get(n) != keys.get(n)]
            stale.append((st.name, changed or ["(unknown)"]))
    return stale


def stale_message(out: Path, stale: list[tuple[str, list[str]]]) -> str:
    own = [(name, [k for k in keys if not k.startswith("inputs.")]) for name, keys in stale]
    roots = [f"{name} ({', '.join(keys)})" for name, keys in own if keys]
    return (
        f"{out} holds results of other settings: changed {'; '.join(roots) or stale[0][0]}; "
        f"{len(stale)} stage(s) would be recomputed. Pass --force to recompute them (and what depends on them), "
        "or use another --out."
    )


def needs_run(out: Path, st: Stage, keys: dict[str, str], force: bool) -> tuple[bool, bool]:
    """(whether `st` must run, whether that replaces an out-of-date result). Its record matching its key: no run;
    a record of other settings: refused with StaleRun unless `force`."""
    run = ((read_record(out / st.name) or {}).get("run")) or {}
    if run.get("key") == keys[st.name]:
        return False, False
    if run and not force:
        raise StaleRun(stale_message(out, preflight(out, [st], keys)))
    return True, bool(run)


def run_stage(out: Path, st: Stage, keys: dict[str, str], force: bool) -> bool:
    """Run `st` unless its record matches its key; returns True if it ran. The record's `run` entry is written last."""
    needed, stale = needs_run(out, st, keys, force)
    if needed:
        st.work(stale)
        write_run_record(out, st, keys)
    return needed


def write_run_record(out: Path, st: Stage, keys: dict[str, str]) -> None:
    """Add the runner's `run` entry (key, config slice, inputs) to the record the stage's work wrote."""
    marker = out / st.name / "_done.json"
    if not marker.exists():
        raise RuntimeError(f"stage {st.name} finished without writing its record {marker}")
    record = read_json(marker)
    record["run"] = {
        "stage": st.name,
        "key": keys[st.name],
        "config": st.config,
        "inputs": {name: keys[name] for name in st.inputs},
        "external": [name for name in st.inputs if not (out / name).is_dir()],  # e.g. a pool given by pool.path
    }
    write_json(marker, record)


def run_cells_on_ray(ctx: Context, cells: list[tuple[Stage, Stage]], keys: dict[str, str], force: bool) -> None:
    """training.executor=ray: every (models/<cell>, eval/<cell>) pair with a part not done runs as one Ray task that
    trains, then evaluates; the runner's records are written here when all are back. Each task opens the pool, its
    selection and the tasks from their paths. A model finished before a failure keeps its own record (dsdm.train's),
    so a re-run does not train it again."""
    from dsdm.shards import plan_shards, run_shards

    jobs, done = [], []
    for model, ev in cells:
        (train, redo_model), (evaluate, redo_eval) = (needs_run(ctx.out, st, keys, force) for st in (model, ev))
        if train or evaluate:  # as run_stage would: an evaluation whose record matches its key is kept
            jobs.append(
                {
                    "train": model.job(redo_model) if train else None,
                    "evaluate": ev.job(redo_eval) if evaluate else None,
                }
            )
            done += [st for st, needed in ((model, train), (ev, evaluate)) if needed]
    if not jobs:
        return
    where = ctx.cfg.training
    log(
        f"{sum(bool(j['train']) for j in jobs)} evaluation models to train and "
        f"{sum(bool(j['evaluate']) for j in jobs)} to evaluate as Ray tasks "
        f"({where.cpus_per_model:g} CPU, {where.gpus_per_model:g} GPU each)"
    )
    run_shards(
        functools.partial(_cell_jobs, jobs, int(where.cpus_per_model)),
        plan_shards(len(jobs), 1),
        executor="ray",
        desc="cells",
        ray_address=where.ray_address,
        num_cpus=where.cpus_per_model,
        num_gpus=where.gpus_per_model,
    )
    for st in done:
        write_run_record(ctx.out, st, keys)


# -----------------------------------------------------------------------------
# The work of each stage


def clean_dir(d: Path) -> Path:
    """A runner-owned stage folder, emptied before its result is (re)computed."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


class Context:
    """What the stage functions share in one run: the config, the run directory, the device, the loaded tasks and
    the pool (opened once it exists). It holds no results: every stage reads its inputs from their folders."""

    def __init__(self, cfg: ExperimentConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.device, self.device_reason = resolve_device(cfg.device)
        specs = [s for t in cfg.targets for s in t.tasks] + list(cfg.unseen)
        self.tasks = {s: load_task(s) for s in dict.fromkeys(specs)}
        self.eval_specs = list(dict.fromkeys(specs))
        self._hashes: dict[str, str] = {}

    def task_hashes(self, specs: list[str]) -> dict[str, str]:
        """{task name: fingerprint of its examples}: keyed by name, so moving a task directory changes nothing."""
        for spec in specs:
            if spec not in self._hashes:
                self._hashes[spec] = task_fingerprint(self.tasks[spec])
        return {self.tasks[s].name: self._hashes[s] for s in specs}

    @property
    def pool_dir(self) -> Path:
        return Path(self.cfg.pool.path) if self.cfg.pool.path else self.out / "pool"

    @functools.cached_property
    def pool(self):
        return Pool(self.pool_dir)

    def eval_groups(self) -> dict[str, list[str]]:
        """Eval task names per target (its own holdouts) and under "unseen": how the report groups results."""
        groups = {t.name: [self.tasks[s].name for s in t.tasks] for t in self.cfg.targets}
        groups["unseen"] = [self.tasks[s].name for s in self.cfg.unseen]
        return groups

    def _clean(self, name: str) -> Path:
        return clean_dir(self.out / name)

    # -- shared, compute-heavy stages --------------------------------------------------------------------------

    def build_pool(self, redo: bool) -> None:
        build_pool(self.cfg.pool.inputs, self.pool_dir, self._pool_cfg(), force=redo)
        self.__dict__.pop("pool", None)

    def _pool_cfg(self) -> PoolBuildConfig:
        return _stage_cfg(PoolBuildConfig, self.cfg.pool.build, "pool.build")

    @functools.cached_property
    def pool_slice(self) -> dict:
        """The pool stage's slice: the build settings that change the pool, and the sha256 of every input file
        (computed once per run: plan() is called again after the pool is built)."""
        settings = build_settings(self._pool_cfg())  # where the build runs (workers, executor) is no part of it
        files = input_fingerprints(expand_inputs(self.cfg.pool.inputs))
        return {"pool": {"build": settings, "inputs": [f["sha256"] for f in files]}}

    def train_proxies(self, redo: bool) -> None:
        pcfg = _stage_cfg(ProxiesConfig, self.cfg.proxy, "proxy")
        proxies_run(self.pool_dir, self.out / "proxies", pcfg, force=redo)

    def featurize(self, redo: bool) -> None:
        fcfg = _stage_cfg(FeaturizeConfig, self.cfg.featurize, "featurize", device=self.cfg.device)
        featurize_run(self.pool_dir, self.out / "proxies", self.out / "features", fcfg, force=redo)

    def references(self, redo: bool) -> None:
        """references/references.json: every eval task's holdout loss under the pool's unigram and bigram
        statistics (dsdm.references), the lines a model must get below to be past n-grams."""
        started, d = time.time(), self._clean("references")
        tasks = [self.tasks[s] for s in self.eval_specs]
        refs = ngram_references(self.pool, tasks, max_examples=self.cfg.eval.max_examples or None)
        write_json(d / "references.json", refs)
        mark_done(d, {"max_examples": self.cfg.eval.max_examples}, started=started, stage="references")

    # -- scores and selections -----------------------------------------------------------------------------------

    def estimator_scores(self, name: str, redo: bool) -> None:
        """scores/dsdm/<target>.npy for every target: the equal-weight task-mix DsDm scores, (N,) float32, with
        <target>.tasks.npy (N, T) per task; every target's tasks are scored in ONE pass over each proxy's feature
        store (dsdm.datamodel.score_targets)."""
        started, d = time.time(), self._clean(name)
        scfg = _stage_cfg(ScoreConfig, self.cfg.score, "score")
        per_target = score_targets(
            self.out / "features", {t.name: t.tasks for t in self.cfg.targets}, scfg, self.device
        )
        for target, (per_task, names) in per_target.items():
            save_npy(d / f"{target}.tasks.npy", per_task.astype(np.float32))
            save_npy(d / f"{target}.npy", task_mix(per_task).astype(np.float32))
        write_json(
            d / "scores.json",
            {
                "method": "dsdm",
                "targets": {t: names for t, (_, names) in per_target.items()},
                "sign": "larger = more helpful to the target; select the k largest (dsdm.select)",
                "config": {k: v for k, v in dataclasses.asdict(scfg).items() if k != "tasks"},
            },
        )
        mark_done(d, {"score": dataclasses.asdict(scfg)}, started=started, stage=name)

    def baseline_scores(self, name: str, method: str, target: TargetSpec | None, redo: bool) -> None:
        """scores/<method>_<target>/: the method fitted (seed 0, whatever the cell seed) and scored over the pool,
        so every seed's selection draws from the same scores: scores.npy (or keep.npy) + info.json."""

        started, d = time.time(), self._clean(name)
        est = make(method, self.cfg.method_options.get(method, {}))
        tasks = [self.tasks[s] for s in target.tasks] if target else []
        where = _stage_cfg(ExecutorConfig, self.cfg.baselines, "baselines")
        s, info = fit_and_score(est, self.pool, target_texts(tasks), 0, where, scratch_dir=d)
        save_npy(d / est.scores_file, np.asarray(s))
        write_json(d / "info.json", info)
        mark_done(
            d, {"method": method, "options": self.cfg.method_options.get(method, {})}, started=started, stage=name
        )
        log(f"{name}: {time.time() - started:.1f}s")

    def select(self, name: str, cell: Cell, redo: bool) -> None:
        started, d = time.time(), self._clean(name)
        cls = METHODS[cell.method]
        opts = dict(self.cfg.method_options.get(cell.method, {}))
        scores_file = None
        if cls.seed_dependent_scores:  # drawn here, per seed
            if "seed" in cls.__dataclass_fields__:
                opts.setdefault("seed", cell.seed)
            est = make(cell.method, opts)
            s, _ = fit_and_score(est, self.pool, [], cell.seed)
        else:
            scores_file = score_file_name(cell.method, cell.target)
            if cls.estimator_scores:
                opts["scores"] = str(self.out / scores_file)
            est = make(cell.method, opts)
            if getattr(est, "group_column", ""):  # DsDm's balanced top-k reads a pool metadata column
                est.fit(pool=self.pool)
            s = np.load(self.out / scores_file)
            if s.shape != (len(self.pool),):
                raise ValueError(f"{self.out / scores_file}: shape {s.shape}, expected ({len(self.pool)},)")
        idx = np.sort(np.asarray(est.select(s, cell.k, numpy_rng((cell.seed, 2))), dtype=np.int64))
        target = next((t for t in self.cfg.targets if t.name == cell.target), None)
        selections.write(
            d,
            idx,
            pool=self.pool,
            method=cell.method,
            rule=RULES[cell.method](est),
            seed=cell.seed,
            target=[self.tasks[s].name for s in target.tasks] if target else [],
            target_specs=target.tasks if target else [],
            config={k: v for k, v in to_dict(est).items() if k != "scores"},
            scores_file=scores_file,
        )
        mark_done(d, {"method": cell.method, "k": cell.k, "seed": cell.seed}, started=started, stage=name)

    # -- evaluation models -------------------------------------------------------------------------------------------

    def train_model(self, name: str, sel: str, cell: Cell, redo: bool) -> None:
        train_model_job(self.model_job(name, sel, cell, redo), self.pool)

    def model_job(self, name: str, sel: str, cell: Cell, redo: bool) -> dict:
        """What training one evaluation model needs, as paths and plain settings: it runs here or in a Ray task."""
        tcfg = _stage_cfg(
            TrainConfig,
            self.cfg.eval_model,
            "eval_model",
            seed=cell.seed,
            device=self.cfg.device,
            tokens=cell.tokens,
            d_model=cell.d_model,
        )
        return {  # absolute: a Ray worker's working directory is not this one
            "pool": str(self.pool_dir.resolve()),
            "selection": str((self.out / sel).resolve()),
            "train": to_dict(tcfg),
            "out": str((self.out / name).resolve()),
            "redo": redo,
        }

    def evaluate(self, name: str, model_stage: str, cell: Cell, redo: bool) -> None:
        evaluate_job(self.eval_job(name, model_stage, cell, redo), [self.tasks[s] for s in self.eval_specs], self.pool)

    def eval_job(self, name: str, model_stage: str, cell: Cell, redo: bool) -> dict:
        """What evaluating one model needs, as paths and plain settings: it runs here or in a Ray task."""
        return {  # absolute: a Ray worker's working directory is not this one
            "stage": name,
            "out": str((self.out / name).resolve()),
            "model": str((self.out / model_stage).resolve()),
            "model_stage": model_stage,
            "pool": str(self.pool_dir.resolve()),
            "tasks": [resolve_spec(s, Path.cwd()) for s in self.eval_specs],
            "eval": to_dict(self.cfg.eval),
            "device": self.cfg.device,
            "cell": dataclasses.asdict(cell),
        }


def train_model_job(job: dict, pool: Pool | None = None) -> None:
    """Train one evaluation model from Context.model_job's description. `pool`: the job's pool already open (None:
    open it from the job's path, as a Ray task does)."""
    indices, _ = selections.read(job["selection"])
    tcfg = from_dict(TrainConfig, job["train"], prefix="eval_model.")
    train(pool or Pool(job["pool"]), indices, tcfg, job["out"], force=job["redo"])


def evaluate_job(job: dict, tasks: list | None = None, pool: Pool | None = None) -> None:
    """Evaluate one model on every eval task's holdout (Context.eval_job's description) -> metrics.json + record.
    `tasks`, `pool`: the eval tasks (in the job's order) and the pool already loaded (None: load them from the job's
    paths, as a Ray task does)."""
    started, d = time.time(), clean_dir(Path(job["out"]))
    tasks = tasks if tasks is not None else [load_task(spec) for spec in job["tasks"]]
    device, _ = resolve_device(job["device"])
    model = load_model(job["model"]).to(device)
    tokenizer = (pool or Pool(job["pool"])).tokenizer
    ecfg = from_dict(EvalSpec, job["eval"], prefix="eval.")
    metrics = {}
    for task in tasks:
        r = evaluate_task(
            model,
            tokenizer,
            task,
            split="holdout",
            max_examples=ecfg.max_examples or None,
            batch_size=ecfg.batch_size,
        )
        metrics[task.name] = {k: r.get(k) for k in METRIC_KEYS}
        metrics[task.name]["mc_correct"] = r.get("per_example", {}).get("mc_correct")  # for the report's CIs
    write_json(d / "metrics.json", {"cell": job["cell"], "model": job["model_stage"], "metrics": metrics})
    mark_done(d, {"eval": dataclasses.asdict(ecfg)}, started=started, stage=job["stage"])


def _cell_jobs(jobs: list[dict], threads: int, start: int, stop: int) -> None:
    """One Ray task: train, then evaluate, the cells of jobs[start:stop] (either part None = already done) with
    `threads` torch threads (as many as the CPUs the task reserved: more would oversubscribe the cores shared with
    the other cells' tasks)."""
    import torch

    torch.set_num_threads(threads)
    for job in jobs[start:stop]:
        if job["train"]:
            train_model_job(job["train"])
        if job["evaluate"]:
            evaluate_job(job["evaluate"])


METRIC_KEYS = ("loss", "accuracy", "mc_accuracy", "chance", "loss_ci", "mc_ci", "n")


def _stage_cfg(cls, data: dict, key: str, **fixed):
    names = {f.name for f in dataclasses.fields(cls)}
    return from_dict(cls, {**data, **{k: v for k, v in fixed.items() if k in names}}, prefix=key + ".")


# -----------------------------------------------------------------------------
# The whole experiment


def requirements(cfg: ExperimentConfig) -> dict[str, str]:
    """{importable module: the pip extra that installs it} for everything this config will run."""

    needs = {"matplotlib": "report"}
    for method in cfg.methods:
        opts = dict(cfg.method_options.get(method, {}))
        if METHODS[method].estimator_scores:
            opts.setdefault("scores", "-")  # the file is made by the run; only the settings are checked here
        needs.update(make(method, opts).requires())
    executors = [cfg.training.executor] + [
        dict(cfg_slice).get("executor") for cfg_slice in (cfg.proxy, cfg.featurize, cfg.score, cfg.baselines)
    ]
    if "ray" in executors:  # any stage on Ray: named before the pool is built, not when that stage starts
        needs["ray"] = "ray"
    return needs


def check_stage_configs(cfg: ExperimentConfig) -> None:
    """Build every stage's own config dataclass from its mapping, so an unknown key or a wrong type in `proxy`,
    `featurize`, `baselines`, `score` or `eval_model` fails before any work, naming the dotted key."""
    pcfg = _stage_cfg(ProxiesConfig, cfg.proxy, "proxy")
    trainers = {"proxy.train": _stage_cfg(TrainConfig, pcfg.train, "proxy.train")}
    _stage_cfg(FeaturizeConfig, cfg.featurize, "featurize", device=cfg.device)
    _stage_cfg(ExecutorConfig, cfg.baselines, "baselines")
    _stage_cfg(ScoreConfig, cfg.score, "score")
    trainers["eval_model"] = _stage_cfg(TrainConfig, cfg.eval_model, "eval_model", tokens=cfg.budget.tokens)
    for key, tcfg in trainers.items():
        if not tcfg.init_from and tcfg.preset not in PRESETS:
            raise ValueError(f"{key}.preset: unknown model preset {tcfg.preset!r}; choose one of {', '.join(PRESETS)}")
    if cfg.pool.inputs:
        _stage_cfg(PoolBuildConfig, cfg.pool.build, "pool.build")


def check_inputs(cfg: ExperimentConfig) -> None:
    """Refuse, before any work, a config whose input files are missing, naming each with its config key. A path in a
    data build's layout (ROOT/tasks/NAME, ROOT/docs/FILES) gets the command that makes it: the shipped repro configs
    read `dsdm data build-demo --out runs/data-full`, which is not committed."""
    missing = []
    if cfg.pool.path and not Path(cfg.pool.path).exists():
        missing.append(("pool.path", cfg.pool.path))
    for spec in cfg.pool.inputs:
        if not (glob.glob(spec, recursive=True) if glob.has_magic(spec) else Path(spec).exists()):
            missing.append(("pool.inputs", spec))
    specs = [(f"targets.{t.name}.tasks", spec) for t in cfg.targets for spec in t.tasks]
    for key, spec in specs + [("unseen", spec) for spec in cfg.unseen]:
        missing += [(key, p) for p in parse_spec(spec)[1] if not Path(p).exists()]
    if not missing:
        return
    roots = sorted({str(Path(p).parent.parent) for _, p in missing if Path(p).parent.name in ("tasks", "docs")})
    listed = ", ".join(f"{key}: {path}" for key, path in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    fix = " and ".join(f"`dsdm data build-demo --out {root}`" for root in roots)
    raise FileNotFoundError(
        f"{len(missing)} input(s) of the config not found ({listed}{more}); "
        + (f"they are a data build's folders: make them with {fix}" if roots else "fix the paths")
    )


def check_selection_sizes(cfg: ExperimentConfig, cells: list[Cell], n: int) -> None:
    """Refuse, before any work, a cell whose k its method cannot select from n pool examples (a method's optional
    max_k(n), e.g. SemDeDup's kept fraction); found otherwise only at that cell's selection, after the pool-sized
    stages have run."""
    for method in cfg.methods:
        if not hasattr(METHODS[method], "max_k"):
            continue
        limit = make(method, cfg.method_options.get(method, {})).max_k(n)
        too_big = [c.k for c in cells if c.method == method and limit is not None and c.k > limit]
        if too_big:
            raise ValueError(
                f"{method} can select at most {limit} of the pool's {n} examples with method_options.{method} = "
                f"{cfg.method_options.get(method, {})}, but its cells need k = {max(too_big)}; raise its keep "
                f"fraction (e.g. method_options.{method}.target_keep_fraction >= {max(too_big) / n:.3f}) or lower "
                "budget.tokens"
            )


def plan(ctx: Context) -> tuple[list[Cell] | None, list[Stage], dict[str, str]]:
    """(cells, stages, keys). Until a pool the run builds exists with its current settings, only the pool stage is
    planned (the cells depend on the pool's size); plan again after it has run."""

    cfg, out = ctx.cfg, ctx.out
    keys: dict[str, str] = {}
    if cfg.pool.path:  # an existing pool: its content fingerprint is the key every stage reading it depends on
        keys["pool"] = record_key({"pool": {"fingerprint": ctx.pool.fingerprint}})
    else:
        pool_stage = Stage("pool", ctx.pool_slice, [], ctx.build_pool)
        keys["pool"] = stage_key(pool_stage, keys)
        if ((read_record(out / "pool") or {}).get("run") or {}).get("key") != keys["pool"]:
            return None, [pool_stage], keys
    cells = plan_cells(cfg, ctx.pool.seq_len, len(ctx.pool), ctx.pool.vocab_size)
    check_selection_sizes(cfg, cells, len(ctx.pool))
    stages = plan_stages(cfg, ctx, cells)
    for st in stages:
        keys[st.name] = stage_key(st, keys)
    return cells, ([] if cfg.pool.path else [pool_stage]) + stages, keys


def recorded_stages(out: Path) -> list[str]:
    """Names of the stages of `out` that hold a runner record."""

    names = []
    for marker in sorted(out.rglob(DONE_FILE)) if out.is_dir() else []:
        run = read_json(marker).get("run")
        if run:
            names.append(run["stage"])
    return names


def run_stages(out: Path, stages: list[Stage], keys: dict[str, str], force: bool) -> None:
    """run_stage on each in order, with a progress bar over the stages."""
    bar = progress(total=len(stages), desc="stages", unit="stage")
    for st in stages:
        bar.set_postfix_str(st.name)
        run_stage(out, st, keys, force)
        bar.update(1)
    bar.close()


def run(cfg: ExperimentConfig, out: str | Path, force: bool = False) -> Path:
    """Run (or resume) the experiment in `out`, then render the report; returns the report.html path.

    Before any work: every dependency of the config is checked, the tasks are loaded, the cells are planned and every
    stage already in `out` is compared with what this config would produce. If any differs, nothing runs unless
    `force`: then those stages and everything downstream of them are recomputed."""

    out = Path(out)
    check_stage_configs(cfg)
    check_inputs(cfg)
    check_requirements(requirements(cfg), "dsdm experiment")
    ctx = Context(cfg, out)  # loads and validates every task
    cells, stages, keys = plan(ctx)
    with run_lock(out):
        stale = preflight(out, stages, keys)
        if cells is None:  # the pool will be (re)built: every other recorded stage depends on it
            stale += [(name, ["inputs.pool"]) for name in recorded_stages(out) if name != "pool"]
        if stale and not force:
            raise StaleRun(stale_message(out, stale))
        for name, changed in stale:
            log(f"recomputing {name} (changed: {', '.join(changed)})")
        save_config(cfg, out / "config.yaml")
        log(f"device {ctx.device}: {ctx.device_reason}")
        if cells is None:
            run_stage(out, stages[0], keys, force=True)
            cells, stages, keys = plan(ctx)
        log(
            f"{len(cells)} cells: {len(cfg.methods)} methods x {len(cfg.targets)} targets x {len(cfg.seeds)} seeds; "
            f"budget {cfg.budget.tokens} tokens, seq_len {ctx.pool.seq_len}"
        )
        write_json(out / "eval_groups.json", ctx.eval_groups())
        if cfg.training.executor == "ray":  # everything else, then every cell's model and evaluation at once
            named = {st.name: st for st in stages}
            pairs = [(named[f"models/{c.name}"], named[f"eval/{c.name}"]) for c in cells]
            in_pairs = {st.name for pair in pairs for st in pair}
            run_stages(out, [st for st in stages if st.name not in in_pairs], keys, force)
            run_cells_on_ray(ctx, pairs, keys, force)
        else:
            run_stages(out, stages, keys, force)
        rows = results.collect([out / f"eval/{c.name}/metrics.json" for c in cells])
        path = results.write(out / "results.csv", rows)
        log(f"wrote {path}")
        return render(out)
