"""The selection methods (docs/method.md §4) behind one contract, and the registry every driver iterates over.

METHODS maps a method name to a class that stores its hyper-parameters (a dataclass: typed, documented, validated),
learns in `fit(target, pool_sample)` (trailing-underscore attributes, returns self), turns pool items into per-chunk
outputs with `transform(items)` and reduces them with `finish(parts) -> ((N,) scores or keep mask, info)`, and picks
k with `select(scores_or_keep, k, rng)`, which goes through dsdm.select (top_k, bottom_k, gumbel_top_k, uniform_k).
What drivers need to know about a method is declared on its class, never tested by name:

    targeted               needs target texts (dsir, classifier, dsdm)
    input                  what `transform` reads: "text", "tokens", or "none" (scores need only the pool size)
    estimator_scores       the scores come from the DsDm estimator (`dsdm score`), read from a file
    seed_dependent_scores  the scores themselves are drawn per seed (random): never shared across seeds
    reference              the method whose models at 1x, 2x, 4x... compute make the compute curve (random)
    scores_file            file name of the stored vector: scores.npy, or keep.npy for a keep mask
    requires()             {importable module: dsdm extra} for the settings chosen, checked before any work
    max_k(n)               (optional) the largest k it can select from n examples, checked before any work
    score_pool(...)        (optional) runs the whole pool pass itself instead of transform + finish (SemDeDup)

A new method is one file and one line in METHODS.

`run(...)` (`dsdm baseline`) is the one place here that touches disk: it streams the pool in chunks, writes the score
vector and the selection through dsdm.selections (the one selection writer), then the stage record.

Scale-out (ExecutorConfig, docs/baselines.md "Scale out"): the fit always runs here (it reads a sample); with
executor=ray the fitted estimator and the pool's path (never the Pool: its memmaps would pickle every token) go to Ray
actors, each transforming whole chunks, and the parts come back in row order to `finish` here: the chunks and the
function applied to each are the local ones, so the scores are bitwise the local scores. DSIR and the classifier
scale out this way. A method with `score_pool(pool, chunks, where, scratch_dir)` runs its whole pool pass itself
instead (SemDeDup: embeddings streamed into an on-disk store under scratch_dir, never concatenated in RAM; on Ray,
actors embed the chunks and tasks de-duplicate the clusters).

Seeds: one --seed drives three independent numpy streams, (seed, 0) for the pool sample a method is fitted on,
(seed, 1) for the random baseline's scores and (seed, 2) for the selection draw (Gumbel noise, Pareto draws,
uniform draws from the SemDeDup kept set).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsdm import selections
from dsdm.baselines.classifier import Classifier
from dsdm.baselines.dsdm_scores import DsdmInverse, DsdmScores
from dsdm.baselines.dsir import DSIR
from dsdm.baselines.random import Random
from dsdm.baselines.semdedup import SemDeDup
from dsdm.common import check_requirements, log, numpy_rng, progress
from dsdm.config import from_dict, to_dict
from dsdm.io import clear_done, is_done, mark_done, read_json, save_npy, sha256_file
from dsdm.pool import Pool
from dsdm.shards import plan_shards, ray_init, run_on_actors
from dsdm.tasks import load_task

METHODS: dict[str, type] = {
    "random": Random,
    "dsir": DSIR,
    "classifier": Classifier,
    "semdedup": SemDeDup,
    "dsdm": DsdmScores,
    "dsdm-inverse": DsdmInverse,
}
BASELINES = METHODS  # the name `dsdm baseline` and older code use

CHUNK = 2048  # pool examples decoded / scored at a time
RAY_METHODS = (DSIR, Classifier)  # whose chunks run on Ray with executor=ray (SemDeDup: its own score_pool)


@dataclass
class ExecutorConfig:
    """Where a baseline's pool pass runs: how, never what (no part of a stage's key: the scores are bitwise the same
    under every setting here, tests/test_ray.py)."""

    executor: str = "local"
    """local (one process, progress in examples/s) | ray (a pool of Ray actors, each opening the pool from its path
    once and transforming the chunks it is handed with the fitted estimator: bitwise the same scores). DSIR and the
    classifier, and SemDeDup (actors embed the chunks, tasks de-duplicate the clusters); random and dsdm read
    no pool items."""
    ray_address: str | None = None
    """executor=ray: None starts a local Ray cluster; 'auto' joins the cluster this machine is in (`ray start`);
    'ray://HOST:PORT' a remote head."""
    ray_worker_cpus: float = 1
    """executor=ray: CPUs per actor (one actor per that many CPUs of the cluster)."""
    chunk_size: int = CHUNK
    """Pool examples decoded and scored per transform call: the unit of work handed to a Ray actor."""

    def __post_init__(self):
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be local or ray, got {self.executor!r}")
        if self.ray_worker_cpus <= 0:
            raise ValueError(f"ray_worker_cpus must be positive, got {self.ray_worker_cpus}")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")


def make(method: str, params: dict[str, Any] | None = None):
    """A baseline by name from plain settings; unknown methods or keys raise ValueError naming them."""

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return from_dict(METHODS[method], params or {}, prefix=f"{method}.")


def score_stage_name(method: str, target: str) -> str:
    """The run-directory stage that holds a method's score vector for `target`: scores/<method>_<target>, or, for
    the methods that read the DsDm estimator's scores, the one stage scores/dsdm that scores every target in one
    pass over the feature store (dsdm-inverse reads dsdm's)."""
    return "scores/dsdm" if METHODS[method].estimator_scores else f"scores/{method}_{target}"


def score_file_name(method: str, target: str) -> str:
    """The score file of (method, target) inside its stage folder, relative to the run directory."""
    cls = METHODS[method]
    name = f"{target}.npy" if cls.estimator_scores else cls.scores_file
    return f"{score_stage_name(method, target)}/{name}"


def target_texts(tasks) -> list[str]:
    """context + continuation of every target example of every task (each example weighs the same)."""
    return [ex.context + ex.continuation for task in tasks for ex in task.target]


def read_items(pool, indices: np.ndarray, kind: str) -> list:
    """Pool examples `indices` as decoded strings (kind='text') or 1-D token arrays (kind='tokens')."""
    rows = [np.asarray(pool[int(i)]) for i in indices]
    if kind == "tokens":
        return rows
    return pool.tokenizer.decode_batch([r.tolist() for r in rows], skip_special_tokens=False)


def encode_texts(pool, texts: list[str]) -> list[np.ndarray]:
    """Target texts -> token id arrays with the pool's own tokenizer (token-mode baselines)."""
    return [np.asarray(e.ids, dtype=np.int64) for e in pool.tokenizer.encode_batch(texts, add_special_tokens=False)]


def fit_and_score(
    est, pool, targets: list[str], seed: int, where: ExecutorConfig | None = None, scratch_dir: Path | None = None
) -> tuple[np.ndarray, dict]:
    """Fit `est` and score every pool example. -> ((N,) scores or keep mask, info for selection.json).

    `where` (default: local) says where the chunks are transformed; the fit and `finish` always run here.
    `scratch_dir`: where a method that streams its pool pass to disk (score_pool) keeps its temporary store (None:
    the system's temporary folder); the caller's stage folder, so that Ray workers on other machines see it."""

    n, kind = len(pool), est.input
    if est.targeted and kind != "none" and not targets:
        raise ValueError(f"{type(est).__name__} is targeted: pass at least one --target TASK")
    if kind == "none":  # random draws its scores from the stream; a DsDm score file is read
        # a rule that reads a pool metadata column (DsDm's balanced top-k) binds it here
        est.fit(rng=numpy_rng((seed, 1)), **({"pool": pool} if getattr(est, "group_column", "") else {}))
        return est.score(n), {}
    sample_size = est.sample_size(len(targets), n)
    sample = np.sort(numpy_rng((seed, 0)).choice(n, size=sample_size, replace=False))
    fit_target = encode_texts(pool, targets) if kind == "tokens" else targets
    est.fit(fit_target, read_items(pool, sample, kind))
    where = where or ExecutorConfig()
    chunks = plan_shards(n, where.chunk_size)
    if hasattr(est, "score_pool"):  # the method streams its pool pass through disk itself (SemDeDup)
        scores, info = est.score_pool(pool, chunks, where, scratch_dir)
        return scores, {"fit_sample": int(sample_size), "num_targets": len(targets), **info}
    if where.executor == "ray" and isinstance(est, RAY_METHODS):
        parts = _transform_on_ray(est, pool, chunks, where)
    else:
        if where.executor == "ray":
            log(f"{type(est).__name__}: its pool pass is not sharded on Ray yet; running it in this process")
        parts = []
        with progress(total=n, desc=f"{type(est).__name__.lower()} over pool", unit="ex") as bar:
            for start, stop in chunks:
                parts.append(est.transform(read_items(pool, np.arange(start, stop, dtype=np.int64), kind)))
                bar.update(stop - start)
    scores, info = est.finish(parts)
    return scores, {"fit_sample": int(sample_size), "num_targets": len(targets), **info}


def _transform_on_ray(est, pool, chunks: list[tuple[int, int]], where: ExecutorConfig) -> list:
    """est.transform of every chunk on Ray actors, in chunk order. The fitted estimator is put in the object store
    once (every actor reads that copy); the pool travels as its path."""
    ray = ray_init(where.ray_address)
    try:
        est_ref = ray.put(est)
    except TypeError as e:  # e.g. a fastText model: a C++ object that does not pickle
        why = str(e.__cause__ or e).splitlines()[0]  # Ray's own message repeats the whole estimator
        raise ValueError(
            f"{type(est).__name__}: the fitted estimator cannot be sent to Ray workers ({why}); "
            "use executor=local for it"
        ) from None
    worker = dict(est=est_ref, pool_dir=str(Path(pool.path).resolve()), kind=est.input)
    name = type(est).__name__.lower()
    return run_on_actors(
        ChunkWorker, worker, chunks, ray_address=where.ray_address, num_cpus=where.ray_worker_cpus, desc=name
    )


class ChunkWorker:
    """A Ray actor of fit_and_score: opens the pool from its path once and returns est.transform of each chunk
    [start, stop) it is handed (the same call on the same items as the local loop)."""

    def __init__(self, est, pool_dir: str, kind: str):
        self.est, self.pool, self.kind = est, Pool(pool_dir), kind

    def run(self, start: int, stop: int):
        return self.est.transform(read_items(self.pool, np.arange(start, stop, dtype=np.int64), self.kind))


# -----------------------------------------------------------------------------
# IO: the only part of this package that touches disk


def run(
    method: str,
    pool_dir: str | Path,
    k: int,
    out_dir: str | Path,
    target_specs: list[str] = (),
    seed: int = 0,
    params: dict[str, Any] | None = None,
    force: bool = False,
    where: ExecutorConfig | None = None,
) -> dict:
    """Run one method on a pool and write scores.npy|keep.npy, indices.npy, selection.json, _done.json.

    Returns the selection.json record. Re-running with the same settings does nothing (returns the stored record);
    `where` (local or Ray) is not a setting of the result.
    """

    out_dir, started = Path(out_dir), time.time()
    pool = Pool(pool_dir)
    params = dict(params or {})
    if method in METHODS and "seed" in METHODS[method].__dataclass_fields__:
        params.setdefault("seed", int(seed))  # k-means / SVD seeds follow --seed unless set explicitly
    est = make(method, params)
    check_requirements(est.requires(), f"dsdm baseline {method}")
    if not est.targeted:
        target_specs = []  # untargeted: --target plays no part (for dsdm it only labels the score file's target)
    tasks = [load_task(s) for s in target_specs]
    if not 1 <= k <= len(pool):
        raise ValueError(f"--k {k}: must be between 1 and the pool size {len(pool)}")
    stage_cfg = {
        "method": method,
        "k": int(k),
        "seed": int(seed),
        "targets": [str(s) for s in target_specs],
        "params": to_dict(est),
        "pool_fingerprint": pool.fingerprint,
    }
    if getattr(est, "estimator_scores", False) and Path(est.scores).is_file():
        # the score file's content, not only its path: re-scoring into the same path must not keep the old selection
        stage_cfg["scores_sha256"] = sha256_file(est.scores)
    if is_done(out_dir, stage_cfg, force=force):
        log(f"{out_dir} is up to date ({method}, k={k}); pass --force to redo")
        return read_json(out_dir / "selection.json")
    clear_done(out_dir)
    log(f"{method}: pool {pool.path} ({len(pool)} examples), k={k}, seed={seed}, targets={[t.name for t in tasks]}")
    scores, info = fit_and_score(est, pool, target_texts(tasks), seed, where, scratch_dir=out_dir)
    indices = np.sort(np.asarray(est.select(scores, k, numpy_rng((seed, 2))), dtype=np.int64))
    save_npy(out_dir / est.scores_file, np.asarray(scores, dtype=bool if est.scores_file == "keep.npy" else np.float32))
    record = selections.write(
        out_dir,
        indices,
        pool=pool,
        method=method,
        rule=RULES[method](est),
        seed=seed,
        target=[t.name for t in tasks],
        target_specs=target_specs,
        config=to_dict(est),
        scores_file=est.scores_file,
        **info,
    )
    mark_done(out_dir, stage_cfg, started=started)
    log(f"{method}: wrote {k} indices to {out_dir / 'indices.npy'}")
    return record


def _dsdm_rule(est, end: str) -> str:
    """selection.json's rule of a DsDm registry entry (dsdm/baselines/dsdm_scores.py)."""
    sign = "" if end == "top" else "minus "
    if est.rule == "tempered":
        return f"Gumbel sampling ∝ exp(z / {est.temperature:g}) of the standardized {sign}DsDm score"
    if est.rule == "balanced":
        return f"{end}-k of the DsDm score within each {est.balance_by}, quotas ∝ the pool's composition"
    return f"{end}-k of the DsDm score"


RULES = {
    "random": lambda est: "top-k of i.i.d. uniform scores (uniform without replacement)",
    "dsir": lambda est: "top-k of log w" if est.top_k else "Gumbel top-k of log w (sampling without replacement ∝ w)",
    "classifier": lambda est: (
        f"top-k of p + Pareto(alpha={est.pareto_alpha}) draws" if est.pareto_alpha else "top-k of the log-odds"
    ),
    "semdedup": lambda est: "uniform k from the kept set",
    "dsdm": lambda est: _dsdm_rule(est, "top"),
    "dsdm-inverse": lambda est: _dsdm_rule(est, "bottom") + " (inverse control)",
}
