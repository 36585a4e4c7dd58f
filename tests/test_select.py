"""The shared selection step: top_k against a full argsort, deterministic ties, Gumbel top-k frequencies.

Run: pytest tests/test_select.py
"""

import numpy as np
import pytest

from dsdm.select import bottom_k, gumbel_top_k, top_k, uniform_k


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
