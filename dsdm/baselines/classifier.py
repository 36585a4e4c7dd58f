"""Classifier: a GPT-3-style binary "looks like the target" filter (docs/method.md §4; Brown et al. 2020, App. A).

Positives are the target texts, negatives a seeded sample of pool texts, features hashed word n-grams. The score of a
pool example is the classifier's log-odds of "target-like" (larger = keep). The released DsDm code selects the top-k
of the stored classifier score, deterministically, which is our default.

Back ends:
  backend="logreg"    scikit-learn LogisticRegression on HashingVectorizer unigrams + bigrams (2^20 features,
                      TF-IDF-free, l2-normalised counts), class_weight="balanced" so the few positives are not
                      drowned by the many negatives. GPT-3 used logistic regression on hashed n-grams.
  backend="fasttext"  fastText supervised (the DSIR repository's heuristic-classifier pipeline, and what secondary
                      summaries say DsDm used); needs the optional `fasttext-numpy2-wheel` package (extra `fasttext`).

Negatives: n_neg = min(pool size, max(neg_per_pos × positives, min_negatives)) (defaults 10 and 1,000).

Pareto option (GPT-3's filter, α = 9): GPT-3 keeps a document iff Pareto(α) > 1 − p, with p the predicted probability
of "high quality". We draw d_i ~ Pareto(α) (numpy's Lomax form, as GPT-3 and DSIR do), form the key p_i + d_i (kept iff
> 1) and take the top-k keys: when more than k pass GPT-3's rule the k with the largest margin are taken, when fewer
pass the selection is filled with the next largest keys. One seeded draw, one deterministic top-k.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from dsdm.select import top_k


def _vectorizer(n_features: int, ngram_max: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    # token_pattern as WordPunct-ish words; alternate_sign=False keeps counts non-negative; norm l2 per document
    return HashingVectorizer(
        n_features=n_features,
        ngram_range=(1, ngram_max),
        alternate_sign=False,
        lowercase=True,
        token_pattern=r"(?u)\b\w+\b",
        norm="l2",
        dtype=np.float32,
    )


def _fasttext_line(text: str) -> str:
    return " ".join(text.lower().split())  # fastText reads one example per line


@dataclass
class Classifier:
    """Target (positive) vs pool (negative) classifier on hashed n-grams; score = log-odds of "target-like"."""

    backend: str = "logreg"
    """'logreg' (scikit-learn, default) or 'fasttext' (optional extra `fasttext`)."""
    ngram_max: int = 2
    """Largest word n-gram: 2 = unigrams + bigrams."""
    n_features: int = 1 << 20
    """Hashing dimension of the logreg features (fastText uses its own `bucket` of 2,000,000)."""
    C: float = 1.0
    """Inverse L2 regularisation strength of the logistic regression."""
    neg_per_pos: int = 10
    """Negatives per positive (seeded pool sample)."""
    min_negatives: int = 1000
    """Lower bound on the number of negatives, for tiny target sets."""
    max_iter: int = 1000
    """Solver iterations (logreg) or epochs (fastText: max_iter is capped at 50 epochs)."""
    pareto_alpha: float = 0.0
    """0: deterministic top-k (released code). > 0: GPT-3's Pareto sampling with this α (GPT-3 and DSIR: 9)."""

    input = "text"
    targeted = True
    estimator_scores = False
    seed_dependent_scores = False
    reference = False
    scores_file = "scores.npy"

    def __post_init__(self):
        if self.backend not in ("logreg", "fasttext"):
            raise ValueError(f"classifier.backend must be 'logreg' or 'fasttext', got {self.backend!r}")
        if self.backend == "fasttext":
            try:
                import fasttext  # noqa: F401
            except ImportError:
                raise ValueError(
                    "classifier.backend=fasttext needs the fastText package: pip install 'dsdm[fasttext]' "
                    "(the plain `fasttext` wheels fail under numpy 2)"
                ) from None
        if self.ngram_max < 1 or self.n_features < 2 or self.C <= 0 or self.neg_per_pos < 1 or self.pareto_alpha < 0:
            raise ValueError("classifier: ngram_max >= 1, n_features >= 2, C > 0, neg_per_pos >= 1, pareto_alpha >= 0")

    def num_negatives(self, num_positives: int, pool_size: int) -> int:
        return min(pool_size, max(self.neg_per_pos * num_positives, self.min_negatives))

    def requires(self) -> dict[str, str]:
        return {"fasttext": "fasttext"} if self.backend == "fasttext" else {"sklearn": "baselines"}

    def sample_size(self, num_targets: int, pool_size: int) -> int:
        """The negatives are the fit sample."""
        return self.num_negatives(num_targets, pool_size)

    def transform(self, items) -> np.ndarray:
        return self.score(items)

    def finish(self, parts: list[np.ndarray]) -> tuple[np.ndarray, dict]:
        return (np.concatenate(parts) if parts else np.zeros(0)), {}

    # -- scikit-learn style contract -----------------------------------------------------------------------------

    def fit(self, target_texts: list[str], pool_sample: list[str]) -> "Classifier":
        """Positives = target_texts, negatives = pool_sample (the driver draws num_negatives of them, seeded)."""
        if not target_texts or not pool_sample:
            raise ValueError("classifier: needs at least one target text and one pool text")
        texts = list(target_texts) + list(pool_sample)
        y = np.concatenate([np.ones(len(target_texts)), np.zeros(len(pool_sample))]).astype(np.int64)
        if self.backend == "logreg":
            from sklearn.linear_model import LogisticRegression

            self.vectorizer_ = _vectorizer(self.n_features, self.ngram_max)
            X = self.vectorizer_.transform(texts)
            self.model_ = LogisticRegression(
                C=self.C, class_weight="balanced", max_iter=self.max_iter, solver="liblinear", random_state=0
            ).fit(X, y)
        else:
            self.model_ = self._fit_fasttext(texts, y)
        self.num_positives_, self.num_negatives_ = len(target_texts), len(pool_sample)
        return self

    def _fit_fasttext(self, texts: list[str], y: np.ndarray):
        import fasttext

        fd, path = tempfile.mkstemp(suffix=".txt", prefix="dsdm-fasttext-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for text, label in zip(texts, y):
                    f.write(f"__label__{int(label)} {_fasttext_line(text)}\n")
            # one thread: bit-for-bit reproducible for a given seed
            return fasttext.train_supervised(
                path, wordNgrams=self.ngram_max, epoch=min(self.max_iter, 50), thread=1, seed=0, verbose=0
            )
        finally:
            os.unlink(path)

    def score(self, texts: list[str]) -> np.ndarray:
        """Log-odds of "target-like" per text, (n,) float64."""
        if not hasattr(self, "model_"):
            raise ValueError("classifier: call fit(target_texts, pool_sample) before score(...)")
        if self.backend == "logreg":
            return self.model_.decision_function(self.vectorizer_.transform(list(texts))).astype(np.float64)
        labels, probs = self.model_.predict([_fasttext_line(t) for t in texts], k=2)
        p1 = np.array([dict(zip(lab, pr)).get("__label__1", 0.0) for lab, pr in zip(labels, probs)])
        p1 = np.clip(p1, 1e-12, 1 - 1e-12)
        return np.log(p1) - np.log1p(-p1)

    def select(self, scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """Top-k of the log-odds; with pareto_alpha > 0, top-k of p + Pareto(α) draws (GPT-3's keep rule)."""
        if self.pareto_alpha == 0:
            return top_k(scores, k)
        p = 1.0 / (1.0 + np.exp(-np.asarray(scores, dtype=np.float64)))
        return top_k(p + rng.pareto(self.pareto_alpha, size=p.shape[0]), k)
