"""Featurize: the feature store of projected per-example gradients, one directory per proxy, filled shard by shard
(TRAK, Park et al. 2023, §3; docs/method.md §3.2–3.7). The sketches themselves (output function, dense / SRHT /
factorized projectors) live in dsdm.sketch and are re-exported here for existing callers.

A store holds features.npy (N, dim) float16/32, q.npy (N,), done.npy (N,) and, per finished shard, its Gram
shards/gram_<a>_<b>.npy (float64), reduced in a fixed order into gram.npy. The Gram is of exactly the stored
(rounded) features. On CPU it is summed in float64 with numpy, as always; on a GPU it is accumulated on the device
(gram="float64": float64 addmm; gram="float32": a float32 sum per shard added into the float64 total, faster on GPUs
with slow float64; its error against the all-float64 sum is measured in docs/benchmarks.md and bounded in
tests/test_featurize.py). batch_size = 0 picks the batch from free GPU memory (16 on CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from dsdm.sketch import (  # noqa: F401 - re-exported: the sketch API callers have imported from dsdm.featurize
    DENSE_PROJECTIONS,
    DENSE_RNGS,
    PRECISIONS,
    SKETCH_VERSION,
    DenseSketch,
    FactorizedSketch,
    dense_matrix,
    dense_params,
    dense_project,
    featurize_batches,
    fwht,
    make_sketch,
    margins_and_probs,
    output_and_q,
    per_example_grads,
    pool_score_mask,
    projection_rng,
    rademacher,
    split_dims,
    srht_matrix,
    srht_plan,
    srht_project,
)

# -----------------------------------------------------------------------------
# IO: the feature store (one directory per proxy), filled shard by shard


@dataclass
class FeaturizeConfig:
    proj_dim: int = 4096
    """k, the projection budget (docs/method.md §3.4). Factorized: the feature dim is <= k (see split_dims)."""
    projector: str = "factorized"
    """factorized (per-Linear Kronecker sketch, fast) | dense (exact per-example gradients x Rademacher, reference)."""
    dense_params: str = "all"
    """Dense projector only: all | linear (the parameters the factorized sketch covers, for comparisons)."""
    dense_projection: str = "rademacher"
    """Dense projector only: rademacher (i.i.d. ±1 P regenerated per batch, p x k signs: exact TRAK, the reference)
    | srht (subsampled randomized Hadamard transform: also ±1 entries and unbiased inner products, O(p log p) per
    example; the dense path that scales beyond toy models on a CPU)."""
    dense_rng: str = "pcg64"
    """Dense i.i.d. projection only: pcg64 (signs from the CPU stream: the same matrix on every device) | device
    (torch's generator on the featurize device: fast on a GPU; the store records the device and scoring must run on
    the same kind, see sketch.projection_rng)."""
    precision: str = "float32"
    """Proxy forward/backward precision: float32 | tf32 (CUDA matmuls) | bf16 (autocast). Projections, the output
    function and the Gram stay float32/float64. Feature error against float32: docs/benchmarks.md "GPU"."""
    gram: str = "float64"
    """Gram accumulation: float64 (numpy on CPU, float64 addmm on a GPU) | float32 (float32 per shard, added into
    the float64 total; relative error ~1e-7, docs/benchmarks.md)."""
    storage_dtype: str = "float16"
    """float16 | float32 for features.npy. The Gram matrix is always reduced in float64."""
    batch_size: int = 16
    """Examples per forward/backward; 0 = from free GPU memory (auto_batch_size; 16 on CPU)."""
    shard_size: int = 1024
    """Examples per shard: the unit of resume and of parallel work (disjoint rows of one store)."""
    seed: int = 0
    """Projection seed; proxy m uses the streams (seed, m, ...)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    executor: str = "local"
    """local (one process, progress in examples/s) | ray (one Ray task per shard, same store, same numbers)."""

    def __post_init__(self):
        if self.proj_dim <= 0:
            raise ValueError(f"proj_dim must be positive, got {self.proj_dim}")
        if self.projector not in ("factorized", "dense"):
            raise ValueError(f"projector must be factorized or dense, got {self.projector!r}")
        if self.dense_params not in ("all", "linear"):
            raise ValueError(f"dense_params must be all or linear, got {self.dense_params!r}")
        if self.dense_projection not in DENSE_PROJECTIONS:
            raise ValueError(f"dense_projection must be one of {DENSE_PROJECTIONS}, got {self.dense_projection!r}")
        if self.storage_dtype not in ("float16", "float32"):
            raise ValueError(f"storage_dtype must be float16 or float32, got {self.storage_dtype!r}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be local or ray, got {self.executor!r}")
        if self.dense_rng not in DENSE_RNGS:
            raise ValueError(f"dense_rng must be one of {DENSE_RNGS}, got {self.dense_rng!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.gram not in ("float64", "float32"):
            raise ValueError(f"gram must be float64 or float32, got {self.gram!r}")
        if self.batch_size < 0 or self.shard_size <= 0:
            raise ValueError("batch_size must be >= 0 (0 = auto) and shard_size positive")


# Fields added after stores existed: left out of the completion key at their defaults, so those stores stay valid.
_NEW_DEFAULTS = {"dense_rng": "pcg64", "precision": "float32", "gram": "float64"}


def auto_batch_size(sketch, pool, device, probe: int = 4, fraction: float = 0.6, cap: int = 512) -> int:
    """Examples per batch that fit in `fraction` of the free GPU memory, from the peak memory of a `probe`-example
    batch (activations and per-example state grow linearly in the batch). 16 off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return 16
    tokens, mask = pool.batch(np.arange(min(probe, len(pool))), pad_to=pool.seq_len)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    sketch.sketch(
        torch.as_tensor(tokens, device=device), torch.as_tensor(pool_score_mask(torch.as_tensor(mask)), device=device)
    )
    per_example = max(1, (torch.cuda.max_memory_allocated(device) - base) / len(tokens))
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(cap, fraction * free // per_example)))


def featurize_shard(
    start: int, stop: int, *, store: Path, pool, sketch, device, batch_size: int, gram: str = "float64", bar=None
) -> str:
    """Fill rows [start, stop) of features.npy and q.npy, then publish shards/gram_<start>_<stop>.npy (the shard's
    completion record, written atomically) and set done[start:stop]. Skips a shard whose Gram file exists.

    The Gram is of the stored (rounded) rows: numpy float64 on CPU with gram="float64" (bitwise as ever); else
    summed on `device` (gram_on_device), features never leaving it before the store write."""
    from dsdm.io import save_npy

    gram_path = store / "shards" / f"gram_{start:09d}_{stop:09d}.npy"
    if gram_path.exists():
        return "skipped"
    feats = np.load(store / "features.npy", mmap_mode="r+")
    q = np.load(store / "q.npy", mmap_mode="r+")
    done = np.load(store / "done.npy", mmap_mode="r+")
    if torch.device(device).type != "cpu" or gram != "float64":
        return _featurize_shard_on_device(
            start, stop, gram_path, feats, q, done, pool, sketch, device, batch_size, gram, bar
        )
    gram = np.zeros((feats.shape[1], feats.shape[1]), dtype=np.float64)
    for b0 in range(start, stop, batch_size):
        idx = np.arange(b0, min(b0 + batch_size, stop))
        tokens, mask = pool.batch(idx, pad_to=pool.seq_len)
        score = mask.copy()
        score[:, 0] = False
        g, qb = featurize_batches(sketch, [(tokens, score)], device)
        feats[idx] = g.astype(feats.dtype)
        q[idx] = qb
        stored = np.asarray(feats[idx], dtype=np.float64)  # the Gram of exactly what scoring will read
        gram += stored.T @ stored
        if bar is not None:
            bar.update(len(idx))
    feats.flush()
    q.flush()
    save_npy(gram_path, gram)
    done[start:stop] = True
    done.flush()
    return "done"


def _featurize_shard_on_device(start, stop, gram_path, feats, q, done, pool, sketch, device, batch_size, gram, bar):
    """featurize_shard with the Gram accumulated on `device`: float64 addmm, or float32 for the shard added into a
    float64 total at the end (gram="float32")."""
    from dsdm.io import save_npy

    device = torch.device(device)
    store_dtype = torch.float16 if feats.dtype == np.float16 else torch.float32
    acc = torch.zeros(
        feats.shape[1], feats.shape[1], dtype=torch.float64 if gram == "float64" else torch.float32, device=device
    )
    for b0 in range(start, stop, batch_size):
        idx = np.arange(b0, min(b0 + batch_size, stop))
        tokens, mask = pool.batch(idx, pad_to=pool.seq_len)
        score = mask.copy()
        score[:, 0] = False
        g, qb = sketch.sketch(torch.as_tensor(tokens, device=device), torch.as_tensor(score, device=device))
        stored = g.detach().float().to(store_dtype)  # what scoring will read; the Gram is of exactly this
        feats[idx] = stored.cpu().numpy()
        q[idx] = qb.detach().float().cpu().numpy()
        stored = stored.to(acc.dtype)
        acc.addmm_(stored.t(), stored)
        if bar is not None:
            bar.update(len(idx))
    feats.flush()
    q.flush()
    save_npy(gram_path, acc.double().cpu().numpy())
    done[start:stop] = True
    done.flush()
    return "done"


def featurize_proxy(pool, model, store: Path, cfg: FeaturizeConfig, proxy: int, device, shards=None) -> Path:
    """Featurize the whole pool (or only `shards`) with one proxy into `store`; reduce the Gram when all are done."""
    from dsdm.common import log, progress
    from dsdm.io import is_done, mark_done, open_memmap, save_npy, write_json
    from dsdm.shards import plan_shards, run_shards

    store = Path(store)
    slice_ = {"featurize": _cfg_dict(cfg), "proxy": proxy, "pool": pool.fingerprint, "sketch_version": SKETCH_VERSION}
    slice_.update(_rng_record(cfg, device))
    if is_done(store, slice_):
        log(f"{store}: already featurized, skipping")
        return store
    sketch = build_sketch(model.to(device), cfg, proxy, device)
    batch_size = cfg.batch_size or auto_batch_size(sketch, pool, device)
    n, dim = len(pool), sketch.dim
    open_memmap(store / "features.npy", (n, dim), cfg.storage_dtype, fill=0)
    open_memmap(store / "q.npy", (n,), np.float32, fill=0)
    open_memmap(store / "done.npy", (n,), np.bool_, fill=False)
    write_json(store / "manifest.json", {**slice_, "num_examples": n, "feature_dim": dim})
    plan = plan_shards(n, cfg.shard_size) if shards is None else shards
    started = time.time()
    todo = [sh for sh in plan if not (store / "shards" / f"gram_{sh[0]:09d}_{sh[1]:09d}.npy").exists()]
    log(f"{store}: {len(todo)} of {len(plan)} shards to featurize ({cfg.projector}, k={cfg.proj_dim}, dim={dim})")
    fn = partial(
        featurize_shard, store=store, pool=pool, sketch=sketch, device=device, batch_size=batch_size, gram=cfg.gram
    )
    if cfg.executor == "local":  # one bar in examples/s with ETA
        with progress(total=sum(b - a for a, b in todo), desc=f"featurize proxy {proxy}", unit="ex") as bar:
            for a, b in todo:
                fn(a, b, bar=bar)
    else:  # disjoint row ranges of the same store, filled by Ray tasks
        run_shards(fn, todo, executor=cfg.executor, desc=f"featurize proxy {proxy}")
    all_shards = plan_shards(n, cfg.shard_size)
    missing = [s for s in all_shards if not (store / "shards" / f"gram_{s[0]:09d}_{s[1]:09d}.npy").exists()]
    if missing:
        log(f"{store}: {len(missing)} shards still to do; the Gram is reduced when all are done")
        return store
    gram = np.zeros((dim, dim), dtype=np.float64)
    for s0, s1 in all_shards:  # fixed order: the reduction is bitwise reproducible
        gram += np.load(store / "shards" / f"gram_{s0:09d}_{s1:09d}.npy")
    save_npy(store / "gram.npy", gram)
    mark_done(store, slice_, started=started, feature_dim=dim)
    return store


def build_sketch(model, cfg: FeaturizeConfig, proxy: int, device):
    """The sketch `cfg` describes for proxy `proxy` (scoring builds the same one for target gradients)."""
    return make_sketch(
        model,
        cfg.projector,
        cfg.proj_dim,
        cfg.seed,
        proxy,
        device,
        cfg.dense_params,
        cfg.dense_projection,
        cfg.dense_rng,
        cfg.precision,
    )


def _rng_record(cfg: FeaturizeConfig, device) -> dict:
    """{"projection_rng": ...} when the i.i.d. dense matrix comes from a device generator; {} for the default
    (device-independent) stream, so stores made before this field existed keep their completion key."""
    if cfg.projector == "dense" and cfg.dense_projection == "rademacher" and cfg.dense_rng != "pcg64":
        return {"projection_rng": projection_rng(cfg.dense_rng, device)}
    return {}


def _cfg_dict(cfg) -> dict:
    from dsdm.config import to_dict

    out = {k: v for k, v in to_dict(cfg).items() if k not in ("device", "executor")}
    return {k: v for k, v in out.items() if k not in _NEW_DEFAULTS or v != _NEW_DEFAULTS[k]}


def run(pool_dir: str | Path, proxies_dir: str | Path, out_dir: str | Path, cfg: FeaturizeConfig, force: bool = False):
    """Featurize the pool with every proxy of `proxies_dir` (written by `dsdm proxies train`) into out_dir/proxy_<m>/.

    Writes out_dir/manifest.json (pool, proxies, config) first, the stores, then out_dir/_done.json.
    """
    from dsdm.common import log, resolve_device
    from dsdm.io import clear_done, is_done, mark_done, read_json, write_json
    from dsdm.model import load_model
    from dsdm.pool import Pool

    pool, out_dir = Pool(pool_dir), Path(out_dir)
    proxies_dir = Path(proxies_dir)
    if not (proxies_dir / "manifest.json").exists():
        raise FileNotFoundError(f"{proxies_dir}/manifest.json not found: train proxies with `dsdm proxies train`")
    pmanifest = read_json(proxies_dir / "manifest.json")
    if pmanifest["pool_fingerprint"] != pool.fingerprint:
        raise ValueError(f"{proxies_dir} was trained on another pool (fingerprint differs from {pool_dir})")
    models = [str((proxies_dir / m).resolve()) for m in pmanifest["models"]]
    device, why = resolve_device(cfg.device)
    slice_ = {
        "featurize": _cfg_dict(cfg),
        "proxies": models,
        "pool_fingerprint": pool.fingerprint,
        "sketch_version": SKETCH_VERSION,
        **_rng_record(cfg, device),
    }
    if is_done(out_dir, slice_, force=force):
        log(f"{out_dir}: already featurized with this configuration; nothing to do")
        return out_dir
    if force:
        clear_done(out_dir)
    log(f"device {why}")
    started = time.time()
    write_json(
        out_dir / "manifest.json",
        {**slice_, "pool": str(Path(pool_dir).resolve()), "num_proxies": len(models), "num_examples": len(pool)},
    )
    for m, model_dir in enumerate(models):
        featurize_proxy(pool, load_model(model_dir), out_dir / f"proxy_{m}", cfg, m, device)
    mark_done(out_dir, slice_, started=started)
    return out_dir
