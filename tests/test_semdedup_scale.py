"""SemDeDup at scale (dsdm/baselines/semdedup.py): embeddings streamed into an on-disk memmap, k-means trained on a
seeded sample, nearest-centroid assignment in batches, the greedy rule one cluster at a time, optionally on Ray.

Planted near-duplicate groups in random embeddings keep exactly one representative each (the member farthest from
its centroid) with k-means trained on a sample and batched assignment; the on-disk pool pass (score_pool) equals
the in-RAM path bitwise, with every point or a sample training k-means; with every point it equals the one-shot
k-means the module used before (so the demo and repro pools, smaller than kmeans_sample, are unchanged); the Ray
executor equals the local one bitwise. Memory is measured in benchmarks/semdedup_scale.py, not here.

Run: .venv/bin/python -m pytest -q tests/test_semdedup_scale.py
"""

import numpy as np
import pytest
from test_baselines import OTHER, _build_pool, _doc

from dsdm.baselines import ExecutorConfig, fit_and_score, read_items
from dsdm.baselines import semdedup as sdd
from dsdm.baselines.semdedup import SemDeDup, assign, cluster_order, keep_mask, train_kmeans

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install 'dsdm[ray]' (make test does)")


def planted(seed=0, groups=30, copies=4, distinct=400, d=32, noise=0.01):
    """Unit rows: `groups` centres each followed by `copies` near-copies (cos > 0.99 to the centre), then `distinct`
    random points. -> (x (N, d) float32, group id per row, -1 for distinct points)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, d))
    rows = [c + noise * rng.normal(size=(copies + 1, d)) for c in centres] + [rng.normal(size=(distinct, d))]
    x = np.concatenate(rows).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    group = np.concatenate([np.repeat(np.arange(groups), copies + 1), np.full(distinct, -1)])
    perm = rng.permutation(len(x))  # groups scattered over the rows, so batches and the sample cut through them
    return x[perm], group[perm]


def test_planted_groups_keep_one_representative_with_sampled_kmeans(tmp_path, monkeypatch):
    x, group = planted()
    store = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    store[:] = x
    store.flush()
    monkeypatch.setattr(sdd, "ASSIGN_BATCH", 97)  # 6 batches, the last one short
    est = SemDeDup(target_keep_fraction=0.0, eps=0.05, n_clusters=8, kmeans_sample=200, seed=0)
    keep = est.dedup(np.load(tmp_path / "x.npy", mmap_mode="r"))
    assert keep[group == -1].all(), "points without a planted twin must all be kept"
    cos = np.einsum("nd,nd->n", x, est.centroids_[est.labels_])
    for g in range(group.max() + 1):
        members = np.flatnonzero(group == g)
        assert len(set(est.labels_[members].tolist())) == 1, "a planted group landed in one cluster"
        # the greedy rule visits farthest-from-centroid first: that member is the group's one representative
        expected = members[np.lexsort((members, cos[members]))[0]]
        assert np.flatnonzero(keep[members]).tolist() == [np.flatnonzero(members == expected)[0]], g
    assert keep.sum() == 400 + 30
    again = SemDeDup(target_keep_fraction=0.0, eps=0.05, n_clusters=8, kmeans_sample=200, seed=0).dedup(x)
    assert np.array_equal(again, keep)  # seeded: the same sample, centroids and mask, memmap or array


def test_assign_in_batches_equals_one_batch():
    x, _ = planted(seed=1)
    centroids = train_kmeans(x, 12, seed=0, sample=150)
    labels, cos = assign(x, centroids, batch=len(x))
    for batch in (1, 7, 19, 20, 64):  # faiss searches < 20 queries without BLAS: that path must agree too
        lb, cb = assign(x, centroids, batch=batch)
        assert lb.tobytes() == labels.tobytes() and cb.tobytes() == cos.tobytes(), batch


def test_sampled_kmeans_uses_only_the_seeded_sample():
    x, _ = planted(seed=2)
    rows = sdd.kmeans_rows(len(x), 150, seed=3)
    assert rows.shape == (150,) and np.all(np.diff(rows) > 0)
    assert np.array_equal(train_kmeans(x, 10, seed=3, sample=150), train_kmeans(x[rows], 10, seed=3))
    assert sdd.kmeans_rows(len(x), 0, seed=3) is None and sdd.kmeans_rows(len(x), len(x), seed=3) is None
    with pytest.raises(ValueError, match="kmeans_sample=5 is below the 10 clusters"):
        SemDeDup(n_clusters=10, kmeans_sample=5).dedup(x)
    with pytest.raises(ValueError, match="kmeans_sample must be >= 0"):
        SemDeDup(kmeans_sample=-1)


def test_every_point_equals_the_one_shot_kmeans_of_before():
    """kmeans_sample >= N: faiss trains on every row, and the batched assignment gives the labels its own index
    gave in one search (the code before the change), so pools below kmeans_sample are de-duplicated as before."""
    import faiss

    x, _ = planted(seed=4)
    km = faiss.Kmeans(32, 21, niter=20, seed=0, spherical=True, verbose=False, max_points_per_centroid=1 << 30)
    km.train(x)
    _, old_labels = km.index.search(x, 1)
    old_cos = np.einsum("nd,nd->n", x, km.centroids[old_labels[:, 0]])
    est = SemDeDup(target_keep_fraction=0.3, n_clusters=21, seed=0)
    keep = est.dedup(x)
    assert est.labels_.tobytes() == old_labels[:, 0].astype(np.int64).tobytes()
    assert est.centroids_.tobytes() == km.centroids.tobytes()
    order = np.lexsort((np.arange(len(x)), old_cos, old_labels[:, 0]))  # the old cluster_order
    clusters = np.split(order, np.flatnonzero(np.diff(old_labels[order, 0])) + 1)
    assert all(np.array_equal(a, b) for a, b in zip(clusters, cluster_order(est.labels_, old_cos)))
    assert np.array_equal(keep, keep_mask(x, clusters, est.eps_))


@pytest.fixture(scope="module")
def text_pool(tmp_path_factory):
    """A 300-example text pool in which every fifth document has a near-copy (two words changed)."""
    rng = np.random.default_rng(7)
    texts = [_doc(rng, OTHER[i % 4], n=50) for i in range(240)]
    for i in range(0, 240, 4):
        words = texts[i].split()
        words[3], words[20] = "zebra", "yak"
        texts.append(" ".join(words))
    return _build_pool(tmp_path_factory.mktemp("sdd") / "pool", texts)


@pytest.mark.parametrize("kmeans_sample", [0, 120])
def test_memmapped_pool_pass_equals_the_in_ram_path(text_pool, tmp_path, monkeypatch, kmeans_sample):
    """score_pool (chunks of 37 written into a memmap, assignment in 50-row shards, rows copied into visiting order,
    each cluster read as one slice) against finish(parts) (every embedding concatenated in RAM, one assignment
    batch, clusters gathered from the array): the same bits."""
    params = dict(dim=24, target_keep_fraction=0.6, kmeans_sample=kmeans_sample, seed=0)
    pool = text_pool
    texts = read_items(pool, np.arange(len(pool)), "text")
    est = SemDeDup(**params).fit(None, texts)  # fit_and_score's sample: the whole 300-example pool
    in_ram, info = est.finish([est.embed(texts)])
    ram_labels = est.labels_
    monkeypatch.setattr(sdd, "ASSIGN_BATCH", 50)
    streamed, info2 = fit_and_score(SemDeDup(**params), pool, [], 0, ExecutorConfig(chunk_size=37), tmp_path)
    assert streamed.tobytes() == in_ram.tobytes() and info2 == {"fit_sample": 300, "num_targets": 0, **info}
    assert list(tmp_path.iterdir()) == [], "the temporary store is removed"
    assert 0.55 < info["kept_fraction"] < 0.65 and np.unique(ram_labels).size > 5
    # and the planted copies go: at most one of each pair is kept
    assert all(streamed[i] + streamed[240 + i // 4] <= 1 for i in range(0, 240, 4))


# -----------------------------------------------------------------------------
# Ray: a local cluster of 2 CPUs


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@needs_ray
def test_ray_executor_is_bitwise_the_local_one(text_pool, cluster, tmp_path, monkeypatch):
    """executor=ray: 9 chunks embedded by 2 actors into the store, the assignment in 5 Ray tasks of 64 rows, every
    bisection step's clusters de-duplicated by Ray tasks of about 40 rows; the keep mask, eps and info equal the local
    executor's."""
    params = dict(dim=24, target_keep_fraction=0.6, kmeans_sample=120, seed=0)
    local, info = fit_and_score(SemDeDup(**params), text_pool, [], 0, ExecutorConfig(chunk_size=37), tmp_path / "a")
    monkeypatch.setattr(sdd, "SHARD_ROWS", 40)
    monkeypatch.setattr(sdd, "ASSIGN_BATCH", 64)
    where = ExecutorConfig(executor="ray", chunk_size=37)
    scaled, info2 = fit_and_score(SemDeDup(**params), text_pool, [], 0, where, tmp_path / "b")
    assert scaled.tobytes() == local.tobytes() and info2 == info
    assert 0 < local.sum() < len(local)
