"""Datamodel scores from projected gradients: TRAK's one-step estimator, averaged over targets
(docs/method.md §3.5–3.7).

Per proxy m with pool features G_m (N, k), Gram K_m = G_m^T G_m and Q_m (N,):

    W_m = (K_m + lam_m I)^-1 [gbar_m(task_1) ... gbar_m(task_T)]     Cholesky in float64, (k, T)
    U_m = G_m W_m                                                      streamed in row blocks, (N, T)
    s(task) = mean_m U_m[:, task] * mean_m Q_m                         ensemble: kernel term and Q averaged apart
    s(mix)  = mean over tasks of s(task)                               equal task weights (the released lm_task_mix)

Never N x (number of target examples): targets enter only through their mean projected gradient gbar (linearity,
docs/method.md §3.6), and the pool is read block by block. Sign (dsdm.select): larger = more helpful; Q > 0 and the
margin output make a positive score mean "including z raises the target margin", i.e. lowers the target loss.

lam_m = ridge * mean(diag K_m) (relative ridge: scale-free, so the 1/sqrt(k) feature scale never matters). Default
ridge = 1e-2, chosen by the LDS sweep's rounds 3-4 (docs/estimator.md "The LDS sweep"): with several proxies (>= 4)
the whitening kernel predicted subset losses (squad LDS +0.16...+0.19 on 240 subsets) and the near-identity limit
(ridge 1e3, round 2's choice, which failed on held-out subsets) did not. With 1-2 proxies no ridge predicted.
ridge = 0 reproduces traker's default for N >> k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from dsdm.shards import EXECUTOR_KEYS, plan_shards, ray_init, run_on_actors
from dsdm.sketch import OUTPUTS


def solve(gram: np.ndarray, gbar: np.ndarray, ridge: float) -> np.ndarray:
    """W = (K + ridge * mean(diag K) I)^-1 gbar by Cholesky in float64. gram (k, k), gbar (k, T) -> (k, T)."""
    K = torch.as_tensor(np.asarray(gram), dtype=torch.float64)
    lam = ridge * float(K.diagonal().mean())
    K = K + lam * torch.eye(K.shape[0], dtype=torch.float64)
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) != 0:
        raise ValueError(
            f"the Gram matrix is not positive definite (ridge={ridge}); raise score.ridge (e.g. --set ridge=1e-2)"
        )
    return torch.cholesky_solve(torch.as_tensor(np.asarray(gbar), dtype=torch.float64), L).numpy()


def stream_scores(features: np.ndarray, W: np.ndarray, block: int = 65536, device=None) -> np.ndarray:
    """U = features @ W, reading `block` rows at a time (a memmap is never loaded whole). (N, k), (k, T) -> (N, T).

    All T targets (every task of every target of a run) share one pass over the store. On a GPU (`device` cuda)
    the blocks are read ahead by a thread, pinned, copied non_blocking and multiplied in float64 on the device;
    on CPU (device None or cpu) numpy float64, as always."""
    n = features.shape[0]
    out = np.empty((n, W.shape[1]), dtype=np.float64)
    if device is None or torch.device(device).type == "cpu":
        with threadpool_limits(1, user_api="blas"):  # see block_product: the bits must not depend on the core count
            for start in range(0, n, block):
                out[start : start + block] = block_product(features, W, start, start + block)
        return out
    from dsdm.train import prefetch

    device = torch.device(device)
    w = torch.as_tensor(np.asarray(W), dtype=torch.float64, device=device)

    def blocks():
        for start in range(0, n, block):
            yield start, torch.from_numpy(np.ascontiguousarray(features[start : start + block])).pin_memory()

    pending = []  # (start, device result): copied back one block late, so the GPU never waits for the host
    for start, rows in prefetch(blocks(), 2):
        u = rows.to(device, non_blocking=True).double() @ w
        pending.append((start, u.to("cpu", non_blocking=True)))
        if len(pending) > 1:
            s0, host = pending.pop(0)
            torch.cuda.synchronize(device)
            out[s0 : s0 + host.shape[0]] = host.numpy()
    torch.cuda.synchronize(device)
    for s0, host in pending:
        out[s0 : s0 + host.shape[0]] = host.numpy()
    return out


def block_product(features: np.ndarray, W: np.ndarray, start: int, stop: int) -> np.ndarray:
    """features[start:stop] in float64 @ W, (stop - start, T): the one product of the CPU pool pass, local or on Ray.

    Its float64 bits depend on more than the rows: OpenBLAS picks other kernels for a block's last rows (so the
    same row differs in the last bit under another `block`) and for another thread count. Both executors therefore
    cut the same blocks and call this under a 1-thread BLAS limit: bitwise the same scores on any core count (on
    machines of one CPU type; another BLAS kernel may round differently)."""
    return np.asarray(features[start:stop], dtype=np.float64) @ W


def stream_scores_ray(features: np.memmap, W: np.ndarray, cfg) -> np.ndarray:
    """stream_scores on Ray actors (ScoreConfig.executor=ray): the blocks of `cfg.block` rows of the local loop, each
    handed to an actor that returns its block_product (rows, T) float64; the parts are placed back in row order.
    Each actor memmaps the store from the memmap's path (the store must be on a filesystem the workers see); W
    travels once through the object store.
    features (N, k) np.memmap, W (k, T) -> (N, T), bitwise stream_scores(features, W, cfg.block) on CPU."""
    path = getattr(features, "filename", None)
    if path is None:
        raise ValueError(
            "score.executor=ray reads the feature store from its path: pass features as np.load(mmap_mode='r')"
        )
    ray = ray_init(cfg.ray_address)
    worker = dict(path=str(path), W=ray.put(np.ascontiguousarray(W, dtype=np.float64)))
    blocks = plan_shards(features.shape[0], cfg.block)
    parts = run_on_actors(
        RowBlockWorker, worker, blocks, ray_address=cfg.ray_address, num_cpus=cfg.ray_worker_cpus, desc="score blocks"
    )
    return np.concatenate(parts) if parts else np.empty((0, W.shape[1]))


class RowBlockWorker:
    """A Ray actor of stream_scores_ray: memmaps the features once and returns block_product of each row range
    [start, stop) it is handed, with one BLAS thread (as the local loop)."""

    def __init__(self, path: str, W: np.ndarray):
        self.features, self.W = np.load(path, mmap_mode="r"), W
        threadpool_limits(1, user_api="blas")  # this process only multiplies blocks: the limit stays for its life

    def run(self, start: int, stop: int) -> np.ndarray:
        return block_product(self.features, self.W, start, stop)


def ensemble(us: list[np.ndarray], qs: list[np.ndarray]) -> np.ndarray:
    """TRAK ensemble: mean of kernel terms times mean of Q. us: M x (N, T) or M x (N,); qs: M x (N,) -> like us[0]."""
    mean_u, mean_q = np.mean(us, axis=0), np.mean(qs, axis=0)
    return mean_u * mean_q.reshape(mean_q.shape + (1,) * (mean_u.ndim - 1))


def task_mix(per_task: np.ndarray) -> np.ndarray:
    """Equal weight per task, whatever its size (docs/method.md §2.4). (N, T) -> (N,)."""
    return per_task.mean(axis=1)


def mean_target_features(
    sketch, tokens: np.ndarray, score: np.ndarray, device, batch_size: int = 16, unit_columns: np.ndarray | None = None
) -> np.ndarray:
    """Mean projected gradient over target examples, (dim,) float64; a running sum, never (n, dim) at once.

    unit_columns: if given (column indices), each example's gradient is first divided by its norm over those columns
    (ScoreConfig.normalize = target|both: every target example weighs the same, whatever its length or loss)."""
    total = None
    for start in range(0, tokens.shape[0], batch_size):
        t = torch.as_tensor(tokens[start : start + batch_size], device=device)
        s = torch.as_tensor(score[start : start + batch_size], device=device)
        g = sketch.sketch(t, s)[0].detach().double().cpu().numpy()  # (B, dim)
        if unit_columns is not None:
            norms = np.linalg.norm(g[:, unit_columns], axis=1, keepdims=True)
            g = g / np.where(norms > 0, norms, 1.0)
        total = g.sum(0) if total is None else total + g.sum(0)
    return total / tokens.shape[0]


def kept_blocks(layout: list[tuple[str, int, int]], exclude: list[str]) -> list[tuple[str, int, int]]:
    """The layout's column blocks whose layer name starts with none of `exclude` (ScoreConfig.exclude_layers)."""
    kept = [b for b in layout if not any(b[0].startswith(prefix) for prefix in exclude)]
    if not kept:
        names = ", ".join(b[0] for b in layout)
        raise ValueError(f"score.exclude_layers={exclude} drops every feature block ({names}); keep at least one")
    return kept


def block_columns(blocks: list[tuple[str, int, int]]) -> np.ndarray:
    """The feature column indices of `blocks` (kept_blocks' output), in order."""
    return np.concatenate([np.arange(a, b) for _, a, b in blocks])


def unit_gram(features: np.ndarray, columns: np.ndarray, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Gram of the row-normalized features restricted to `columns`, and 1 / row norms (0 for an all-zero row).

    features (N, k) (a memmap is read `block` rows at a time) -> (len(columns), len(columns)) float64, (N,) float64."""
    c = len(columns)
    gram, inv = np.zeros((c, c)), np.empty(features.shape[0])
    for start in range(0, features.shape[0], block):
        rows = np.asarray(features[start : start + block], dtype=np.float64)[:, columns]
        norms = np.linalg.norm(rows, axis=1)
        part = inv[start : start + rows.shape[0]]
        np.divide(1.0, norms, out=part, where=norms > 0)
        part[norms == 0] = 0.0
        rows *= part[:, None]
        gram += rows.T @ rows
    return gram, inv


def kfac_factors(sketch, pool, indices: np.ndarray, device, batch_size: int = 16) -> dict:
    """K-FAC's projected factors of one proxy, averaged over the positions of the pool examples `indices`:
    {layer name: (S (k_o, k_o), A (k_i, k_i)) float64 numpy} (FactorizedSketch.factor_sums; docs/estimator.md
    round 12). The pool side's output function (the margin), as the stored features."""
    from dsdm.sketch import pool_score_mask

    sums, count = {}, 0
    for start in range(0, len(indices), batch_size):
        tokens, mask = (torch.as_tensor(a, device=device) for a in pool.batch(indices[start : start + batch_size]))
        part, n = sketch.factor_sums(tokens, pool_score_mask(mask.bool()))
        count += n
        for name, (S, A) in part.items():
            sums[name] = (S, A) if name not in sums else (sums[name][0] + S, sums[name][1] + A)
    if count == 0:
        raise ValueError("score.kernel=kfac: the sampled pool examples have no scored position")
    return {name: ((S / count).cpu().numpy(), (A / count).cpu().numpy()) for name, (S, A) in sums.items()}


def kfac_solve(factors: tuple[np.ndarray, np.ndarray], phi: np.ndarray, ridge: float) -> np.ndarray:
    """W = (S + lam_S I)^-1 Phi (A + lam_A I)^-1 for every column of phi: the inverse of the Kronecker factored
    curvature A (x) S applied to one layer's mean target gradient. phi (k_o * k_i, T), row-major (o, i) as the
    sketch flattens it -> (k_o * k_i, T); each lam = ridge x its factor's mean diagonal (as solve)."""
    S, A = factors
    ko, ki, t = S.shape[0], A.shape[0], phi.shape[1]
    x = solve(S, phi.reshape(ko, ki * t), ridge).reshape(ko, ki, t)  # S^-1 Phi
    y = solve(A, x.transpose(1, 0, 2).reshape(ki, ko * t), ridge)  # A^-1 (S^-1 Phi)^T; A is symmetric
    return y.reshape(ki, ko, t).transpose(1, 0, 2).reshape(ko * ki, t)


def kernel_term(
    features, gram: np.ndarray, gbar: np.ndarray, cfg, layout, device=None, factors: dict | None = None
) -> np.ndarray:
    """u = G' W for one proxy under the kernel switches of `cfg` (ScoreConfig). -> (N, T) float64.

    features (N, k), gram (k, k) = G^T G of the stored features, gbar (k, T) the targets' mean gradients (already
    unit-normalized per example if cfg.normalize asks), layout: feature_layout's column blocks. G' keeps the columns
    of the layers not excluded, each row divided by its norm over them when cfg.normalize is pool|both (the Gram is
    then recomputed from the features, one streamed pass). kernel=global: W = (K' + lam I)^-1 gbar' (TRAK);
    per_layer: the same solve per layer block of K' (block-diagonal kernel, each block with its own relative ridge);
    kfac: per layer block, kfac_solve with that layer's `factors` (kfac_factors) instead of the Gram.
    W gets zero rows for dropped columns, so the pool is streamed once, unsliced."""
    blocks = kept_blocks(layout, cfg.exclude_layers)
    columns = block_columns(blocks)
    inv_norm = None
    if cfg.normalize in ("pool", "both"):
        sub_gram, inv_norm = unit_gram(features, columns, cfg.block)
    else:
        sub_gram = np.asarray(gram)[np.ix_(columns, columns)]
    g = np.asarray(gbar)[columns]
    if cfg.kernel in ("per_layer", "kfac"):
        if cfg.kernel == "kfac" and factors is None:
            raise ValueError("score.kernel=kfac needs the proxy's K-FAC factors (kfac_factors)")
        w_sub, offset = np.zeros_like(g), 0
        for name, a, b in blocks:
            part = slice(offset, offset + b - a)
            if cfg.kernel == "kfac":
                w_sub[part] = kfac_solve(factors[name], g[part], cfg.ridge)
            else:
                w_sub[part] = solve(sub_gram[part, part], g[part], cfg.ridge)
            offset += b - a
    else:
        w_sub = solve(sub_gram, g, cfg.ridge)
    W = np.zeros((features.shape[1], g.shape[1]))
    W[columns] = w_sub
    if cfg.executor == "ray":  # the pool-sized product on Ray actors; everything above stays here
        u = stream_scores_ray(features, W, cfg)
    else:
        u = stream_scores(features, W, cfg.block, device)
    return u if inv_norm is None else u * inv_norm[:, None]


# -----------------------------------------------------------------------------
# IO: `dsdm score`


@dataclass
class ScoreConfig:
    ridge: float = 1e-2
    """Relative ridge: lam = ridge * mean(diag K) per proxy. 1e-2 was chosen by the LDS sweep (docs/estimator.md
    "The LDS sweep", rounds 3-4; it needs >= 4 proxies to predict); 0 is traker's exact inverse, 1e3 the
    near-identity limit (round 2's choice, which did not hold on fresh subsets)."""
    block: int = 65536
    """Pool rows per block when streaming G W."""
    use_q: bool = True
    """Multiply by the mean Q (out-to-loss term); false is the ablation."""
    target_batch_size: int = 16
    """Target examples per forward/backward when computing gbar."""
    normalize: str = "none"
    """Unit-normalize projected gradients (cosine, as LESS and TrackStar do, docs/estimator.md "Variants"): none |
    pool (each pool example's feature row, Gram recomputed from the normalized rows) | target (each target example's
    gradient before the mean) | both."""
    kernel: str = "global"
    """global (one Gram over all feature columns: TRAK) | per_layer (block-diagonal: each nn.Linear's columns solved
    against their own Gram block; factorized stores; a dense store is one block, so it equals global) | kfac (per
    layer, the Kronecker-factored curvature of the projected token statistics, estimated from kfac_examples pool
    examples; factorized stores only; docs/estimator.md round 12)."""
    kfac_examples: int = 1024
    """kernel=kfac: the seeded sample of pool examples each proxy's K-FAC factors are estimated from."""
    exclude_layers: list[str] = field(default_factory=list)
    """Drop the feature columns of the Linear layers whose name starts with any of these (e.g. [lm_head]); factorized
    stores only (a dense store's columns mix all parameters)."""
    num_proxies: int = 0
    """Ensemble only the first m proxies of the store (0 = all): the ensemble-size ablation without re-featurizing."""
    target_output: str = "margin"
    """The target side's output function: margin (mean log(p / (1 - p)), TRAK's, as on the pool side) | logp (mean
    log p of the continuation, minus the loss the experiments measure; docs/estimator.md round 10)."""
    executor: str = "local"
    """Where the pool pass u = G W runs (how, never what: no part of a stage's key): local (this process, on
    `device`) | ray (Ray actors on CPUs, each memmapping the store from its path and multiplying the row blocks of
    `block` rows it is handed, in numpy float64: bitwise the local CPU scores). Target gradients, the solve and, for
    normalize=pool|both, the unit-norm Gram pass (a reduction) stay in this process."""
    ray_address: str | None = None
    """executor=ray: None starts a local Ray cluster; 'auto' joins the cluster this machine is in (`ray start`);
    'ray://HOST:PORT' a remote head."""
    ray_worker_cpus: float = 1
    """executor=ray: CPUs per actor (one actor per that many CPUs of the cluster)."""
    tasks: list[str] = field(default_factory=list)
    """Task specs (dirs or JSONL, see dsdm.tasks); filled from --target."""

    def __post_init__(self):
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.normalize not in ("none", "pool", "target", "both"):
            raise ValueError(f"score.normalize must be none, pool, target or both, got {self.normalize!r}")
        if self.kernel not in ("global", "per_layer", "kfac"):
            raise ValueError(f"score.kernel must be global, per_layer or kfac, got {self.kernel!r}")
        if self.kfac_examples < 1:
            raise ValueError(f"score.kfac_examples must be >= 1, got {self.kfac_examples}")
        if self.num_proxies < 0:
            raise ValueError(f"score.num_proxies must be >= 0 (0 = all), got {self.num_proxies}")
        if self.target_output not in OUTPUTS:
            raise ValueError(f"score.target_output must be one of {', '.join(OUTPUTS)}, got {self.target_output!r}")
        if self.block <= 0:
            raise ValueError(f"block must be positive, got {self.block}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"score.executor must be local or ray, got {self.executor!r}")
        if self.ray_worker_cpus <= 0:
            raise ValueError(f"score.ray_worker_cpus must be positive, got {self.ray_worker_cpus}")


def load_features(features_dir: Path, device=None) -> tuple[dict, list[Path]]:
    """The featurize run's manifest and its finished per-proxy stores, in proxy order. With `device`: refuses a
    store whose i.i.d. projection came from another device's generator (FeaturizeConfig.dense_rng)."""
    from dsdm.featurize import SKETCH_VERSION
    from dsdm.io import DONE_FILE, read_json

    features_dir = Path(features_dir)
    if not (features_dir / "manifest.json").exists():
        raise FileNotFoundError(f"{features_dir}/manifest.json not found: run `dsdm featurize --out {features_dir}`")
    manifest = read_json(features_dir / "manifest.json")
    if manifest.get("sketch_version", 1) != SKETCH_VERSION:
        raise ValueError(
            f"{features_dir} was featurized with sketch version {manifest.get('sketch_version', 1)}, this dsdm "
            f"projects with version {SKETCH_VERSION} (a different random projection): its scores would be wrong. "
            f"Re-run `dsdm featurize --force --out {features_dir}`."
        )
    if manifest.get("projection_rng") and device is not None:
        from dsdm.sketch import projection_rng

        here = projection_rng("device", device)
        if manifest["projection_rng"] != here:
            raise ValueError(
                f"{features_dir} was featurized with the i.i.d. projection drawn by {manifest['projection_rng']}; "
                f"scoring here would draw it with {here} (another matrix). Score on that device (--device), or "
                f"re-featurize with featurize.dense_rng=pcg64 (the same matrix everywhere)."
            )
    stores = [features_dir / f"proxy_{m}" for m in range(manifest["num_proxies"])]
    unfinished = [str(s) for s in stores if not (s / DONE_FILE).exists()]
    if unfinished:
        raise ValueError(f"feature stores not finished: {unfinished}; rerun `dsdm featurize` (it resumes)")
    return manifest, stores


def score_tasks(features_dir: Path, task_specs: list[str], cfg: ScoreConfig, device) -> tuple[np.ndarray, list[str]]:
    """Per-task DsDm scores (N, T) float64 for the task specs, from a finished featurize run."""
    us, qs, names = score_tasks_per_proxy(features_dir, task_specs, cfg, device)
    return ensemble(us, qs), names


def score_tasks_per_proxy(
    features_dir: Path, task_specs: list[str], cfg: ScoreConfig, device
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Per proxy m: the kernel term u_m (N, T) float64 and Q_m (N,) (ones if not cfg.use_q), and the task names.
    `ensemble(us, qs)` gives the scores; validate-lds also ensembles the first m proxies to see the effect of M."""
    from dsdm.common import log, numpy_rng
    from dsdm.featurize import FeaturizeConfig, build_sketch
    from dsdm.model import load_model
    from dsdm.pool import Pool
    from dsdm.sketch import feature_layout
    from dsdm.tasks import encode_examples, load_task

    manifest, stores = load_features(features_dir, device)
    if cfg.num_proxies > len(stores):
        raise ValueError(f"score.num_proxies={cfg.num_proxies}, but {features_dir} has {len(stores)} proxies")
    stores = stores[: cfg.num_proxies or len(stores)]
    fcfg = FeaturizeConfig(**{**manifest["featurize"], "device": "cpu"})
    if cfg.exclude_layers and fcfg.projector != "factorized":
        raise ValueError("score.exclude_layers needs a factorized store (a dense projection mixes all parameters)")
    if cfg.kernel == "kfac" and fcfg.projector != "factorized":
        raise ValueError("score.kernel=kfac needs a factorized store (its per-layer Kronecker structure)")
    pool = Pool(manifest["pool"])
    tasks = [load_task(spec) for spec in task_specs]
    encoded = [encode_examples(pool.tokenizer, t.target, pool.seq_len, pool.eos_id) for t in tasks]
    us, qs = [], []
    for m, store in enumerate(stores):
        model = load_model(manifest["proxies"][m]).to(device)
        sketch = build_sketch(model, fcfg, m, device, manifest["proxies"][m])
        factors = None
        if cfg.kernel == "kfac":  # of the pool side's output function (the margin), as the stored features
            sample = np.sort(numpy_rng((m, 8_191)).choice(len(pool), min(cfg.kfac_examples, len(pool)), replace=False))
            factors = kfac_factors(sketch, pool, sample, device, cfg.target_batch_size)
        sketch.output = cfg.target_output  # the targets' output function; the stored pool features are the margin's
        layout = feature_layout(sketch)
        unit = None
        if cfg.normalize in ("target", "both"):
            unit = block_columns(kept_blocks(layout, cfg.exclude_layers))
        gbar = np.stack(
            [mean_target_features(sketch, tok, sc, device, cfg.target_batch_size, unit) for tok, _, sc in encoded], 1
        )  # (k, T)
        features = np.load(store / "features.npy", mmap_mode="r")
        us.append(kernel_term(features, np.load(store / "gram.npy"), gbar, cfg, layout, device, factors))
        q = np.load(store / "q.npy")
        qs.append(q if cfg.use_q else np.ones_like(q))
        log(f"proxy {m}: scored {len(tasks)} task(s)")  # no statistic here: it would be another pass over (N, T)
    return us, qs, [t.name for t in tasks]


def score_targets(
    features_dir: Path, targets: dict[str, list[str]], cfg: ScoreConfig, device
) -> dict[str, tuple[np.ndarray, list[str]]]:
    """score_tasks for several targets (name -> task specs) with ONE pass over each proxy's store: the distinct
    tasks of all targets are scored together (W has one column per task) and split per target afterwards.
    -> {name: (per-task scores (N, T_name) float64, task names)}."""
    specs = list(dict.fromkeys(str(s) for specs in targets.values() for s in specs))  # distinct, in order
    per_task, names = score_tasks(Path(features_dir), specs, cfg, device)
    return {
        name: (per_task[:, [specs.index(str(s)) for s in tspecs]], [names[specs.index(str(s))] for s in tspecs])
        for name, tspecs in targets.items()
    }


def run(features_dir: str | Path, task_specs: list[str], out: str | Path, cfg: ScoreConfig, device) -> Path:
    """Write `out` (N,) float32 task-mix scores, `<out>.tasks.npy` (N, T) and `<out>.json` (tasks, provenance)."""
    from dsdm.io import provenance, save_npy, write_json

    per_task, names = score_tasks(Path(features_dir), task_specs, cfg, device)
    out = Path(out)
    save_npy(out.with_suffix(".tasks.npy"), per_task.astype(np.float32))
    manifest, _ = load_features(Path(features_dir))
    write_json(
        out.with_suffix(".json"),
        {
            "method": "dsdm",
            "tasks": names,
            "task_specs": [str(s) for s in task_specs],
            "sign": "larger = more helpful to the target; select the k largest (dsdm.select)",
            "features": str(features_dir),
            "pool": manifest["pool"],
            "pool_fingerprint": manifest["pool_fingerprint"],
            "config": {k: v for k, v in vars(cfg).items() if k != "tasks" and k not in EXECUTOR_KEYS},
            **provenance(),  # no wall time here: artifacts are byte-identical across re-runs (it is in _done.json)
        },
    )
    save_npy(out, task_mix(per_task).astype(np.float32))  # last: the scores file exists only when all is written
    return out


def run_select(scores_path: str | Path, k: int, out_dir: str | Path, inverse: bool = False, docs: str = "none") -> dict:
    """`dsdm select`: the k largest scores (dsdm.select.top_k; bottom_k with inverse) -> out_dir/indices.npy (int64,
    best first) + selection.json through the one selection writer (dsdm.selections), optionally documents.jsonl /
    documents.parquet (decoded text of the selection), then _done.json."""
    from dsdm import selections
    from dsdm.io import mark_done, read_json, sha256_file
    from dsdm.pool import Pool
    from dsdm.select import bottom_k, top_k

    started = time.time()
    scores_path = Path(scores_path)
    if not scores_path.exists():
        raise FileNotFoundError(f"score file not found: {scores_path} (write one with `dsdm score`)")
    side = scores_path.with_suffix(".json")
    if not side.exists():
        raise FileNotFoundError(f"{side} not found: `dsdm select` reads the pool from the sidecar `dsdm score` writes")
    meta = read_json(side)
    pool = Pool(meta["pool"])
    scores = np.load(scores_path, mmap_mode="r")
    if scores.shape != (len(pool),):
        raise ValueError(f"{scores_path}: shape {scores.shape}, but the pool {pool.path} has {len(pool)} examples")
    if not 0 < k <= len(pool):
        raise ValueError(f"--k {k} must be between 1 and the pool size {len(pool)}")
    idx = (bottom_k if inverse else top_k)(np.asarray(scores), k)
    out_dir = Path(out_dir)
    method = "dsdm-inverse" if inverse else "dsdm"
    info = {}
    if docs != "none":
        info["documents"] = _write_documents(pool.path, idx, scores, out_dir, docs)
    record = selections.write(
        out_dir,
        idx,
        pool=pool,
        method=method,
        rule="bottom-k (k smallest scores), worst first" if inverse else "top-k (k largest scores), best first",
        seed=None,  # deterministic: no randomness in top-k (ties broken by lower index)
        target=meta.get("tasks") or [],
        target_specs=meta.get("task_specs") or [],
        config=meta.get("config"),
        scores_file=str(scores_path.resolve()),
        order="best-first",
        **info,
    )
    stage_cfg = {"method": method, "k": int(k), "scores_sha256": sha256_file(scores_path), "docs": docs}
    mark_done(out_dir, stage_cfg, started=started, stage="select")
    return record


def _write_documents(pool_dir, idx: np.ndarray, scores: np.ndarray, out_dir: Path, fmt: str) -> str:
    """Decoded text of the selected examples with their rank, index, score, doc_id and source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dsdm.io import atomic_path
    from dsdm.pool import Pool

    if pool_dir is None:
        raise ValueError("the score file has no sidecar naming its pool; cannot write documents")
    pool = Pool(pool_dir)
    meta = {name: pool.column(name, idx) for name in ("doc_id", "source")}  # only the selected rows
    table = pa.table(
        {
            "rank": np.arange(idx.size),
            "index": idx,
            "score": np.asarray(scores)[idx].astype(np.float32),
            "doc_id": meta["doc_id"],
            "source": meta["source"],
            "text": [pool.decode(int(i)) for i in idx],
        }
    )
    path = out_dir / f"documents.{fmt}"
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            pq.write_table(table, tmp)
        elif fmt == "jsonl":
            import json

            with open(tmp, "w", encoding="utf-8") as f:
                for row in table.to_pylist():
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            raise ValueError(f"--docs must be none, jsonl or parquet, got {fmt!r}")
    return path.name
