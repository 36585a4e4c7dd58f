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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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


def run(pool_dir: str | Path, out_dir: str | Path, cfg: ProxiesConfig, force: bool = False) -> Path:
    """Train cfg.n proxies on their subsets; resumable (finished proxies are skipped by the trainer unless force)."""
    from dsdm.common import log
    from dsdm.config import from_dict, to_dict, without_new_defaults
    from dsdm.io import clear_done, is_done, mark_done, save_npy, write_json
    from dsdm.pool import Pool
    from dsdm.train import TrainConfig, snapshot_name, train

    pool, out_dir = Pool(pool_dir), Path(out_dir)
    settings = without_new_defaults(to_dict(cfg), {"snapshots": []})  # added after proxies existed
    slice_ = {"proxies": settings, "pool_fingerprint": pool.fingerprint}
    if is_done(out_dir, slice_, force=force):
        log(f"{out_dir}: proxies already trained with this configuration; nothing to do")
        return out_dir
    if force:
        clear_done(out_dir)
    started = time.time()
    models = []
    for m in range(cfg.n):
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
        models.append(str(model_dir.resolve().relative_to(out_dir.resolve())))
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
            "config": to_dict(cfg),
        },
    )
    mark_done(out_dir, slice_, started=started)
    return out_dir
