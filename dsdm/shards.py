"""Index-range shards: the unit of work of every long stage (tokenizing, featurizing, scoring).

A stage over N items is cut into shards [start, stop). A shard is a pure function of (config, start, stop): it writes
its rows into a shared store (disjoint ranges of one memmap, or its own shard file) and returns a small summary (a
partial Gram matrix, counts). Shards run in any order, in any process, on any machine that sees the store, and record
completion in the store (a done mask or a per-shard marker) so a rerun skips them.

`run_shards` runs them as a plain local loop by default, or as Ray tasks (`executor="ray"`, needs `dsdm[ray]`) on a
local or existing cluster: the same function, the same store, the same numbers.
"""

from __future__ import annotations

from typing import Any, Callable

from dsdm.common import log, progress


def plan_shards(n: int, shard_size: int) -> list[tuple[int, int]]:
    """Cut range(n) into consecutive [start, stop) ranges of at most shard_size items."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def run_shards(
    fn: Callable[[int, int], Any],
    shards: list[tuple[int, int]],
    *,
    executor: str = "local",
    desc: str = "shards",
    ray_address: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> list[Any]:
    """Run fn(start, stop) for every shard; return the results in shard order.

    executor: 'local' (a loop in this process) or 'ray' (one Ray task per shard; `fn` must be picklable, e.g. a
    module-level function or a functools.partial of one). `ray_address` joins an existing cluster ('auto' or
    'ray://host:port'); None starts a local one. num_cpus / num_gpus are the resources each shard task asks for.
    """
    if executor == "local":
        return [fn(start, stop) for start, stop in progress(shards, desc=desc, unit="shard")]
    if executor != "ray":
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    try:
        import ray
    except ImportError:
        raise ImportError("executor='ray' needs Ray: pip install 'dsdm[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
        log(f"ray: {ray.cluster_resources()}")
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn)
    refs = [remote.remote(start, stop) for start, stop in shards]
    position = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with progress(total=len(refs), desc=desc, unit="shard") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[position[ref]] = ray.get(ref)  # re-raises the shard's exception here
                bar.update(1)
    return results
