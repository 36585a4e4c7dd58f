"""DsDm and its inverse control as registry entries: read a score file written by the estimator (`dsdm score`), an
(N,) float32 .npy with larger = more helpful (dsdm/select.py states the convention), then top-k (DsDm, the paper's
rule) or bottom-k (the paper's "least preferred examples" control). Nothing is fitted here; the estimator did it.

Two other rules (docs/estimator.md, round 3): `rule: tempered` samples k without replacement with p ∝ exp(z / T) of
the standardized scores (DATE-LM's Gumbel-temperature selection), `rule: balanced` keeps the top of each group of
the pool metadata column `balance_by` (e.g. source) in proportion to the group's share of the pool. The inverse
control applies the same rule to the negated scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsdm.select import SELECTION_RULES, select_by_rule


@dataclass
class DsdmScores:
    """Top-k of a DsDm score file (inverse=False) or bottom-k (inverse=True)."""

    scores: str = ""
    """Path of the (N,) .npy DsDm score vector written by `dsdm score` (larger = more helpful)."""
    inverse: bool = False
    """True: keep the k LOWEST scores (the inverse control)."""
    rule: str = "top_k"
    """top_k (the paper's rule) | tempered (sample ∝ exp(z / temperature)) | balanced (top-k per balance_by group)."""
    temperature: float = 0.5
    """rule=tempered: the temperature in units of the scores' standard deviation (-> 0: top-k; -> inf: uniform)."""
    balance_by: str = "source"
    """rule=balanced: the pool metadata column whose groups keep their share of the pool."""

    input = "none"
    targeted = True  # the target was fixed when the scores were computed
    estimator_scores = True
    seed_dependent_scores = False
    reference = False
    scores_file = "scores.npy"

    def __post_init__(self):
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"dsdm.rule must be one of {', '.join(SELECTION_RULES)}; got {self.rule!r}")
        if not self.temperature > 0:
            raise ValueError(f"dsdm.temperature must be > 0, got {self.temperature}")
        if not self.scores:
            raise ValueError(
                "dsdm baselines need a score file: pass --set scores=RUN/scores/<target>.npy (written by `dsdm score`)"
            )

    def requires(self) -> dict[str, str]:
        return {}

    @property
    def group_column(self) -> str:
        """The pool metadata column select() needs (bound by fit(pool=...)); "" when the rule needs none."""
        return self.balance_by if self.rule == "balanced" else ""

    def fit(self, target_texts=None, pool_sample=None, rng=None, pool=None) -> "DsdmScores":
        if self.group_column:
            if pool is None:
                raise ValueError("dsdm rule=balanced needs the pool: fit(pool=...) binds its group column")
            if self.group_column not in pool.meta_columns:
                raise ValueError(f"dsdm.balance_by={self.group_column!r} is not a column of {pool.path}/meta.parquet")
            self.groups_, _ = pool.codes(self.group_column)  # codes sort like the labels: the same quotas
        path = Path(self.scores)
        if not path.exists():
            raise FileNotFoundError(f"DsDm score file not found: {path}; compute it with `dsdm score`")
        s = np.load(path, mmap_mode="r")
        if s.ndim != 1:
            raise ValueError(f"{path}: a score file holds one value per pool example, shape (N,); got {s.shape}")
        self.scores_ = np.asarray(s, dtype=np.float64)
        return self

    def score(self, items) -> np.ndarray:
        """The stored scores; `items` is the pool size (checked against the file)."""
        n = items if isinstance(items, (int, np.integer)) else len(items)
        if self.scores_.shape[0] != n:
            raise ValueError(
                f"{self.scores}: {self.scores_.shape[0]} scores but the pool has {n} examples; "
                "the score file belongs to another pool"
            )
        return self.scores_

    def select(self, scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        scores = -np.asarray(scores, dtype=np.float64) if self.inverse else scores  # bottom-k = top-k of -s
        if self.group_column and not hasattr(self, "groups_"):
            raise ValueError("dsdm rule=balanced: call fit(pool=...) before select to bind the group column")
        return select_by_rule(
            scores, k, self.rule, rng=rng, temperature=self.temperature, groups=getattr(self, "groups_", None)
        )


@dataclass
class DsdmInverse(DsdmScores):
    """Bottom-k of a DsDm score file: the paper's inverse control."""

    inverse: bool = True
