"""The baselines of DsDm's comparison (docs/method.md §4) and the DsDm score files, behind one selection contract.

BASELINES maps a method name to a class that stores its hyper-parameters (a dataclass: typed, documented, validated),
learns in `fit(target, pool_sample)` (trailing-underscore attributes, returns self) and then either
    score(items) -> (n,) float, larger = keep     random, dsir, classifier, dsdm, dsdm-inverse
or, for the untargeted de-duplication,
    embed(texts) + dedup(embeddings) -> (N,) bool keep mask     semdedup
and finally `select(scores_or_keep, k, rng)`, which goes through dsdm.select (top_k, bottom_k, gumbel_top_k,
uniform_k). A new baseline is one file and one line here.

`run(...)` is the one place that touches disk: it streams the pool in chunks (decoded text or token ids, as the
method asks), writes `scores.npy` (N,) float32 (or `keep.npy` (N,) bool for semdedup), `indices.npy` (k,) int64
sorted ascending, and `selection.json`, then `_done.json`.

Seeds: one --seed drives three independent numpy streams, (seed, 0) for the pool sample a method is fitted on,
(seed, 1) for the random baseline's scores and (seed, 2) for the selection draw (Gumbel noise, Pareto draws,
uniform draws from the SemDeDup kept set).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from dsdm.baselines.classifier import Classifier
from dsdm.baselines.dsdm_scores import DsdmInverse, DsdmScores
from dsdm.baselines.dsir import DSIR
from dsdm.baselines.random import Random
from dsdm.baselines.semdedup import SemDeDup

BASELINES: dict[str, type] = {
    "random": Random,
    "dsir": DSIR,
    "classifier": Classifier,
    "semdedup": SemDeDup,
    "dsdm": DsdmScores,
    "dsdm-inverse": DsdmInverse,
}

SELECTION_FORMAT = "dsdm-selection/1"
CHUNK = 2048  # pool examples decoded / scored at a time


def make(method: str, params: dict[str, Any] | None = None):
    """A baseline by name from plain settings; unknown methods or keys raise ValueError naming them."""
    from dsdm.config import from_dict

    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}")
    return from_dict(BASELINES[method], params or {}, prefix=f"{method}.")


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


def _chunks(n: int, size: int = CHUNK):
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n), dtype=np.int64)


def fit_and_score(est, pool, targets: list[str], seed: int) -> tuple[np.ndarray, dict]:
    """Fit `est` and score every pool example. -> ((N,) scores or keep mask, info for selection.json)."""
    from dsdm.common import numpy_rng, progress

    n, kind, info = len(pool), est.input, {}
    if est.targeted and kind != "none" and not targets:
        raise ValueError(f"{type(est).__name__} is targeted: pass at least one --target TASK")
    if isinstance(est, Random):
        est.fit(rng=numpy_rng((seed, 1)))
        return est.score(n), info
    if kind == "none":  # dsdm score files
        est.fit()
        return est.score(n), info
    sample_size = est.num_negatives(len(targets), n) if isinstance(est, Classifier) else min(n, est.fit_sample)
    sample = np.sort(numpy_rng((seed, 0)).choice(n, size=sample_size, replace=False))
    fit_target = encode_texts(pool, targets) if kind == "tokens" else targets
    est.fit(fit_target, read_items(pool, sample, kind))
    info.update(fit_sample=int(sample_size), num_targets=len(targets))
    bar = progress(total=n, desc=f"{type(est).__name__.lower()} over pool", unit="ex")
    out = []
    for idx in _chunks(n):
        items = read_items(pool, idx, kind)
        out.append(est.embed(items) if isinstance(est, SemDeDup) else est.score(items))
        bar.update(idx.shape[0])
    bar.close()
    if isinstance(est, SemDeDup):
        keep = est.dedup(np.concatenate(out) if out else np.zeros((0, 1), np.float32))
        info.update(
            eps=float(est.eps_),
            kept=int(keep.sum()),
            kept_fraction=est.kept_fraction_,
            n_clusters=int(est.centroids_.shape[0]),
        )
        return keep, info
    return np.concatenate(out) if out else np.zeros(0), info


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
) -> dict:
    """Run one baseline on a pool and write scores.npy|keep.npy, indices.npy, selection.json, _done.json.

    Returns the selection.json record. Re-running with the same settings does nothing (returns the stored record).
    """
    from dsdm.common import log, numpy_rng
    from dsdm.config import to_dict
    from dsdm.io import clear_done, is_done, mark_done, read_json, save_npy, write_json
    from dsdm.pool import Pool
    from dsdm.tasks import load_task

    out_dir, started = Path(out_dir), time.time()
    pool = Pool(pool_dir)
    params = dict(params or {})
    if method in BASELINES and "seed" in BASELINES[method].__dataclass_fields__:
        params.setdefault("seed", int(seed))  # k-means / SVD seeds follow --seed unless set explicitly
    est = make(method, params)
    if not est.targeted:
        target_specs = []  # untargeted: --target plays no part (for dsdm it only labels the score file's target)
    tasks = [load_task(s) for s in target_specs]
    if k < 0 or k > len(pool):
        raise ValueError(f"--k {k} must be between 0 and the pool size {len(pool)}")
    stage_cfg = {
        "method": method,
        "k": int(k),
        "seed": int(seed),
        "targets": [str(s) for s in target_specs],
        "params": to_dict(est),
        "pool_fingerprint": pool.fingerprint,
    }
    if is_done(out_dir, stage_cfg, force=force):
        log(f"{out_dir} is up to date ({method}, k={k}); pass --force to redo")
        return read_json(out_dir / "selection.json")
    clear_done(out_dir)
    log(f"{method}: pool {pool.path} ({len(pool)} examples), k={k}, seed={seed}, targets={[t.name for t in tasks]}")
    scores, info = fit_and_score(est, pool, target_texts(tasks), seed)
    chosen = est.select(scores, k, numpy_rng((seed, 2)))
    indices = np.sort(chosen).astype(np.int64)
    assert indices.shape == (k,) and np.unique(indices).shape[0] == k, "a selection must be k distinct indices"
    if isinstance(est, SemDeDup):
        save_npy(out_dir / "keep.npy", np.asarray(scores, dtype=bool))
        score_file = "keep.npy"
    else:
        save_npy(out_dir / "scores.npy", np.asarray(scores, dtype=np.float32))
        score_file = "scores.npy"
    save_npy(out_dir / "indices.npy", indices)
    record = {
        "format": SELECTION_FORMAT,
        "method": method,
        "k": int(k),
        "seed": int(seed),
        "target": [t.name for t in tasks],
        "target_specs": [str(s) for s in target_specs],
        "config": to_dict(est),
        "pool": {"path": str(pool.path), "fingerprint": pool.fingerprint, "num_examples": len(pool)},
        "rule": RULES[method](est),
        "sign": "larger score = keep",
        "scores_file": score_file,
        "indices_file": "indices.npy",
        "indices_order": "ascending pool index",
        **info,
        "wall_time_s": round(time.time() - started, 3),
    }
    write_json(out_dir / "selection.json", record)
    mark_done(out_dir, stage_cfg, started=started)
    log(f"{method}: wrote {k} indices to {out_dir / 'indices.npy'}")
    return record


RULES = {
    "random": lambda est: "top-k of i.i.d. uniform scores (uniform without replacement)",
    "dsir": lambda est: "top-k of log w" if est.top_k else "Gumbel top-k of log w (sampling without replacement ∝ w)",
    "classifier": lambda est: (
        f"top-k of p + Pareto(alpha={est.pareto_alpha}) draws" if est.pareto_alpha else "top-k of the log-odds"
    ),
    "semdedup": lambda est: "uniform k from the kept set",
    "dsdm": lambda est: "top-k of the DsDm score",
    "dsdm-inverse": lambda est: "bottom-k of the DsDm score (inverse control)",
}
