"""Shards (dsdm.shards): plan_shards covers range(n) exactly at its edges, run_shards runs locally in shard order
and returns results in that order, and executor='ray' without Ray installed names the extra that installs it.

Run: pytest tests/test_shards.py
"""

import sys

import pytest

from dsdm.shards import plan_shards, run_shards


@pytest.mark.parametrize(
    "n,size,expected",
    [
        (0, 4, []),
        (1, 4, [(0, 1)]),
        (4, 4, [(0, 4)]),
        (5, 4, [(0, 4), (4, 5)]),
        (8, 4, [(0, 4), (4, 8)]),
        (3, 1, [(0, 1), (1, 2), (2, 3)]),
        (3, 10**9, [(0, 3)]),
    ],
)
def test_plan_shards_edges(n, size, expected):
    assert plan_shards(n, size) == expected


@pytest.mark.parametrize("n,size", [(1000, 7), (999, 333), (17, 16)])
def test_plan_shards_cover_range_exactly(n, size):
    shards = plan_shards(n, size)
    assert [i for a, b in shards for i in range(a, b)] == list(range(n))
    assert all(0 < b - a <= size for a, b in shards) and all(b - a == size for a, b in shards[:-1])


@pytest.mark.parametrize("size", [0, -3])
def test_plan_shards_refuses_a_non_positive_size(size):
    with pytest.raises(ValueError, match="shard_size must be positive"):
        plan_shards(10, size)


def test_run_shards_local_runs_in_order_and_returns_in_order():
    calls = []

    def fn(start, stop):
        calls.append((start, stop))
        return sum(range(start, stop))

    shards = plan_shards(10, 3)
    assert run_shards(fn, shards) == [3, 12, 21, 9]
    assert calls == shards
    assert run_shards(fn, []) == []


def test_run_shards_propagates_a_shard_error():
    def fn(start, stop):
        if start == 3:
            raise RuntimeError(f"shard {start}-{stop} failed")
        return start

    with pytest.raises(RuntimeError, match="shard 3-6 failed"):
        run_shards(fn, plan_shards(9, 3))


def test_unknown_executor_is_refused():
    with pytest.raises(ValueError, match="executor must be 'local' or 'ray'"):
        run_shards(lambda a, b: None, [(0, 1)], executor="dask")


def test_ray_executor_without_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises((ImportError, ValueError)) as e:
        run_shards(lambda a, b: None, [(0, 1)], executor="ray")
    msg = str(e.value)
    assert "dsdm[ray]" in msg and "pip install" in msg and "\n" not in msg
