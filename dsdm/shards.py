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

from dsdm.common import MissingDependency, log, progress

# The settings that say where a stage's shards run, never what they compute: every stage that takes them leaves them
# out of its completion key and recorded settings (stages that also place work on a device add "device").
EXECUTOR_KEYS = ("executor", "ray_address", "ray_worker_cpus")


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

    executor: 'local' (a loop in this process) or 'ray' (one Ray task per shard; `fn` is shipped once with
    cloudpickle, so it must not capture big in-memory state: pass paths and open them in the task, or use
    run_on_actors to open them once per worker). `ray_address` joins an existing cluster ('auto' or
    'ray://host:port'); None starts a local one. num_cpus / num_gpus are the resources each shard task asks for.
    """
    if executor == "local":
        return [fn(start, stop) for start, stop in progress(shards, desc=desc, unit="shard")]
    if executor != "ray":
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    ray = ray_init(ray_address)
    # ray.remote needs a plain function: fn (a partial, a closure) travels as an argument of a module-level one
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_call)
    fn_ref = ray.put(fn)
    refs = [remote.remote(fn_ref, start, stop) for start, stop in shards]
    return _gather(ray, refs, desc)


def _call(fn: Callable[[int, int], Any], start: int, stop: int) -> Any:
    return fn(start, stop)


def ray_init(address: str | None = None):
    """Ray, connected: to `address` ('auto': the cluster this machine belongs to; 'ray://host:port': a remote head),
    or to a new local cluster when None. An already initialized Ray (e.g. ray.init(num_cpus=2) in a test) is used as
    is. -> the ray module."""
    try:
        import ray
    except ImportError:
        raise MissingDependency("executor=ray needs Ray: pip install 'dsdm[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        except ConnectionError as e:
            raise ValueError(
                f"ray_address={address!r}: no Ray cluster there ({str(e).splitlines()[0]}); start one with "
                "`ray start --head` or leave ray_address unset for a local cluster"
            ) from None
        log(f"ray: {ray.cluster_resources()}")
    return ray


def run_on_actors(
    worker: type,
    init_kwargs: dict,
    shards: list[tuple[int, int]],
    *,
    ray_address: str | None = None,
    num_workers: int = 0,
    num_cpus: float = 1,
    num_gpus: float = 0,
    desc: str = "shards",
) -> list[Any]:
    """Run worker(**init_kwargs).run(start, stop) for every shard on a pool of Ray actors; results in shard order.

    Each actor is created once (it opens the pool, the model, ... from paths in init_kwargs) and is handed shards
    as it frees up, so slow shards do not hold the others back. num_workers = 0: as many as the cluster has room for
    (its CPUs / num_cpus, or its GPUs / num_gpus), at most one per shard. A failed shard re-raises here."""
    ray = ray_init(ray_address)
    if num_workers <= 0:
        room = ray.cluster_resources()
        num_workers = int(room.get("GPU", 0) // num_gpus) if num_gpus else int(room.get("CPU", 1) // num_cpus)
    num_workers = max(1, min(num_workers, len(shards)))
    # a worker that dies (node lost, OOM kill) is restarted and its shard retried: shards are idempotent
    actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=3, max_task_retries=3)(worker)
    actors = [actor.remote(**init_kwargs) for _ in range(num_workers)]
    results: list[Any] = [None] * len(shards)
    try:
        free, queue, running = list(actors), list(enumerate(shards)), {}
        with progress(total=len(shards), desc=desc, unit="shard") as bar:
            while queue or running:
                while queue and free:
                    a, (i, (start, stop)) = free.pop(), queue.pop(0)
                    running[a.run.remote(start, stop)] = (i, a)
                done, _ = ray.wait(list(running), num_returns=1)
                i, a = running.pop(done[0])
                results[i] = ray.get(done[0])  # re-raises the shard's exception here
                free.append(a)
                bar.update(1)
    finally:
        for a in actors:
            ray.kill(a)
    return results


def _gather(ray, refs: list, desc: str) -> list[Any]:
    """ray.get of every ref with a progress bar as they finish; results in ref order."""
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
