"""The shared selection step: top_k against a full argsort, deterministic ties, Gumbel top-k frequencies, the
tempered and the group-balanced rules against their definitions.

Run: pytest tests/test_select.py
"""

import numpy as np
import pytest

from dsdm.select import balanced_top_k, bottom_k, gumbel_top_k, tempered_k, top_k, uniform_k


def test_top_k_equals_stable_argsort_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=5000).astype(np.float32)  # many ties
    for k in (0, 1, 17, 2500, 5000):
        expected = np.lexsort((np.arange(scores.size), -scores))[:k]
        got = top_k(scores, k)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected)


def test_bottom_k_is_the_inverse_control():
    scores = np.array([0.3, -1.0, 2.0, -1.0, 5.0])
    assert top_k(scores, 2).tolist() == [4, 2]
    assert bottom_k(scores, 2).tolist() == [1, 3]


def test_top_k_rejects_nan_and_bad_k():
    with pytest.raises(ValueError, match="NaN"):
        top_k(np.array([1.0, np.nan]), 1)
    with pytest.raises(ValueError, match="between 0"):
        top_k(np.zeros(3), 4)


def test_gumbel_top_k_first_draw_frequencies_track_weights():
    # The first index of a Gumbel top-k draw is a categorical sample with p ∝ exp(log_w).
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    rng = np.random.default_rng(123)
    counts = np.zeros(4)
    for _ in range(20000):
        counts[gumbel_top_k(np.log(weights), 2, rng)[0]] += 1
    np.testing.assert_allclose(counts / counts.sum(), weights, atol=0.015)
    # -inf weights are never drawn
    got = gumbel_top_k(np.array([0.0, -np.inf, 0.0]), 2, np.random.default_rng(0))
    assert sorted(got.tolist()) == [0, 2]
    with pytest.raises(ValueError, match="finite log weight"):
        gumbel_top_k(np.array([0.0, -np.inf]), 2, np.random.default_rng(0))


def test_uniform_k_is_seeded_and_respects_mask():
    mask = np.zeros(100, dtype=bool)
    mask[::3] = True
    a = uniform_k(mask, 10, np.random.default_rng(5))
    b = uniform_k(mask, 10, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert np.all(mask[a]) and len(set(a.tolist())) == 10


def test_tempered_k_is_softmax_of_standardized_scores_and_its_limits():
    scores = np.array([3.0, 1.0, 0.0, -2.0, 7.0])
    z = (scores - scores.mean()) / scores.std()
    rng = np.random.default_rng(7)
    counts = np.zeros(5)
    for _ in range(20000):  # the first draw is categorical with p ∝ exp(z / T)
        counts[tempered_k(scores, 2, 0.8, rng)[0]] += 1
    p = np.exp(z / 0.8) / np.exp(z / 0.8).sum()
    np.testing.assert_allclose(counts / counts.sum(), p, atol=0.015)
    # scale-free: 100x the scores, same draw from the same stream; T -> 0 is top_k
    a = tempered_k(scores, 3, 0.5, np.random.default_rng(1))
    np.testing.assert_array_equal(a, tempered_k(100 * scores, 3, 0.5, np.random.default_rng(1)))
    big = np.random.default_rng(2).normal(size=1000)
    np.testing.assert_array_equal(np.sort(tempered_k(big, 50, 1e-6, np.random.default_rng(3))), np.sort(top_k(big, 50)))
    with pytest.raises(ValueError, match="temperature"):
        tempered_k(scores, 2, 0.0, rng)


def test_balanced_top_k_keeps_the_pool_composition_and_each_groups_best():
    # group a: 6 examples with the highest scores, b: 3, c: 1. Plain top-4 takes only a; balanced gives quotas
    # 4 * (6, 3, 1) / 10 = (2.4, 1.2, 0.4) -> floors (2, 1, 0) + the one left to the largest remainder, a (0.4 ties c
    # at 0.4; a sorts first) -> (3, 1, 0).
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 1.0, 3.0, 2.0, 0.5])
    groups = np.array(["a"] * 6 + ["b"] * 3 + ["c"])
    assert top_k(scores, 4).tolist() == [0, 1, 2, 3]
    assert balanced_top_k(scores, groups, 4).tolist() == [0, 1, 2, 7]
    # k = N keeps everything (best first); quotas always sum to k
    np.testing.assert_array_equal(balanced_top_k(scores, groups, 10), top_k(scores, 10))
    rng = np.random.default_rng(0)
    many = rng.integers(0, 7, size=1000)
    for k in (1, 13, 500, 999):
        got = balanced_top_k(rng.normal(size=1000), many, k)
        assert got.size == k == np.unique(got).size
        np.testing.assert_array_less(np.abs(np.bincount(many[got], minlength=7) - k * np.bincount(many) / 1000), 1)
    with pytest.raises(ValueError, match="one label per score"):
        balanced_top_k(scores, groups[:5], 2)
