"""Estimator checks that the paper lacks (docs/method.md §9.2 step 8): the linear datamodeling score (LDS) and the
top-k / bottom-k sanity checks.

LDS: train models on `subsets` random subsets S_j (each a `fraction` of the pool), measure the actual target loss
L_j (mean over target examples of the mean continuation NLL), and compare with the datamodel's prediction for S_j,
pred_j = sum_{i in S_j} s_i, where s is the task's DsDm score (larger = more helpful, dsdm.select). Since a larger
score means a lower loss, LDS = Spearman(pred_j, -L_j): +1 = the datamodel ranks the subsets perfectly, 0 = no
information, negative = the sign is wrong.

Sanity: train the same recipe on the k largest scores, k uniform random examples and the k smallest; on the target's
holdout split the top-k model should have the lowest loss and the bottom-k model the highest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def subset_predictions(scores: np.ndarray, subsets: list[np.ndarray]) -> np.ndarray:
    """pred_j = sum of scores over subset j. scores (N,), subsets: S arrays of indices -> (S,) float64."""
    return np.array([np.asarray(scores, dtype=np.float64)[s].sum() for s in subsets])


def lds(predictions: np.ndarray, losses: np.ndarray) -> float:
    """Spearman between predicted helpfulness and the negated measured loss across subsets."""
    return spearman(predictions, -np.asarray(losses))


def lds_p_value(predictions: np.ndarray, losses: np.ndarray) -> float:
    """Two-sided p-value of the LDS against "no rank correlation" (scipy's t approximation)."""
    from scipy.stats import spearmanr

    return float(spearmanr(predictions, -np.asarray(losses)).pvalue)


def lds_summary(predictions: np.ndarray, target_losses: np.ndarray, holdout_losses: np.ndarray) -> dict[str, float]:
    """The LDS on the target split with its p-value, and on the holdout split."""
    return {
        "lds_target": lds(predictions, target_losses),
        "lds_holdout": lds(predictions, holdout_losses),
        "lds_target_p": lds_p_value(predictions, target_losses),
    }


def lds_by_ensemble_size(us: list[np.ndarray], qs: list[np.ndarray], subsets, losses) -> dict[int, float]:
    """LDS of the ensemble of the first m proxies, m = 1, 2, 4, ..., M. us, qs: M x (N,) kernel terms and Q.

    TRAK's per-example scores are noisy and their noise falls with the number of models ensembled; a rising curve
    says more proxies would help, a flat one that the noise is elsewhere."""
    from dsdm.datamodel import ensemble

    sizes = sorted({min(2**i, len(us)) for i in range(len(us).bit_length() + 1)})
    return {m: lds(subset_predictions(ensemble(us[:m], qs[:m]), subsets), losses) for m in sizes}


def lds_by_group(scores: np.ndarray, groups: np.ndarray, subsets, losses) -> dict[str, float]:
    """Split each score into its group's mean (e.g. the document's source) and the residual, and give the LDS of each.

    scores = between + within, so the subset prediction is too. "between" measures whether the datamodel ranks
    the composition of a subset (how much of each source it holds); "within" whether it ranks examples inside a
    source. scores (N,), groups (N,) labels -> {"between": LDS, "within": LDS}."""
    scores = np.asarray(scores, dtype=np.float64)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    means = np.bincount(inverse, weights=scores) / np.bincount(inverse)
    between = means[inverse]
    return {
        "between": lds(subset_predictions(between, subsets), losses),
        "within": lds(subset_predictions(scores - between, subsets), losses),
    }


def continuation_loss(model, tokens: np.ndarray, score: np.ndarray, device, batch_size: int = 32) -> np.ndarray:
    """Per-example mean NLL over scored tokens (dsdm.evaluate's metric). tokens, score: (n, T) -> (n,) float64."""
    from dsdm.evaluate import continuation_scores

    nll, count, _ = continuation_scores(model, tokens, score, device, batch_size)
    return nll / np.maximum(count, 1)


# -----------------------------------------------------------------------------
# IO: `dsdm validate-lds`


@dataclass
class ValidateConfig:
    subsets: int = 20
    """Number of random subsets (models trained) for the LDS."""
    fraction: float = 0.5
    """Fraction of the pool in each LDS subset."""
    sanity_fraction: float = 0.1
    """k = sanity_fraction * N for the top-k / random / bottom-k check; 0 skips it."""
    seed: int = 0
    """Seed of the subset draws, the random arm and the trainers."""
    shared_train_seed: bool = True
    """Train every model (LDS subsets and sanity arms) from the same seed, seed * 1000: the datamodel predicts the
    effect of the data, so initialization noise is held fixed (datamodels papers average it out over many models
    instead). False gives model j the seed seed * 1000 + j, as before."""
    train_seeds: int = 1
    """Models per LDS subset, each from its own training seed (replica_seed); a subset's loss is their mean, the
    expected output over training randomness that the datamodel predicts, and lds.json records each replica's losses
    and the replicas' agreement (docs/estimator.md round 11). Replica 0 is the single model of train_seeds = 1."""
    ridge: float = 1e-2
    """Relative ridge of the datamodel (dsdm.datamodel.ScoreConfig.ridge, the same default)."""
    eval_tasks: list[str] = field(default_factory=list)
    """More task specs every model is also evaluated on: the subsets are random, not drawn for the target, so the
    same models measure the LDS of any task (`dsdm lds-sweep` reads them from lds.json "losses_by_task")."""
    train: dict = field(default_factory=dict)
    """Trainer settings (dsdm.train.TrainConfig keys), the same for every model trained here."""
    device: str = "auto"
    """Device for training-free evaluation and target gradients."""

    def __post_init__(self):
        if self.subsets < 3:
            raise ValueError(f"subsets must be >= 3 for a rank correlation, got {self.subsets}")
        if not 0 < self.fraction < 1 or not 0 <= self.sanity_fraction < 1:
            raise ValueError("fraction must be in (0, 1) and sanity_fraction in [0, 1)")
        if self.train_seeds < 1:
            raise ValueError(f"train_seeds must be >= 1, got {self.train_seeds}")


def train_and_eval(pool, indices, cfg: ValidateConfig, seed: int, out_dir: Path, evals: dict, device) -> dict:
    """Train on `indices`, then the mean continuation loss of every (task, split) in evals -> {task: {split: loss}}."""
    from dsdm.config import from_dict
    from dsdm.model import load_model
    from dsdm.train import TrainConfig, train

    tcfg = {**cfg.train, "seed": seed}
    model = load_model(train(pool, indices, from_dict(TrainConfig, tcfg, prefix="train."), out_dir)).to(device)
    return {
        task: {split: float(continuation_loss(model, tok, sc, device).mean()) for split, (tok, sc) in splits.items()}
        for task, splits in evals.items()
    }


def train_seed(cfg: ValidateConfig, model_index: int) -> int:
    """seed * 1000 for every model when shared_train_seed, else seed * 1000 + model_index."""
    return cfg.seed * 1000 + (0 if cfg.shared_train_seed else model_index)


def replica_seed(cfg: ValidateConfig, model_index: int, replica: int) -> int:
    """Training seed of replica r of LDS subset j: train_seed for r = 0 (the models of train_seeds = 1), shifted by
    r x 100,003 (never another model's seed at seed, j < 100,000) for the others."""
    return train_seed(cfg, model_index) + 100_003 * replica


def replica_agreement(per_replica: np.ndarray) -> float:
    """Mean pairwise Spearman correlation between the replicas' subset losses, (R, S) -> float (nan for R < 2)."""
    pairs = [(a, b) for a in range(len(per_replica)) for b in range(a + 1, len(per_replica))]
    if not pairs:
        return float("nan")
    return float(np.mean([spearman(per_replica[a], per_replica[b]) for a, b in pairs]))


def run(pool_dir, features_dir, task_spec: str, out_dir, cfg: ValidateConfig) -> dict:
    """Write out_dir/lds.json (LDS, per-subset predictions and losses, sanity losses) and the trained models."""
    from dsdm.common import log, numpy_rng, resolve_device
    from dsdm.datamodel import ScoreConfig, ensemble, score_tasks_per_proxy
    from dsdm.io import save_npy, write_json
    from dsdm.pool import Pool
    from dsdm.proxies import draw_subset
    from dsdm.select import bottom_k, top_k, uniform_k
    from dsdm.tasks import encode_examples, load_task

    started = time.time()
    device, why = resolve_device(cfg.device)
    log(f"device {why}")
    pool, out_dir = Pool(pool_dir), Path(out_dir)
    task = load_task(task_spec)
    specs = {task.name: str(task_spec)}
    for spec in cfg.eval_tasks:
        other = load_task(spec)
        if other.name in specs:
            raise ValueError(f"validate.eval_tasks: task {other.name!r} ({spec}) is already evaluated; list it once")
        specs[other.name] = str(spec)
    evals = {}  # task name -> split -> (tokens, score mask); the primary task first
    for name, spec in specs.items():
        t = task if name == task.name else load_task(spec)
        evals[name] = {}
        for split in ("target", "holdout"):
            tok, _, sc = encode_examples(pool.tokenizer, t.split(split), pool.seq_len, pool.eos_id)
            evals[name][split] = (tok, sc)
    us, qs, _ = score_tasks_per_proxy(Path(features_dir), [task_spec], ScoreConfig(ridge=cfg.ridge), device)
    us = [u[:, 0] for u in us]
    scores = ensemble(us, qs)
    save_npy(out_dir / "scores.npy", scores.astype(np.float32))
    n = len(pool)
    subsets = [draw_subset(n, cfg.fraction, cfg.seed, 10_000 + j) for j in range(cfg.subsets)]
    by_task = {name: [] for name in evals}  # task -> per subset {"target": loss, "holdout": loss}, replica mean
    by_replica = {name: [[] for _ in range(cfg.train_seeds)] for name in evals}  # task -> replica -> per subset
    for j, s in enumerate(subsets):
        save_npy(out_dir / "subsets" / f"subset_{j}.npy", s)
        replicas = []
        for r in range(cfg.train_seeds):
            model_dir = out_dir / "models" / (f"lds_{j}" if r == 0 else f"lds_{j}_r{r}")
            replicas.append(train_and_eval(pool, s, cfg, replica_seed(cfg, j, r), model_dir, evals, device))
        for name in evals:
            for r, measured in enumerate(replicas):
                by_replica[name][r].append(measured[name])
            by_task[name].append(
                {split: float(np.mean([m[name][split] for m in replicas])) for split in ("target", "holdout")}
            )
        log(f"LDS subset {j + 1}/{cfg.subsets}: target loss {by_task[task.name][-1]['target']:.4f}")
    losses = by_task[task.name]
    pred = subset_predictions(scores, subsets)
    target_losses = np.array([r["target"] for r in losses])
    record = {
        "task": task.name,
        **lds_summary(pred, target_losses, np.array([r["holdout"] for r in losses])),
        "lds_target_by_proxies": lds_by_ensemble_size(us, qs, subsets, target_losses),
        "predictions": pred.tolist(),
        "losses": losses,
        "losses_by_task": by_task,
        "task_specs": specs,
        "pool": str(pool.path),
        "features": str(features_dir),
        "config": vars(cfg),
    }
    if cfg.train_seeds > 1:
        record["losses_by_replica"] = by_replica
        record["replica_agreement"] = {
            name: {
                split: replica_agreement(np.array([[row[split] for row in rows] for rows in by_replica[name]]))
                for split in ("target", "holdout")
            }
            for name in evals
        }
        agree = record["replica_agreement"][task.name]["target"]
        log(f"replicas' agreement (Spearman of {cfg.train_seeds} seeds' subset losses, {task.name}): {agree:.3f}")
    if "source" in pool.meta_columns:
        sources, _ = pool.codes("source")  # int codes that sort like the labels: the same groups
        record["lds_target_by_source"] = lds_by_group(scores, sources, subsets, target_losses)
    log(f"LDS (Spearman, predicted helpfulness vs -target loss, {cfg.subsets} subsets): {record['lds_target']:.3f}")
    if cfg.sanity_fraction > 0:
        k = max(1, int(round(cfg.sanity_fraction * n)))
        arms = {
            "top_k": top_k(scores, k),
            "random": uniform_k(n, k, numpy_rng((cfg.seed, 20_000))),
            "bottom_k": bottom_k(scores, k),
        }
        sanity = {}
        for name, idx in arms.items():
            model_dir = out_dir / "models" / name
            sanity[name] = train_and_eval(pool, np.sort(idx), cfg, train_seed(cfg, 999), model_dir, evals, device)[
                task.name
            ]
            log(f"sanity {name} (k={k}): holdout loss {sanity[name]['holdout']:.4f}")
        h = {a: sanity[a]["holdout"] for a in arms}
        record["sanity"] = {
            "k": k,
            "losses": sanity,
            "top_beats_random": h["top_k"] < h["random"],
            "bottom_loses_to_random": h["bottom_k"] > h["random"],
        }
    record["wall_time_s"] = round(time.time() - started, 1)
    write_json(out_dir / "lds.json", record)
    return record


def read_lds_run(lds_dir) -> dict:
    """What a validate-lds run measured: {"subsets": S index arrays, "n": pool size, "record": lds.json, "tasks":
    {name: (task spec, target losses (S,), holdout losses (S,))}}, the scored task first. A run made before
    `eval_tasks` has only its scored task, with spec None (its lds.json did not record it)."""
    from dsdm.io import read_json

    lds_dir = Path(lds_dir)
    if not (lds_dir / "lds.json").exists():
        raise FileNotFoundError(f"{lds_dir}/lds.json not found: run `dsdm validate-lds --out {lds_dir}` first")
    rec = read_json(lds_dir / "lds.json")
    by_task = rec.get("losses_by_task") or {rec.get("task", "target"): rec["losses"]}
    specs = rec.get("task_specs") or {}
    tasks = {
        name: (specs.get(name), np.array([r["target"] for r in rows]), np.array([r["holdout"] for r in rows]))
        for name, rows in by_task.items()
    }
    return {
        "subsets": [np.load(lds_dir / "subsets" / f"subset_{j}.npy") for j in range(len(rec["losses"]))],
        "n": len(np.load(lds_dir / "scores.npy", mmap_mode="r")),
        "record": rec,
        "tasks": tasks,
    }


def rescore(lds_dir, score_files: list) -> list[dict]:
    """LDS of other score vectors, each (N,) with larger = more helpful, on the subsets and losses that an earlier
    `validate-lds` measured: no training. Any selection method's scores of the same pool (another projection, k,
    ridge, DSIR's log-ratios ...) are compared on the same models. Returns one row per file."""
    run = read_lds_run(lds_dir)
    subsets, n = run["subsets"], run["n"]
    _, target, holdout = next(iter(run["tasks"].values()))  # the scored task
    rows = []
    for f in score_files:
        scores = np.load(f, mmap_mode="r")
        if scores.shape != (n,):
            raise ValueError(
                f"{f}: scores of shape {scores.shape}, but {lds_dir} was measured on a pool of {n} "
                "examples; pass one (N,) score vector of that pool per file"
            )
        scores = np.asarray(scores, dtype=np.float64)
        if not np.isfinite(scores).all():
            raise ValueError(f"{f}: {int((~np.isfinite(scores)).sum())} non-finite scores")
        rows.append({"scores": str(f), **lds_summary(subset_predictions(scores, subsets), target, holdout)})
    return rows
