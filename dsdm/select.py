"""The one selection step that every method goes through: one score per pool example -> int64 indices.

SIGN CONVENTION (docs/method.md §2.3), stated once for the whole package: a score is LARGER when the pool example is
predicted to help the target MORE, and every method keeps the k LARGEST scores. For DsDm the score is the
target-averaged TRAK effect of including the example on the target *margin* (higher margin = lower loss), i.e. minus
the paper's loss-datamodel weight θ̄ up to a positive factor, so top_k(score) is the paper's bottom-k(θ̄)
(Engstrom et al. 2024, Eq. 3) and the released `dsdm_select`, which keeps the largest stored values.
The inverse control (the paper's "least preferred" examples) is bottom_k = top_k of the negated scores.

Pure functions, no disk: writing the index array is the caller's job.
"""

from __future__ import annotations

import numpy as np


def _check(scores: np.ndarray, k: int) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one value per pool example, shape (N,); got {scores.shape}")
    if not 0 <= k <= scores.shape[0]:
        raise ValueError(f"k={k} must be between 0 and the pool size {scores.shape[0]}")
    n_nan = int(np.isnan(scores).sum()) if np.issubdtype(scores.dtype, np.floating) else 0
    if n_nan:
        raise ValueError(f"{n_nan} scores are NaN; a score vector must be finite or ±inf")
    return scores


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first; ties broken by lower index. scores: (N,) -> (k,) int64.

    O(N) partition then O(k log k) sort; deterministic whatever the partition order.
    """
    scores = _check(scores, k)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    threshold = scores[part].min()
    above = np.flatnonzero(scores > threshold)
    ties = np.flatnonzero(scores == threshold)[: k - above.size]  # lowest indices win ties at the boundary
    idx = np.concatenate([above, ties])
    order = np.lexsort((idx, -scores[idx]))  # primary: score descending; secondary: index ascending
    return idx[order].astype(np.int64)


def bottom_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest scores, worst first (the paper's inverse control); ties by lower index."""
    return top_k(-np.asarray(scores, dtype=np.float64), k)


def gumbel_top_k(log_weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k indices sampled without replacement with P(i) ∝ exp(log_weights[i]) (Gumbel top-k trick). (N,) -> (k,).

    Order: by perturbed key, best first. Entries with log weight -inf are never drawn; asking for more than the
    finite entries is an error.
    """
    log_weights = _check(np.asarray(log_weights, dtype=np.float64), k)
    finite = int(np.isfinite(log_weights).sum())
    if k > finite:
        raise ValueError(f"k={k} exceeds the {finite} examples with a finite log weight")
    keys = log_weights + rng.gumbel(size=log_weights.shape[0])
    return top_k(keys, k)


def tempered_k(scores: np.ndarray, k: int, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """k indices sampled without replacement with P(i) ∝ exp(z_i / temperature), z = the scores standardized (mean 0,
    s.d. 1), so the temperature is in units of the scores' spread whatever their scale: -> 0 is top_k, -> inf is
    uniform. The Gumbel-temperature selection DATE-LM uses instead of top-k (docs/estimator.md). (N,) -> (k,)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scores = _check(np.asarray(scores, dtype=np.float64), k)
    spread = scores.std()
    z = (scores - scores.mean()) / (spread if spread > 0 else 1.0)
    return gumbel_top_k(z / temperature, k, rng)


def balanced_top_k(scores: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """Top-k inside each group, with each group's quota proportional to its share of the pool (largest remainder;
    equal remainders go to the group that sorts first): a selection that keeps the pool's composition, so a score
    that favours one source cannot pile the whole budget onto it (Quad and Group-MATES balance clusters the same
    way). scores (N,), groups (N,) labels -> (k,) int64, best score first, ties by lower index."""
    scores = _check(scores, k)
    groups = np.asarray(groups)
    if groups.shape != scores.shape:
        raise ValueError(f"groups must have one label per score, shape {scores.shape}; got {groups.shape}")
    labels, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse, minlength=labels.size)
    exact = sizes * (k / scores.shape[0])
    quota = np.floor(exact).astype(np.int64)
    extra = k - int(quota.sum())
    order = np.lexsort((np.arange(labels.size), -(exact - quota)))  # largest remainder first, then group order
    quota[order[:extra]] += 1
    kept = []
    for g in range(labels.size):
        members = np.flatnonzero(inverse == g)
        kept.append(members[top_k(scores[members], int(quota[g]))])
    idx = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return idx[np.lexsort((idx, -scores[idx]))].astype(np.int64)


SELECTION_RULES = ("top_k", "tempered", "balanced")
"""The rules a score vector can be selected by (DsDm's `rule` option, lds-sweep's `select:`)."""


def select_by_rule(
    scores: np.ndarray,
    k: int,
    rule: str = "top_k",
    *,
    rng: np.random.Generator | None = None,
    temperature: float = 0.5,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """top_k, tempered_k(temperature, rng) or balanced_top_k(groups) of (N,) scores -> (k,) indices."""
    if rule == "tempered":
        return tempered_k(scores, k, temperature, rng)
    if rule == "balanced":
        if groups is None:
            raise ValueError("rule=balanced needs the group of every example (e.g. the pool's source column)")
        return balanced_top_k(scores, groups, k)
    if rule != "top_k":
        raise ValueError(f"selection rule must be one of {', '.join(SELECTION_RULES)}; got {rule!r}")
    return top_k(scores, k)


def uniform_k(candidates: np.ndarray | int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct indices drawn uniformly from `candidates` (an index array, a bool keep mask, or N for range(N))."""
    if isinstance(candidates, (int, np.integer)):
        pool = np.arange(int(candidates), dtype=np.int64)
    else:
        candidates = np.asarray(candidates)
        pool = np.flatnonzero(candidates) if candidates.dtype == bool else candidates.astype(np.int64)
    if not 0 <= k <= pool.size:
        raise ValueError(f"k={k} must be between 0 and the {pool.size} candidates")
    return rng.choice(pool, size=k, replace=False).astype(np.int64)
