"""Random: k pool examples uniformly without replacement, seeded (docs/method.md §4; the released code's
`rng.choice(N, k, replace=False)`, unseeded there).

On the shared score contract: every example gets an i.i.d. Uniform[0, 1) score from the seeded generator and the k
largest are kept. Every k-subset is then equally likely, exactly as with rng.choice; the score vector is written like
any other method's, so the runner treats all methods alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsdm.select import top_k


@dataclass
class Random:
    """Uniform selection; `score` draws i.i.d. uniforms from the generator given to fit (or `seed`)."""

    seed: int | None = None
    """Seed of the score draw when used on its own; the CLI/driver passes its own seeded generator instead."""

    input = "none"  # scores need no text or tokens, only how many examples there are
    targeted = False
    estimator_scores = False
    seed_dependent_scores = True  # each seed draws its own scores: the selection stage draws them
    reference = True  # random data at 1x, 2x, 4x... compute is the curve every method is read against
    scores_file = "scores.npy"

    def requires(self) -> dict[str, str]:
        return {}

    def fit(self, target_texts=None, pool_sample=None, rng: np.random.Generator | None = None) -> "Random":
        if rng is None and self.seed is None:  # np.random.default_rng(None) would draw from OS entropy: unrepeatable
            raise ValueError("random: no seed; set method option seed (e.g. --set seed=0) or pass a seeded rng")
        self.rng_ = rng if rng is not None else np.random.default_rng(self.seed)
        return self

    def score(self, items) -> np.ndarray:
        """(len(items),) float64 uniforms; `items` may be a sequence or a count."""
        if not hasattr(self, "rng_"):
            self.fit()
        n = items if isinstance(items, (int, np.integer)) else len(items)
        return self.rng_.random(int(n))

    def select(self, scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        return top_k(scores, k)
