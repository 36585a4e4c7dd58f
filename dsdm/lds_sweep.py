"""`dsdm lds-sweep`: the LDS of many estimator variants, and of the baselines' scores, on the models that ONE
`dsdm validate-lds` run trained (docs/estimator.md "The LDS sweep").

Training the subset models is the expensive part of an LDS; scoring is cheap. So the models are trained once
(validate-lds, with `eval_tasks` so every model is also evaluated on the other task families) and every variant is
only a different ScoreConfig (dsdm.datamodel: use_q, ridge, normalize, kernel, exclude_layers, num_proxies) or a
different feature store of the same pool (another proj_dim, more proxies: `dsdm proxies train` + `dsdm featurize`),
scored by the same code `dsdm score` runs. Each row of sweep.csv is one (variant, task): the Spearman LDS on the
task's target split with its p-value, on its holdout split, the number of subsets and a free-text regime.

Variants file (YAML): a mapping name -> ScoreConfig overrides, plus an optional `features: NAME` naming one of the
extra stores given with `--features NAME=DIR`, and an optional `select:` rule for the selection arms ({rule: top_k}
by default; {rule: tempered, temperature: T} or {rule: balanced, by: COLUMN}: dsdm.select.tempered_k, balanced_top_k
over a pool metadata column such as `source`). Without it, DEFAULT_VARIANTS. The baselines (default: DSIR) are
fitted on each task's target split and scored over the pool (dsdm.baselines.fit_and_score) and enter as rows too.

Selection arms (`topk_fraction` > 0): the LDS ranks random subsets, but selection keeps the top of one ranking, and
the two can disagree (docs/estimator.md, "Downstream check"). So each (variant, task) can also train one model, with
the LDS run's own recipe and seed, on the k examples that variant would select for that task (top-k; a baseline by
its own rule, e.g. DSIR's Gumbel top-k), and report its holdout loss beside `random_arms` models on uniform k-subsets;
`arm_seeds` > 1 averages every arm over that many training seeds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsdm.baselines import METHODS, fit_and_score, make, target_texts
from dsdm.baselines.dsdm_scores import DsdmScores
from dsdm.common import log, numpy_rng, resolve_device
from dsdm.config import from_dict
from dsdm.datamodel import ScoreConfig, ensemble, load_features, score_tasks_per_proxy
from dsdm.io import atomic_path, atomic_write_text, mark_done
from dsdm.pool import Pool
from dsdm.select import select_by_rule, top_k, uniform_k
from dsdm.tasks import encode_examples, load_task
from dsdm.validate import (
    ValidateConfig,
    lds,
    lds_summary,
    read_lds_run,
    replica_seed,
    subset_predictions,
    train_and_eval,
)

# name -> ScoreConfig overrides; "default" is ScoreConfig() itself. Chosen to answer docs/estimator.md's questions
# one switch at a time (issue 13's list); combinations go in a variants file.
DEFAULT_VARIANTS: dict[str, dict] = {
    "default": {},
    "no_q": {"use_q": False},
    "ridge_1e-4": {"ridge": 1e-4},
    "ridge_1e-3": {"ridge": 1e-3},
    "ridge_1e-1": {"ridge": 1e-1},
    "ridge_1": {"ridge": 1.0},
    "ridge_10": {"ridge": 10.0},
    "normalize_pool": {"normalize": "pool"},
    "normalize_target": {"normalize": "target"},
    "normalize_both": {"normalize": "both"},
    "per_layer": {"kernel": "per_layer"},
    "no_lm_head": {"exclude_layers": ["lm_head"]},
    "only_lm_head": {"exclude_layers": ["transformer"]},
    "proxies_1": {"num_proxies": 1},
}

COLUMNS = [
    "variant",
    "target",
    "lds",
    "p",
    "lds_holdout",
    "subsets",
    "regime",
    "features",
    "config",
    "k",
    "topk_loss",
    "random_loss",
    "random_loss_se",
]


@dataclass
class SweepConfig:
    regime: str = ""
    """Free text written to every row's `regime` column: what the LDS models were (preset, tokens, subset size)."""
    baselines: list[str] = field(default_factory=lambda: ["dsir"])
    """Baseline methods (dsdm.baselines.METHODS with per-example scores) whose LDS is measured beside the variants."""
    device: str = "auto"
    """Device for the target gradients and the streamed scoring."""
    subset_range: list[int] = field(default_factory=list)
    """[start, stop): measure the LDS on those subsets only (default: all). For a held-out confirmation: subsets
    trained after a variant was chosen on the earlier ones (validate-lds draws subset j the same for any count)."""
    replicas: list[int] = field(default_factory=list)
    """Training seeds (replica indices r of validate.train_seeds) whose mean loss ranks the subsets (default: all,
    the run's own mean). A run trained with several seeds can so be read against disjoint groups of seeds: a variant
    chosen on replicas [0, 1] is confirmed on [2, 3], whose training noise is independent (docs/estimator.md round
    13)."""
    choose_on: list[int] = field(default_factory=list)
    """[start, stop) of the measured subsets: per task, choose the variant (baselines excluded) with the largest LDS
    on those subsets, and add a row `chosen` with its LDS on the other subsets. An automatic choice whose reading is
    not fitted to the subsets it chose on, e.g. of the ridge among ridge variants (docs/estimator.md round 15c)."""
    topk_fraction: float = 0.0
    """k = round(topk_fraction * N) for the selection arms (module docstring); 0 = LDS only, no training."""
    random_arms: int = 3
    """Uniform random k-subsets trained as the reference of the selection arms (their mean and standard error)."""
    arm_seeds: int = 1
    """Training seeds per arm: every arm's loss (top-k and random) is the mean of this many models on the same
    indices, seed r = validate's replica r of the sanity arms (r = 0 is the single model of arm_seeds = 1, so a
    sweep's arms are reused and extended). One model's seed noise is about as large as the random arms' spread
    (docs/estimator.md round 14), so differences between variants under ~0.15 nats need more than one."""

    def __post_init__(self):
        if not 0 <= self.topk_fraction < 1:
            raise ValueError(f"topk_fraction must be in [0, 1), got {self.topk_fraction}")
        for key in ("subset_range", "choose_on"):
            r = getattr(self, key)
            if r and (len(r) != 2 or not 0 <= r[0] or r[1] - r[0] < 3):
                raise ValueError(f"{key} must be [start, stop) with 0 <= start and >= 3 subsets, got {r}")
        if len(set(self.replicas)) != len(self.replicas) or any(r < 0 for r in self.replicas):
            raise ValueError(f"replicas must be distinct replica indices >= 0, got {self.replicas}")
        if self.topk_fraction and self.random_arms < 2:
            raise ValueError(f"random_arms must be >= 2 for a standard error, got {self.random_arms}")
        if self.arm_seeds < 1:
            raise ValueError(f"arm_seeds must be >= 1, got {self.arm_seeds}")


def load_lds_run(lds_dir, replicas: list[int] | None = None) -> dict:
    """validate.read_lds_run, plus the pool: {"subsets", "tasks": {name: (spec, target (S,), holdout (S,))}, "pool",
    "n", "config" (the run's ValidateConfig as a dict)}. A run made before `eval_tasks` is refused: its lds.json lacks
    the task specs the variants are scored for. With `replicas`, each subset's losses are the mean over those training
    seeds only (lds.json's losses_by_replica, written when validate.train_seeds > 1)."""
    run = read_lds_run(lds_dir)
    if any(spec is None for spec, _, _ in run["tasks"].values()):
        raise ValueError(
            f"{lds_dir}/lds.json has no losses_by_task (made before `eval_tasks`): re-run validate-lds to sweep it"
        )
    rec = run["record"]
    by_replica = rec.get("losses_by_replica") or {}  # absent when the run trained one seed per subset
    have = len(next(iter(by_replica.values()))) if by_replica else 1
    if replicas and max(replicas) >= have:
        raise ValueError(
            f"replicas {replicas}: {lds_dir} trained {have} seed(s) per subset (replica indices 0..{have - 1}); "
            "train more with validate-lds --set train_seeds=R"
        )
    if replicas and by_replica:  # else replicas == [0] of a single-seed run: its own losses
        run["tasks"] = {
            name: (
                spec,
                *(
                    np.array([np.mean([by_replica[name][r][j][split] for r in replicas]) for j in range(len(a))])
                    for split in ("target", "holdout")
                ),
            )
            for name, (spec, a, _) in run["tasks"].items()
        }
    return {
        "subsets": run["subsets"],
        "tasks": run["tasks"],
        "pool": rec["pool"],
        "n": run["n"],
        "config": rec["config"],
    }


def read_variants(path) -> dict[str, dict]:
    """A variants YAML file: mapping name -> ScoreConfig overrides (+ optional features: NAME)."""
    import yaml

    text = Path(path).read_text()
    variants = yaml.safe_load(text)
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ValueError(f"{path}: expected a mapping of variant name -> {{ScoreConfig key: value}}")
    return variants


class _Arms:
    """The selection arms of one sweep: trains (or finds, dsdm.train skips finished runs) a model per k-subset under
    out_dir/arms/ with the LDS run's recipe and seed, and evaluates it on task holdout splits."""

    def __init__(self, run: dict, pool: Pool, out_dir: Path, cfg: SweepConfig, device):
        self.vcfg = from_dict(ValidateConfig, run["config"], prefix="lds.json config: ")
        self.pool, self.dir, self.device, self.seeds = pool, out_dir / "arms", device, cfg.arm_seeds
        self.k = max(1, int(round(cfg.topk_fraction * run["n"])))
        self.evals = {}
        for task, (spec, _, _) in run["tasks"].items():
            tok, _, sc = encode_examples(pool.tokenizer, load_task(spec).split("holdout"), pool.seq_len, pool.eos_id)
            self.evals[task] = {"holdout": (tok, sc)}
        losses = []
        for r in range(cfg.random_arms):
            idx = np.sort(uniform_k(run["n"], self.k, numpy_rng((self.vcfg.seed, 20_000 + r))))
            losses.append(self.loss(idx, list(self.evals)))
        self.random = {t: np.array([x[t] for x in losses]) for t in self.evals}
        log(
            f"selection arms: k={self.k}; random holdout loss "
            + ", ".join(f"{t} {v.mean():.4f} ± {v.std(ddof=1) / np.sqrt(v.size):.4f}" for t, v in self.random.items())
        )

    def loss(self, indices: np.ndarray, tasks: list[str]) -> dict[str, float]:
        """Mean holdout loss over the arm's `arm_seeds` models, task -> float."""
        evals = {t: self.evals[t] for t in tasks}
        indices = np.sort(indices)
        # named by content, not by variant: an edited variant trains anew, equal selections share one model
        name = f"k{indices.size}_{hashlib.sha256(indices.tobytes()).hexdigest()[:16]}"
        losses = {t: [] for t in tasks}
        for r in range(self.seeds):
            seed = replica_seed(self.vcfg, 999, r)  # r = 0: the seed validate-lds gives its sanity arms
            model_dir = self.dir / (name if r == 0 else f"{name}_r{r}")
            measured = train_and_eval(self.pool, indices, self.vcfg, seed, model_dir, evals, self.device)
            for t in tasks:
                losses[t].append(measured[t]["holdout"])
        return {t: float(np.mean(v)) for t, v in losses.items()}

    def columns(self, task: str, indices: np.ndarray) -> dict:
        random = self.random[task]
        return {
            "k": self.k,
            "topk_loss": round(self.loss(indices, [task])[task], 4),
            "random_loss": round(float(random.mean()), 4),
            "random_loss_se": round(float(random.std(ddof=1) / np.sqrt(random.size)), 4),
        }


def selection_rule(spec: dict | None, pool: Pool, name: str):
    """A variant's `select:` setting -> f(scores (N,), k) -> (k,) indices. Draws use the runner's selection stream
    for seed 0, numpy_rng((0, 2)), fresh for every call."""
    spec = dict(spec or {"rule": "top_k"})
    rule = spec.pop("rule", "top_k")
    allowed = {"top_k": set(), "tempered": {"temperature"}, "balanced": {"by"}}
    if rule not in allowed or set(spec) - allowed[rule]:
        raise ValueError(
            f"variant {name}: select must be {{rule: top_k}}, {{rule: tempered, temperature: T}} or "
            f"{{rule: balanced, by: COLUMN}}; got {dict(rule=rule, **spec)}"
        )
    temperature = float(spec.get("temperature", DsdmScores.__dataclass_fields__["temperature"].default))
    groups = None
    if rule == "balanced":
        column = spec.get("by", "source")
        if column not in pool.meta_columns:
            raise ValueError(f"variant {name}: select.by={column!r} is not a column of {pool.path}/meta.parquet")
        groups, _ = pool.codes(column)  # int codes that sort like the labels: the same groups and group order
    return lambda scores, k: select_by_rule(
        scores, k, rule, rng=numpy_rng((0, 2)), temperature=temperature, groups=groups
    )


def _outside(choose_on: list[int], count: int) -> list[int]:
    """The subset indices of 0..count-1 outside [start, stop); refuses a block that leaves fewer than 3 or overruns."""
    start, stop = choose_on
    rest = [j for j in range(count) if not start <= j < stop]
    if stop > count or len(rest) < 3:
        raise ValueError(f"choose_on {choose_on}: needs >= 3 of the {count} subsets outside it")
    return rest


def held_out_choice(scores: dict[str, np.ndarray], run: dict, choose_on: list[int]) -> dict[str, tuple[str, dict, int]]:
    """Per task, the variant whose LDS on subsets [start, stop) of the run is the largest (the first in `scores`
    order on a tie; an undefined LDS never wins), and that variant's LDS summary on the other subsets.

    scores: variant name -> (N, T) per-task scores, columns in run['tasks'] order.
    -> task -> (chosen name, lds_summary on the other subsets, their number)."""
    start, stop = choose_on
    rest = _outside(choose_on, len(run["subsets"]))
    chosen = {}
    for t, (task, (_, target, holdout)) in enumerate(run["tasks"].items()):
        target, holdout = np.asarray(target), np.asarray(holdout)
        on = {}
        for name, s in scores.items():
            value = lds(subset_predictions(s[:, t], run["subsets"][start:stop]), target[start:stop])
            on[name] = value if np.isfinite(value) else -np.inf
        best = max(on, key=on.get)
        pred = subset_predictions(scores[best][:, t], [run["subsets"][j] for j in rest])
        chosen[task] = (best, lds_summary(pred, target[rest], holdout[rest]), len(rest))
    return chosen


def _lds_columns(summary: dict, subsets: int) -> dict:
    """The LDS columns of a sweep.csv row from an lds_summary over `subsets` subsets."""
    return {
        "lds": round(summary["lds_target"], 4),
        "p": float(f"{summary['lds_target_p']:.3g}"),
        "lds_holdout": round(summary["lds_holdout"], 4),
        "subsets": subsets,
    }


def _rows_for(name, scores, run, regime, features, config, arms: _Arms | None = None, select=None) -> list[dict]:
    """One row per task: the LDS of (N, T) per-task scores (columns in run['tasks'] order), and with `arms` the
    holdout loss of a model trained on what select(scores[:, t], k) keeps (default: top-k)."""
    rows = []
    for t, (task, (_, target, holdout)) in enumerate(run["tasks"].items()):
        pred = subset_predictions(scores[:, t], run["subsets"])
        summary = lds_summary(pred, target, holdout)
        rows.append(
            {
                "variant": name,
                "target": task,
                **_lds_columns(summary, len(run["subsets"])),
                "regime": regime,
                "features": features,
                "config": json.dumps(config, sort_keys=True),
            }
        )
        if arms is not None:
            kept = (select or top_k)(scores[:, t], arms.k)
            rows[-1].update(arms.columns(task, np.asarray(kept, dtype=np.int64)))
    return rows


def sweep(
    lds_dir, features: dict[str, str], out_dir, cfg: SweepConfig, variants: dict[str, dict] | None = None
) -> list[dict]:
    """Score every variant (and baseline) and write out_dir/sweep.csv (+ sweep.png if matplotlib is installed).

    features: name -> feature store of the LDS run's pool; "main" is the store variants use unless they name another.
    Returns the rows (COLUMNS)."""
    started = time.time()
    run = load_lds_run(lds_dir, cfg.replicas)
    if cfg.subset_range:
        start, stop = cfg.subset_range
        if stop > len(run["subsets"]):
            raise ValueError(f"subset_range {cfg.subset_range}: {lds_dir} has {len(run['subsets'])} subsets")
        run["subsets"] = run["subsets"][start:stop]
        run["tasks"] = {t: (spec, a[start:stop], b[start:stop]) for t, (spec, a, b) in run["tasks"].items()}
    if cfg.choose_on:
        _outside(cfg.choose_on, len(run["subsets"]))  # refused before any scoring
    variants = dict(DEFAULT_VARIANTS if variants is None else variants)
    if "main" not in features:
        raise ValueError("lds-sweep needs the main feature store (--features DIR)")
    for name, store in features.items():
        manifest, _ = load_features(Path(store))
        if manifest["num_examples"] != run["n"]:
            raise ValueError(
                f"{store}: {manifest['num_examples']} examples, but {lds_dir} measured a pool of {run['n']}"
            )
    for b in cfg.baselines:
        if b not in METHODS or not METHODS[b].targeted:
            raise ValueError(f"lds-sweep baselines: {b!r} is not a targeted method ({', '.join(METHODS)})")
        if b in variants:
            raise ValueError(f"variant {b!r} has the name of a baseline row; rename the variant")
    if cfg.choose_on and "chosen" in variants:
        raise ValueError("variant 'chosen' has the name of the choose_on row; rename the variant")
    pool, out_dir = Pool(run["pool"]), Path(out_dir)
    parsed = {}  # every variant checked before any work: name -> (store, ScoreConfig overrides, ScoreConfig, rule)
    for name, overrides in variants.items():
        overrides = dict(overrides)
        store = overrides.pop("features", "main")
        select = selection_rule(overrides.pop("select", None), pool, name)
        if store not in features:
            raise ValueError(f"variant {name!r}: features {store!r} not given (--features {store}=DIR)")
        parsed[name] = (store, overrides, from_dict(ScoreConfig, overrides, prefix=f"variant {name}: "), select)
    device = resolve_device(cfg.device)[0]
    specs = [spec for spec, _, _ in run["tasks"].values()]
    arms = _Arms(run, pool, out_dir, cfg, device) if cfg.topk_fraction else None
    rows, cache, by_name = [], {}, {}  # variants that differ only in their selection rule share one scoring pass
    for name, (store, overrides, score_cfg, select) in parsed.items():
        key = json.dumps([store, overrides], sort_keys=True)
        if key not in cache:
            us, qs, _ = score_tasks_per_proxy(Path(features[store]), specs, score_cfg, device)
            cache[key] = ensemble(us, qs)
        by_name[name] = cache[key]
        config = {**overrides, **({"select": variants[name]["select"]} if "select" in variants[name] else {})}
        rows += _rows_for(name, cache[key], run, cfg.regime, store, config, arms, select)
        log(f"variant {name}: " + _summary(rows[-len(specs) :]))
    if cfg.choose_on:
        for task, (best, summary, n_rest) in held_out_choice(by_name, run, cfg.choose_on).items():
            rows.append(
                {
                    "variant": "chosen",
                    "target": task,
                    **_lds_columns(summary, n_rest),
                    "regime": cfg.regime,
                    "features": parsed[best][0],
                    "config": json.dumps({"chosen": best, "choose_on": cfg.choose_on}, sort_keys=True),
                }
            )
            log(
                f"chosen on subsets {cfg.choose_on} for {task}: {best}; "
                f"LDS on the other {n_rest}: {rows[-1]['lds']:+.3f}"
            )
    for b in cfg.baselines:
        est = make(b)
        per_task = np.stack(
            [np.asarray(fit_and_score(est, pool, target_texts([load_task(s)]), 0)[0]) for s in specs], 1
        )
        # the method's own rule (DSIR: Gumbel top-k of log w), with the runner's selection stream for seed 0
        rule = lambda scores, k: est.select(scores, k, numpy_rng((0, 2)))  # noqa: E731
        rows += _rows_for(b, per_task.astype(np.float64), run, cfg.regime, "", {}, arms, rule)
        log(f"baseline {b}: " + _summary(rows[-len(specs) :]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "sweep.csv", buf.getvalue())
    plot(rows, out_dir / "sweep.png")
    stage_cfg = {"lds": str(lds_dir), "features": features, "variants": variants, "sweep": vars(cfg)}
    mark_done(out_dir, stage_cfg, started=started, stage="lds-sweep")
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per variant, one column per task: "LDS (p)", and with selection arms "; Δ top-k" = the top-k arm's
    holdout loss minus the random arms' mean (negative = the selection beats random), then the random arms' s.e."""
    tasks = list(dict.fromkeys(r["target"] for r in rows))
    by = {(r["variant"], r["target"]): r for r in rows}
    arms = any(r.get("topk_loss", "") != "" for r in rows)
    head = "| variant | " + " | ".join(tasks) + " |\n|---|" + "---:|" * len(tasks)
    lines = [head]
    for name in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for t in tasks:
            r = by.get((name, t))
            if r is None:
                cells.append("")
                continue
            cell = f"{r['lds']:+.3f} ({r['p']:.2g})"
            if arms and r.get("topk_loss", "") != "":
                cell += f"; Δ {r['topk_loss'] - r['random_loss']:+.3f}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if arms:
        first = {t: by[next(n for n, tt in by if tt == t), t] for t in tasks}
        lines.append(
            "| random arms: loss ± s.e. | "
            + " | ".join(f"{first[t]['random_loss']:.3f} ± {first[t]['random_loss_se']:.3f}" for t in tasks)
            + " |"
        )
    return "\n".join(lines)


def _summary(rows: list[dict]) -> str:
    """'task LDS [top-k loss - random loss]' per row, for the log."""
    parts = []
    for r in rows:
        arm = f" [top-k {r['topk_loss'] - r['random_loss']:+.3f} vs random]" if "topk_loss" in r else ""
        parts.append(f"{r['target']} {r['lds']:+.3f}{arm}")
    return ", ".join(parts)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Horizontal bars: LDS per variant, one panel per task; bars with p < 0.01 drawn solid. None without
    matplotlib (the CSV is the result; the plot is a view of it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = list(dict.fromkeys(r["target"] for r in rows))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 0.28 * len(names) + 1.2), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, task in zip(axes, tasks):
        by = {r["variant"]: r for r in rows if r["target"] == task}
        vals = [by[n]["lds"] if n in by else np.nan for n in names]
        solid = [n in by and by[n]["p"] < 0.01 for n in names]
        ax.barh(range(len(names)), vals, color=["C0" if s else "0.75" for s in solid])
        ax.axvline(0, color="k", lw=0.6)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("LDS (Spearman)", fontsize=8)
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("LDS per estimator variant (solid: p < 0.01)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
