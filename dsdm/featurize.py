"""Featurize: the feature store of projected per-example gradients, one directory per proxy, filled shard by shard
(TRAK, Park et al. 2023, §3; docs/method.md §3.2–3.7). The sketches themselves (output function, dense / SRHT /
factorized projectors) live in dsdm.sketch and are re-exported here for existing callers.

A store holds features.npy (N, dim) float16/32, q.npy (N,), done.npy (N,) (the per-shard completion record) and,
per finished group of gram_group consecutive shards, the group's Gram grams/gram_<a>_<b>.npy (float64), reduced in
group order into gram.npy (docs/estimator.md "Feature store"). The Gram is a pure function of the stored (rounded)
rows: a group's partial is summed from features.npy, in row order, by whichever process finishes the group's last
shard, so a killed, resumed, sliced or Ray-filled store reduces to the same bits. On CPU it is summed in float64 with
numpy; on a GPU on the device (gram="float64": float64 addmm; gram="float32": a float32 sum per shard added into the
float64 total, faster on GPUs with slow float64; its error against the all-float64 sum is measured in
docs/benchmarks.md and bounded in tests/test_sketch.py). batch_size = 0 picks the batch from free GPU memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from dsdm.io import pwrite_rows
from dsdm.shards import EXECUTOR_KEYS
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
    feature_layout,
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
from dsdm.train import SECOND_MOMENTS_FILE

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
    precondition: str = "none"
    """none | adam: scale every gradient by V^-1/4, V = the proxy's final AdamW second moment (optimizer_v.safetensors
    beside its weights, written by dsdm.train), so the kernel's inner product is Adam's update metric. Factorized: the
    rank-1 (Adafactor) fit of V per Linear; dense: exact (dsdm.sketch, "Adam preconditioning")."""
    gram: str = "float64"
    """Gram accumulation: float64 (numpy on CPU, float64 addmm on a GPU) | float32 (float32 per shard, added into
    the float64 total; relative error ~1e-7, docs/benchmarks.md)."""
    storage_dtype: str = "float16"
    """float16 | float32 for features.npy. The Gram matrix is always reduced in float64."""
    batch_size: int = 16
    """Examples per forward/backward; 0 = from free GPU memory (auto_batch_size; 16 on CPU)."""
    shard_size: int = 1024
    """Examples per shard: the unit of resume and of parallel work (disjoint rows of one store)."""
    gram_group: int = 256
    """Shards per Gram partial: a store keeps at most ceil(shards / gram_group) float64 (dim, dim) partials while it
    is filled (4 dim / (shard_size gram_group) of the features' size in float16; deleted once gram.npy is written).
    It fixes the summation order, so it is part of the result (docs/estimator.md "Feature store")."""
    seed: int = 0
    """Projection seed; proxy m uses the streams (seed, m, ...)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    executor: str = "local"
    """local (one process, progress in examples/s) | ray (a pool of Ray actors, each opening the pool and the proxy
    from their paths once and filling the shards it is handed: the same store, bitwise the same numbers)."""
    ray_address: str | None = None
    """executor=ray: None starts a local Ray cluster; 'auto' joins the cluster this machine is in (`ray start`);
    'ray://HOST:PORT' a remote head."""
    ray_worker_cpus: float = 1
    """executor=ray: CPUs (and torch threads) per actor; one actor per GPU instead when device is cuda."""

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
        if self.precondition not in ("none", "adam"):
            raise ValueError(f"precondition must be none or adam, got {self.precondition!r}")
        if self.gram not in ("float64", "float32"):
            raise ValueError(f"gram must be float64 or float32, got {self.gram!r}")
        if self.ray_worker_cpus <= 0:
            raise ValueError(f"ray_worker_cpus must be positive, got {self.ray_worker_cpus}")
        if self.batch_size < 0 or self.shard_size <= 0:
            raise ValueError("batch_size must be >= 0 (0 = auto) and shard_size positive")
        if self.gram_group <= 0:
            raise ValueError(f"gram_group must be positive, got {self.gram_group}")


# Where and how the work runs, not what it computes: never part of a store's completion key.
_WHERE_NOT_WHAT = ("device", *EXECUTOR_KEYS)
# Fields added after stores existed: left out of the completion key at their defaults, so those stores stay valid.
_NEW_DEFAULTS = {
    "dense_rng": "pcg64",
    "precision": "float32",
    "gram": "float64",
    "gram_group": 256,
    "precondition": "none",
}
# The on-disk layout of a store being filled (manifest "store_version"; absent = 1). 1: one Gram file per shard
# under shards/; 2: done.npy records shards, grams/ one Gram per group. Finished stores read the same in both.
STORE_VERSION = 2
# Rows per Gram product: fixed (not the batch size, which may be chosen from free memory), so the Gram of a range
# of stored rows is the same bits whoever computes it.
_GRAM_BLOCK = 1024


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
    start: int,
    stop: int,
    *,
    store: Path,
    pool,
    sketch,
    device,
    batch_size: int,
    gram: str = "float64",
    shard_size: int | None = None,
    gram_group: int | None = None,
    bar=None,
) -> str:
    """Fill rows [start, stop) of features.npy and q.npy, then set done[start:stop] (the shard's completion record,
    after the rows are written and fsynced). Skips a shard whose rows are all done. With gram_group: if this
    finishes every shard of the group of gram_group shards of shard_size rows it belongs to, also writes that group's
    Gram partial (reduce_group); a group left unreduced (a race, a kill) is reduced by the next featurize or
    --finalize."""
    feats = np.load(store / "features.npy", mmap_mode="r")  # read-only: the rows go in by pwrite_rows
    done = np.load(store / "done.npy", mmap_mode="r")
    if done[start:stop].all():
        return "skipped"
    on_device = torch.device(device).type != "cpu"
    store_dtype = torch.float16 if feats.dtype == np.float16 else torch.float32
    # the shard's rows, gathered in RAM (shard_size x dim in the storage dtype) and written as one byte range
    rows = np.empty((stop - start, feats.shape[1]), dtype=feats.dtype)
    qs = np.empty(stop - start, dtype=np.float32)
    for b0 in range(start, stop, batch_size):
        idx = np.arange(b0, min(b0 + batch_size, stop))
        at = slice(b0 - start, b0 - start + len(idx))
        tokens, mask = pool.batch(idx, pad_to=pool.seq_len)
        score = mask.copy()
        score[:, 0] = False
        if on_device:  # features go to the host only rounded to the storage dtype
            g, qb = sketch.sketch(torch.as_tensor(tokens, device=device), torch.as_tensor(score, device=device))
            rows[at] = g.detach().float().to(store_dtype).cpu().numpy()
            qs[at] = qb.detach().float().cpu().numpy()
        else:
            g, qb = featurize_batches(sketch, [(tokens, score)], device)
            rows[at] = g.astype(feats.dtype)
            qs[at] = qb
        if bar is not None:
            bar.update(len(idx))
    # byte-range writes with fsync, never a writable memmap: a memmap writes back whole pages, and on NFS a page
    # shared with another host's shard could go back with its stale bytes (docs/estimator.md, "Feature store").
    # The done bits last: they are the shard's completion record.
    pwrite_rows(store / "features.npy", start, rows)
    pwrite_rows(store / "q.npy", start, qs)
    pwrite_rows(store / "done.npy", start, np.ones(stop - start, dtype=np.bool_))
    if gram_group is not None:
        a, b = group_of(start, shard_size, gram_group, len(done))
        if done[a:b].all() and not _gram_path(store, a, b).exists():
            reduce_group(store, a, b, shard_size, device, gram)
    return "done"


def group_of(row: int, shard_size: int, gram_group: int, n: int) -> tuple[int, int]:
    """The rows [a, b) of the Gram group holding `row`: gram_group consecutive shards of a plan of n rows."""
    span = shard_size * gram_group
    return row // span * span, min(row // span * span + span, n)


def rows_gram(feats: np.ndarray, start: int, stop: int, device, gram: str = "float64", acc=None):
    """acc + the Gram of stored rows [start, stop) of feats (N, dim), summed in blocks of _GRAM_BLOCK rows in row
    order: numpy float64 on CPU (gram="float64"); else torch on `device`, float64 addmm, or (gram="float32") the
    blocks summed in float32 and then added into the float64 acc. acc: (dim, dim) float64 numpy array or tensor on
    `device` (None: zeros). Returns acc."""
    dim = feats.shape[1]
    if torch.device(device).type == "cpu" and gram == "float64":
        acc = np.zeros((dim, dim), dtype=np.float64) if acc is None else acc
        for b0 in range(start, stop, _GRAM_BLOCK):
            blk = np.asarray(feats[b0 : min(b0 + _GRAM_BLOCK, stop)], dtype=np.float64)
            acc += blk.T @ blk
        return acc
    acc = torch.zeros(dim, dim, dtype=torch.float64, device=device) if acc is None else acc
    part = acc if gram == "float64" else torch.zeros(dim, dim, dtype=torch.float32, device=device)
    for b0 in range(start, stop, _GRAM_BLOCK):
        blk = torch.from_numpy(np.array(feats[b0 : min(b0 + _GRAM_BLOCK, stop)])).to(device, part.dtype)
        part.addmm_(blk.t(), blk)
    if part is not acc:
        acc += part.double()
    return acc


def reduce_group(store: Path, start: int, stop: int, shard_size: int, device, gram: str = "float64") -> Path:
    """Write grams/gram_<start>_<stop>.npy (atomically): the Gram of the group's stored rows, the sum over its
    shards (of shard_size rows) in row order of each shard's rows_gram. Every row must be done."""
    from dsdm.io import save_npy

    feats = np.load(store / "features.npy", mmap_mode="r")
    if not np.load(store / "done.npy", mmap_mode="r")[start:stop].all():
        raise ValueError(f"{store}: rows {start}-{stop} are not all featurized; cannot reduce their Gram group")
    acc = None
    for a in range(start, stop, shard_size):  # the float32 mode sums each shard in float32, then adds it in float64
        acc = rows_gram(feats, a, min(a + shard_size, stop), device, gram, acc)
    path = _gram_path(store, start, stop)
    save_npy(path, acc if isinstance(acc, np.ndarray) else acc.cpu().numpy())
    return path


def featurize_proxy(
    pool,
    model,
    store: Path,
    cfg: FeaturizeConfig,
    proxy: int,
    device,
    shards=None,
    *,
    model_dir=None,
    shard_index: int | None = None,
    num_shards: int | None = None,
    finalize: bool = False,
) -> Path:
    """Featurize the whole pool with one proxy into `store` (or only `shards`, or slice `shard_index` of
    `num_shards` of its shard plan); once every shard is done, sum the groups' Gram partials, in group order, into
    gram.npy and delete them.

    executor=ray needs model_dir (the proxy's directory): each Ray actor loads it, and the pool, itself.
    Slices of one plan (a SLURM array) share the store; a whole-store run on a store being filled is refused
    (store_lock). finalize=True featurizes nothing: it reduces the Gram of a store filled by slices (first the
    partials of groups whose shards are all done but were not reduced), or says which shards are missing."""
    from dsdm.common import log, progress
    from dsdm.io import is_done, mark_done, read_json, save_npy, write_json
    from dsdm.shards import plan_shards, run_on_actors

    store = Path(store)
    slice_ = {"featurize": _cfg_dict(cfg), "proxy": proxy, "pool": pool.fingerprint, "sketch_version": SKETCH_VERSION}
    slice_.update(_rng_record(cfg, device))
    if model_dir is not None and Path(model_dir).name != f"proxy_{proxy}":
        # a checkpoint member (proxy.snapshots): member index m no longer implies the model, so the key names it
        # (left out for proxy_<m>, so the stores made before snapshots existed stay valid)
        slice_["model"] = "/".join(Path(model_dir).parts[-2:])
    if is_done(store, slice_):
        log(f"{store}: already featurized, skipping")
        return store
    with store_lock(store, shared=num_shards is not None and not finalize):
        started = time.time()
        if _old_layout(store):
            log(
                f"{store}: partly filled by an older dsdm (store format 1, a Gram file per shard in shards/); "
                f"resuming it from its done rows as format {STORE_VERSION} (Grams summed from features.npy, shards/ "
                "deleted at the end)"
            )
        plan = plan_shards(len(pool), cfg.shard_size)
        groups = plan_shards(len(pool), cfg.shard_size * cfg.gram_group)
        if finalize:
            dim = _finalize_dim(store, slice_, read_json)
            mine, todo = plan, []
        else:
            sketch = build_sketch(model.to(device), cfg, proxy, device, model_dir)
            batch_size = cfg.batch_size or auto_batch_size(sketch, pool, device)
            dim = sketch.dim
            _refuse_other_settings(store, slice_, read_json)
            init_store(store, len(pool), dim, cfg.storage_dtype)
            manifest = {**slice_, "store_version": STORE_VERSION, "num_examples": len(pool), "feature_dim": dim}
            write_json(store / "manifest.json", manifest)
            mine = shards if shards is not None else shard_slice(plan, shard_index, num_shards)
            done = np.load(store / "done.npy", mmap_mode="r")
            todo = [(a, b) for a, b in mine if not done[a:b].all()]
            what = f"{cfg.projector}, k={cfg.proj_dim}, dim={dim}"
            log(f"{store}: {len(todo)} of {len(plan)} shards to featurize ({what})")
        grouping = dict(gram=cfg.gram, shard_size=cfg.shard_size, gram_group=cfg.gram_group)
        if todo and cfg.executor == "local":  # one bar in examples/s with ETA
            fn = partial(
                featurize_shard, store=store, pool=pool, sketch=sketch, device=device, batch_size=batch_size, **grouping
            )
            with progress(total=sum(b - a for a, b in todo), desc=f"featurize proxy {proxy}", unit="ex") as bar:
                for a, b in todo:
                    fn(a, b, bar=bar)
        elif todo:  # disjoint row ranges of the same store, filled by Ray actors
            if model_dir is None:
                raise ValueError(
                    "executor=ray needs the proxy's directory (model_dir): each Ray worker loads it itself"
                )
            gpu = torch.device(device).type == "cuda"
            worker = dict(
                store=str(store.resolve()),
                pool_dir=str(Path(pool.path).resolve()),
                model_dir=str(Path(model_dir).resolve()),
                cfg=cfg,
                proxy=proxy,
                device="cuda" if gpu else str(device),  # Ray's CUDA_VISIBLE_DEVICES names the actor's GPU
                batch_size=batch_size,
            )
            run_on_actors(
                ShardWorker,
                worker,
                todo,
                ray_address=cfg.ray_address,
                num_cpus=cfg.ray_worker_cpus,
                num_gpus=1 if gpu else 0,
                desc=f"featurize proxy {proxy}",
            )
        # Groups finished but not reduced (a process killed after a group's last shard, two shards finishing together,
        # a group split between slices): reduce those touching this run's shards, from their stored rows.
        done = np.load(store / "done.npy", mmap_mode="r")
        for a, b in groups:
            if any(s0 < b and a < s1 for s0, s1 in mine) and done[a:b].all() and not _gram_path(store, a, b).exists():
                reduce_group(store, a, b, cfg.shard_size, device, cfg.gram)
        missing = [(a, b) for a, b in plan if not done[a:b].all()]
        if missing:
            if finalize:
                a, b = missing[0]
                raise ValueError(
                    f"{store}: {len(missing)} of {len(plan)} shards are not featurized yet (the first: rows {a}-{b}); "
                    "finish the --shard-index jobs (or run featurize without --shard-index) before --finalize"
                )
            log(f"{store}: {len(missing)} shards still to do; the Gram is reduced when all are done (--finalize)")
            return store
        if num_shards is not None and not finalize:  # slices share the store: one --finalize, alone, reduces it
            log(f"{store}: every shard is done; reduce the Gram with --finalize")
            return store
        gram = np.zeros((dim, dim), dtype=np.float64)
        for a, b in groups:  # fixed order: the reduction is bitwise reproducible
            gram += np.load(_gram_path(store, a, b))
        save_npy(store / "gram.npy", gram)
        # summed into gram.npy: the partials only cost disk now. Deleted before the record, so a finished store never
        # keeps them; a kill in between makes the next run sum them again from the stored rows.
        for folder in ("grams", "shards"):  # shards/: a format-1 store's Gram files (an empty pool has neither)
            if (store / folder).exists():
                shutil.rmtree(store / folder)
        mark_done(store, slice_, started=started, feature_dim=dim)
    return store


def shard_slice(plan: list[tuple[int, int]], index: int | None, count: int | None) -> list[tuple[int, int]]:
    """Slice `index` of `count` of a shard plan: consecutive shards, sizes differing by at most one (the whole plan
    when count is None). Every process of a SLURM array computes the same plan, so the slices cover it exactly."""
    if count is None:
        return plan
    if index is None or not 0 <= index < count:
        raise ValueError(f"--shard-index must be in [0, {count}) with --num-shards {count}, got {index}")
    return plan[index * len(plan) // count : (index + 1) * len(plan) // count]


def init_store(store: Path, n: int, dim: int, storage_dtype: str) -> None:
    """Create features.npy (n, dim), q.npy and done.npy once, as sparse files (nothing is written but the header:
    unwritten rows read as zeros, so a 6 TB store is not written twice), or open the existing ones (shape and dtype
    checked). Under an exclusive lock, so processes starting together on one store never replace each other's
    arrays."""
    from dsdm.io import open_memmap

    store.mkdir(parents=True, exist_ok=True)
    fd = os.open(store / ".init.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for name, shape, dtype in (
            ("features.npy", (n, dim), storage_dtype),
            ("q.npy", (n,), np.float32),
            ("done.npy", (n,), np.bool_),
        ):
            open_memmap(store / name, shape, dtype)  # no fill: numpy seeks to the end, the file stays sparse
    finally:
        os.close(fd)


class StoreBusy(ValueError):
    """Another featurize holds the store in a mode that excludes this one."""


@contextlib.contextmanager
def store_lock(store: Path, shared: bool = False):
    """Hold `store` for featurizing: shared by slices of one shard plan (--shard-index/--num-shards: they fill
    disjoint rows), exclusive for a whole-store run or --finalize. A conflicting holder is refused at once, naming
    it (pid and host). The flock dies with its process, so a killed run leaves no stale lock."""
    store.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    fd = os.open(store / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    me = store / f".holder.{host}.{pid}"
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = ", ".join(_holders(store, host)) or "holder unknown"
            raise StoreBusy(
                f"{store} is being filled by another dsdm featurize ({holders}); wait for it to finish or stop it "
                "(slices of one plan, --shard-index I --num-shards N, may share a store)"
            ) from None
        for stale in store.glob(f".holder.{host}.*"):  # records left by killed runs on this host: the flock is ours now
            other = stale.name.rpartition(".")[2]
            if other.isdigit() and int(other) != pid and not Path(f"/proc/{other}").exists():
                stale.unlink(missing_ok=True)
        me.write_text(f"pid {pid} on {host} ({'a shard slice' if shared else 'the whole store'})")
        yield
    finally:
        me.unlink(missing_ok=True)
        os.close(fd)


def _holders(store: Path, host: str) -> list[str]:
    """The holder records in `store`, less those of dead processes on this host (killed without cleaning up)."""
    out = []
    for path in sorted(store.glob(".holder.*")):
        h, _, pid = path.name[len(".holder.") :].rpartition(".")
        if h == host and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            continue
        try:
            out.append(path.read_text().strip())
        except FileNotFoundError:  # it finished while we looked
            pass
    return out


def _gram_path(store: Path, start: int, stop: int) -> Path:
    """The Gram partial of the group of rows [start, stop)."""
    return store / "grams" / f"gram_{start:010d}_{stop:010d}.npy"


def _old_layout(store: Path) -> bool:
    """Whether `store` was partly filled by store format 1 (a Gram file per shard under shards/). Format 1 set a
    shard's done bits only after its rows and its Gram file, so format 2 resumes it exactly from done.npy; the old
    Gram files are ignored and deleted with the partials."""
    old = store / "shards"
    return old.is_dir() and next(old.glob("gram_*.npy"), None) is not None


def _refuse_other_settings(store: Path, slice_: dict, read_json) -> None:
    """A store partly filled with other settings (another seed, k, projector, proxy or pool) must not be resumed:
    its done rows would be kept beside rows of these settings, and the Gram would sum both."""
    from dsdm.io import _diff_keys

    if not (store / "manifest.json").exists() or not (store / "done.npy").exists():
        return
    old = read_json(store / "manifest.json")
    changed = _diff_keys({k: old.get(k) for k in slice_}, slice_)
    if changed and np.load(store / "done.npy", mmap_mode="r").any():
        raise ValueError(
            f"{store}: partly featurized with other settings (changed: {', '.join(changed)}); "
            "delete it or featurize into another --out"
        )


def _finalize_dim(store: Path, slice_: dict, read_json) -> int:
    """The feature dim of a store filled by slices, after checking it was filled with this configuration."""
    if not (store / "manifest.json").exists():
        raise ValueError(f"{store}: nothing to finalize (no manifest.json); run the --shard-index jobs first")
    manifest = read_json(store / "manifest.json")
    if {k: manifest.get(k) for k in slice_} != slice_:
        raise ValueError(f"{store} was filled with other settings than these; finalize with the jobs' own config")
    return int(manifest["feature_dim"])


class ShardWorker:
    """A Ray actor of featurize: opens the pool and the proxy from their paths once (nothing big travels through
    Ray), builds the sketch, then fills the shards it is handed with featurize_shard."""

    def __init__(self, store, pool_dir, model_dir, cfg, proxy, device, batch_size):
        from dsdm.model import load_model
        from dsdm.pool import Pool

        torch.set_num_threads(max(1, int(cfg.ray_worker_cpus)))  # as many threads as CPUs reserved
        self.store, self.pool, self.device, self.batch_size, self.cfg = (
            Path(store),
            Pool(pool_dir),
            device,
            batch_size,
            cfg,
        )
        self.sketch = build_sketch(load_model(model_dir).to(device), cfg, proxy, device, model_dir)

    def run(self, start: int, stop: int) -> str:
        return featurize_shard(
            start,
            stop,
            store=self.store,
            pool=self.pool,
            sketch=self.sketch,
            device=self.device,
            batch_size=self.batch_size,
            gram=self.cfg.gram,
            shard_size=self.cfg.shard_size,
            gram_group=self.cfg.gram_group,
        )


def second_moments_path(model_dir: str | Path) -> Path:
    """Where dsdm.train saved a proxy's AdamW second moments; a one-line error with the fix if it is missing."""
    path = Path(model_dir) / SECOND_MOMENTS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: featurize.precondition=adam needs the proxy's optimizer state, which dsdm saves since "
            "2026-11-29; retrain the proxies (`dsdm proxies train ... --force`) or set precondition=none"
        )
    return path


def second_moments_of(model_dir: str | Path) -> dict:
    """The AdamW second moments dsdm.train saved beside a proxy's weights, {parameter name: v}."""
    from safetensors.torch import load_file

    return load_file(str(second_moments_path(model_dir)))


def build_sketch(model, cfg: FeaturizeConfig, proxy: int, device, model_dir: str | Path | None = None):
    """The sketch `cfg` describes for proxy `proxy` (scoring builds the same one for target gradients). model_dir:
    where the proxy was loaded from (its optimizer state, for precondition=adam)."""
    moments = None
    if cfg.precondition == "adam":
        if model_dir is None:
            raise ValueError("precondition=adam needs the proxy's directory (its optimizer_v.safetensors)")
        moments = second_moments_of(model_dir)
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
        moments,
    )


def _rng_record(cfg: FeaturizeConfig, device) -> dict:
    """{"projection_rng": ...} when the i.i.d. dense matrix comes from a device generator; {} for the default
    (device-independent) stream, so stores made before this field existed keep their completion key."""
    if cfg.projector == "dense" and cfg.dense_projection == "rademacher" and cfg.dense_rng != "pcg64":
        return {"projection_rng": projection_rng(cfg.dense_rng, device)}
    return {}


def _cfg_dict(cfg) -> dict:
    from dsdm.config import to_dict, without_new_defaults

    out = {k: v for k, v in to_dict(cfg).items() if k not in _WHERE_NOT_WHAT}
    return without_new_defaults(out, _NEW_DEFAULTS)


def run(
    pool_dir: str | Path,
    proxies_dir: str | Path,
    out_dir: str | Path,
    cfg: FeaturizeConfig,
    force: bool = False,
    shard_index: int | None = None,
    num_shards: int | None = None,
    finalize: bool = False,
):
    """Featurize the pool with every proxy of `proxies_dir` (written by `dsdm proxies train`) into out_dir/proxy_<m>/.

    Writes out_dir/manifest.json (pool, proxies, config) first, the stores, then out_dir/_done.json once every
    store is complete. shard_index/num_shards: this process fills only its slice of each store's shards (one job of
    a SLURM array); finalize: reduce the Gram of stores the slices filled (see featurize_proxy).
    """
    from dsdm.common import log, resolve_device
    from dsdm.io import clear_done, is_done, mark_done, read_json, read_record, write_json
    from dsdm.model import load_model
    from dsdm.pool import Pool

    pool, out_dir = Pool(pool_dir), Path(out_dir)
    proxies_dir = Path(proxies_dir)
    if not (proxies_dir / "manifest.json").exists():
        raise FileNotFoundError(f"{proxies_dir}/manifest.json not found: train proxies with `dsdm proxies train`")
    pmanifest = read_json(proxies_dir / "manifest.json")
    if "config" in pmanifest and not read_record(proxies_dir):
        # written by `dsdm proxies train`, whose record is missing: a retrain under way (or killed) may have half
        # rewritten a model. (A manifest written by hand for models trained elsewhere has no record to check.)
        raise ValueError(f"{proxies_dir} is not finished (no _done.json): finish `dsdm proxies train` first")
    if pmanifest["pool_fingerprint"] != pool.fingerprint:
        raise ValueError(f"{proxies_dir} was trained on another pool (fingerprint differs from {pool_dir})")
    models = [str((proxies_dir / m).resolve()) for m in pmanifest["models"]]
    if cfg.precondition == "adam" and not finalize:
        for model_dir in models:  # before any work: a proxy without its optimizer state stops the run here
            second_moments_path(model_dir)
    device, why = resolve_device(cfg.device)
    slice_ = {
        "featurize": _cfg_dict(cfg),
        "proxies": models,
        "pool_fingerprint": pool.fingerprint,
        "sketch_version": SKETCH_VERSION,
        **_rng_record(cfg, device),
    }
    # force redoes the stores even when the settings match (is_done): the runner passes it when an input changed
    # (e.g. the proxies were retrained), which this slice of paths and settings cannot see
    if is_done(out_dir, slice_, force=force):
        log(f"{out_dir}: already featurized with this configuration; nothing to do")
        return out_dir
    if force:
        clear_done(out_dir)
        if shard_index is None and not finalize:  # a whole-store run; slices of an array must not delete each other
            for m in range(len(models)):
                shutil.rmtree(out_dir / f"proxy_{m}", ignore_errors=True)
    log(f"device {why}")
    started = time.time()
    write_json(
        out_dir / "manifest.json",
        {**slice_, "pool": str(Path(pool_dir).resolve()), "num_proxies": len(models), "num_examples": len(pool)},
    )
    for m, model_dir in enumerate(models):
        model = None if finalize else load_model(model_dir)
        featurize_proxy(
            pool, model, out_dir / f"proxy_{m}", cfg, m, device, model_dir=model_dir,
            shard_index=shard_index, num_shards=num_shards, finalize=finalize,
        )  # fmt: skip
    if all(read_record(out_dir / f"proxy_{m}") for m in range(len(models))):
        mark_done(out_dir, slice_, started=started)
    return out_dir
