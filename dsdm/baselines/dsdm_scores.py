"""DsDm and its inverse control as registry entries: read a score file written by the estimator (`dsdm score`), an
(N,) float32 .npy with larger = more helpful (dsdm/select.py states the convention), then top-k (DsDm, the paper's
rule) or bottom-k (the paper's "least preferred examples" control). Nothing is fitted here; the estimator did it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsdm.select import bottom_k, top_k


@dataclass
class DsdmScores:
    """Top-k of a DsDm score file (inverse=False) or bottom-k (inverse=True)."""

    scores: str = ""
    """Path of the (N,) .npy DsDm score vector written by `dsdm score` (larger = more helpful)."""
    inverse: bool = False
    """True: keep the k LOWEST scores (the inverse control)."""

    input = "none"
    targeted = True  # the target was fixed when the scores were computed
    estimator_scores = True
    seed_dependent_scores = False
    reference = False
    scores_file = "scores.npy"

    def __post_init__(self):
        if not self.scores:
            raise ValueError(
                "dsdm baselines need a score file: pass --set scores=RUN/scores/<target>.npy (written by `dsdm score`)"
            )

    def requires(self) -> dict[str, str]:
        return {}

    def fit(self, target_texts=None, pool_sample=None, rng=None) -> "DsdmScores":
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
        return bottom_k(scores, k) if self.inverse else top_k(scores, k)


@dataclass
class DsdmInverse(DsdmScores):
    """Bottom-k of a DsDm score file: the paper's inverse control."""

    inverse: bool = True
