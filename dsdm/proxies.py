"""Proxy models for the estimator: M independent proxies, each trained on its own seeded random subset of the pool
(docs/method.md §3.8, §9.2 step 2; the paper trains 4 proxies on ≈38% of the pool each).

Layout of a proxies directory:

    manifest.json           pool path + fingerprint, n, fraction, seed, the model directories (relative: the M
                            finals, then proxy_<m>/snapshot_<f> for each snapshot fraction), train config
    subsets/proxy_<m>.npy   (round(fraction * N),) int64, sorted: the examples proxy m was trained on
    proxy_<m>/              the trainer's output directory (dsdm.train): weights, sidecar, its own _done.json
    _done.json              written last

Subset m is drawn from numpy_rng((seed, m)) without replacement, so subsets are independent, reproducible and
independent of n (adding a 5th proxy leaves the first 4 unchanged). The trainer skips proxies already trained.

The proxies are independent, so `executor: ray` trains them side by side, one Ray task per proxy (ray_worker_cpus
CPUs and as many torch threads each, or one GPU each where the trainer's device is cuda): M proxies on M workers
in the time of one (docs/runner.md "Proxies in parallel"). Where the work runs is no part of the stage's key.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsdm.shards import EXECUTOR_KEYS


def draw_subset(n_pool: int, fraction: float, seed: int, proxy: int) -> np.ndarray:
    """Sorted int64 indices of round(fraction * n_pool) distinct examples for proxy `proxy`."""
    from dsdm.common import numpy_rng

    size = max(1, int(round(fraction * n_pool)))
    return np.sort(numpy_rng((seed, proxy)).choice(n_pool, size=size, replace=False)).astype(np.int64)


@dataclass
class ProxiesConfig:
    n: int = 4
    """M, the number of proxies (the paper: 4)."""
    fraction: float = 0.4
    """Fraction of the pool each proxy trains on (the paper: ≈0.38)."""
    seed: int = 0
    """Seed of the subset draws; proxy m's trainer seed is base * 1000 + m, base = train.seed if set, else seed."""
    train: dict = field(default_factory=dict)
    """Trainer settings (dsdm.train.TrainConfig keys), e.g. {preset: tiny, steps: 300}."""
    snapshots: list[float] = field(default_factory=list)
    """Also ensemble each proxy's weights after these fractions of its training (TracIn/SOURCE's checkpoints along
    training; docs/estimator.md round 10), e.g. [0.5]. The manifest lists the M finals first, then the M snapshots of
    each fraction, latest first, so score.num_proxies = M keeps the finals only."""
    executor: str = "local"
    """local (one proxy after another in this process) | ray (one Ray task per proxy, as many at once as the
    cluster has room for). Not part of the result's key; with 1 CPU per task the weights are bitwise those of a local
    run with 1 torch thread (a local run's default thread count rounds its float reductions differently)."""
    ray_address: str | None = None
    """executor=ray: None starts a local Ray cluster; 'auto' joins the cluster this machine is in (`ray start`);
    'ray://HOST:PORT' a remote head."""
    ray_worker_cpus: float = 1
    """executor=ray: CPUs (and torch threads) each proxy's task reserves; one GPU per task instead when the
    trainer's device resolves to cuda."""

    def __post_init__(self):
        if self.n <= 0:
            raise ValueError(f"n (number of proxies) must be positive, got {self.n}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if any(not 0 < f < 1 for f in self.snapshots) or len(set(self.snapshots)) != len(self.snapshots):
            raise ValueError(f"proxy.snapshots must be distinct fractions in (0, 1), got {self.snapshots}")
        if "snapshots" in self.train:
            raise ValueError(
                "set the proxies' snapshots as proxy.snapshots (they are ensemble members), not train.snapshots"
            )
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be local or ray, got {self.executor!r}")
        if self.ray_worker_cpus < 1:
            raise ValueError(f"ray_worker_cpus must be >= 1 (the task's torch threads), got {self.ray_worker_cpus}")


def train_proxy(pool_dir: str | Path, out_dir: str | Path, cfg: ProxiesConfig, m: int, force: bool = False) -> str:
    """Draw proxy m's subset, write it to subsets/proxy_<m>.npy and train proxy_<m>/ on it (skipped when its own
    record matches, unless force). -> the model directory relative to out_dir."""
    from dsdm.common import log
    from dsdm.config import from_dict
    from dsdm.io import save_npy
    from dsdm.pool import Pool
    from dsdm.train import TrainConfig, train

    pool, out_dir = Pool(pool_dir), Path(out_dir)
    subset = draw_subset(len(pool), cfg.fraction, cfg.seed, m)
    save_npy(out_dir / "subsets" / f"proxy_{m}.npy", subset)
    tcfg = dict(cfg.train)
    # a distinct trainer seed (initial weights, data order) per proxy, also when the user sets train.seed:
    # a shared seed would give every proxy the same initial weights, and their ensemble less independence
    tcfg["seed"] = tcfg.get("seed", cfg.seed) * 1000 + m
    tcfg["snapshots"] = list(cfg.snapshots)
    log(f"proxy {m}/{cfg.n}: training on {subset.size} of {len(pool)} examples")
    # `--force` (or the runner replacing an out-of-date stage) retrains every proxy, even one whose record
    # matches; without it a finished proxy is kept (resume)
    tcfg = from_dict(TrainConfig, tcfg, prefix="train.")
    model_dir = Path(train(pool, subset, tcfg, out_dir / f"proxy_{m}", force=force))
    return str(model_dir.resolve().relative_to(out_dir.resolve()))


def _proxy_task(pool_dir: str, out_dir: str, cfg: ProxiesConfig, force: bool, device: str, start: int, stop: int):
    """One Ray task: proxies start..stop-1, with as many torch threads as the CPUs the task reserved (more would
    oversubscribe the cores shared with the other proxies' tasks) on `device` (cuda: the GPU Ray assigned)."""
    import torch

    torch.set_num_threads(int(cfg.ray_worker_cpus))  # >= 1: ProxiesConfig checks it
    cfg = dataclasses.replace(cfg, train={**cfg.train, "device": device})
    return [train_proxy(pool_dir, out_dir, cfg, m, force) for m in range(start, stop)]


def run(pool_dir: str | Path, out_dir: str | Path, cfg: ProxiesConfig, force: bool = False) -> Path:
    """Train cfg.n proxies on their subsets, here one after another or as Ray tasks side by side (cfg.executor);
    resumable (finished proxies are skipped by the trainer unless force)."""
    from dsdm.common import log
    from dsdm.config import to_dict, without_new_defaults
    from dsdm.io import clear_done, is_done, mark_done, write_json
    from dsdm.pool import Pool
    from dsdm.train import snapshot_name

    pool, out_dir = Pool(pool_dir), Path(out_dir)
    what = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTOR_KEYS}  # where they train: not in the key
    settings = without_new_defaults(what, {"snapshots": []})  # added after proxies existed
    slice_ = {"proxies": settings, "pool_fingerprint": pool.fingerprint}
    if is_done(out_dir, slice_, force=force):
        log(f"{out_dir}: proxies already trained with this configuration; nothing to do")
        return out_dir
    if force:
        clear_done(out_dir)
    started = time.time()
    if cfg.executor == "ray":
        from dsdm.common import resolve_device
        from dsdm.shards import plan_shards, run_shards

        device = cfg.train.get("device", "auto")
        gpu = resolve_device(device)[0].type == "cuda"
        log(f"{cfg.n} proxies to train as Ray tasks ({'1 GPU' if gpu else f'{cfg.ray_worker_cpus:g} CPU'} each)")
        task = functools.partial(
            _proxy_task, str(Path(pool_dir).resolve()), str(out_dir.resolve()), cfg, force, "cuda" if gpu else device
        )
        done = run_shards(
            task,
            plan_shards(cfg.n, 1),
            executor="ray",
            desc="proxies",
            ray_address=cfg.ray_address,
            num_cpus=cfg.ray_worker_cpus,
            num_gpus=1 if gpu else 0,
        )
        models = [name for names in done for name in names]
    else:
        models = [train_proxy(pool_dir, out_dir, cfg, m, force) for m in range(cfg.n)]
    # ensemble members: the finals, then each snapshot level (latest first), every level in proxy order
    models += [f"{m}/{snapshot_name(f)}" for f in sorted(cfg.snapshots, reverse=True) for m in models[: cfg.n]]
    write_json(
        out_dir / "manifest.json",
        {
            "pool": str(Path(pool_dir).resolve()),
            "pool_fingerprint": pool.fingerprint,
            "num_proxies": cfg.n,
            "num_members": len(models),  # the ensemble: the finals and every snapshot
            "models": models,
            "subsets": [f"subsets/proxy_{m}.npy" for m in range(cfg.n)],
            "config": what,
        },
    )
    mark_done(out_dir, slice_, started=started)
    return out_dir
