"""dsdm plan: what an experiment config will cost before any work runs, per stage: FLOPs, time on the named
hardware, disk, peak RAM / GPU memory, and warnings naming the knob that fixes them (issue 16, item 4).

CPU times come from a cost model calibrated on measured runs, not from FLOPs alone: at this project's sizes a micro
step is mostly fixed overhead and the LM head's softmax over V, and featurizing an example costs a fixed part on
top of a fraction of a training step. A training token costs

    t = overhead + body FLOPs / body_rate + head FLOPs / head_rate          (cpu_model(): 5.4 us, 125, 56 GFLOP/s)

with body = 6 (12 L d^2 + L T d) (the blocks and attention) and head = 6 V d (the tied LM head, whose (B, T, V)
logits and softmax run at under half the body's FLOP rate), least-squares fitted (relative error) to the 11 measured
throughputs in CPU_TRAIN_MEASURED (micro to a 5.29M-parameter GPT, V = 512 to 8,192; every one within 0.74-1.23x of the
fit). A featurized pool example costs feat_overhead + feat_steps x (one example's training step), solved through the two
measured featurize rates in CPU_FEATURIZE_MEASURED; scoring and evaluation are calibrated on the demo run's stage
records (DEMO_*), the baselines (a fixed part and one per pool token) on the demo's and the repro's. Every constant
names its source in docs/benchmarks.md. No GPU throughput has been measured yet (docs/benchmarks.md "GPU": not run), so
GPU times are FLOPs over the vendor's dense bf16 peak times an assumed 35% utilization, and say so. Disk sizes follow
the file formats (features N x dim x 2|4 bytes, one float64 Gram per shard, ...), each file rounded up to a 4 KiB block.
Plan against measured runs: docs/benchmarks.md "`dsdm plan` against measured runs".
"""

from __future__ import annotations

import functools
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A training step on 2 quiet CPU threads, float32, batch x T = 2,048 tokens: (preset, shape overrides, V, T, tokens/s).
CPU_TRAIN_MEASURED = [
    # docs/benchmarks.md "Learning regime", quiet throughput (dsdm.train.train for ~10 s per configuration)
    ("nano", {}, 512, 128, 62_790),
    ("nano", {}, 1024, 128, 54_455),
    ("nano", {}, 2048, 128, 38_080),
    ("nano", {}, 4096, 128, 19_084),
    ("micro", {}, 512, 128, 136_714),
    ("micro", {}, 1024, 128, 114_579),
    ("tiny", {}, 512, 128, 17_600),
    ("tiny", {}, 1024, 128, 15_088),
    ("mini", {}, 1024, 128, 9_672),
    ("nano", {}, 512, 256, 54_564),
    # docs/benchmarks.md "Featurize", arm train: 4 layers, d_model 256, V = 8,192, 24.88 examples/s of 128 tokens
    ("tiny", {"d_model": 256}, 8192, 128, 24.88 * 128),
]
# The factorized featurizer per pool example on the same cores: (preset, overrides, V, T, examples/s per proxy).
CPU_FEATURIZE_MEASURED = [
    ("tiny", {"d_model": 256}, 8192, 128, 30.62),  # docs/benchmarks.md "Featurize", arm factorized, k = 4096
    # docs/benchmarks.md "`dsdm plan` against measured runs": the demo's features record (2026-11-29, 4 nano
    # proxies, k = 1024, 20,348 examples each in 129.274 s). It replaces the micro-proxy demo's ~270 examples/s
    # (k = 256), an older featurizer, which over-planned nano features 2.3-2.8x.
    ("nano", {}, 512, 128, 4 * 20348 / 129.274),
]
# Dense projectors, docs/benchmarks.md "Featurize" (p = 5.29M, k = 4096, batch 16): exact per-example gradients take
# 1.20 s per batch (vs 16 / 24.88 s for a training step), the i.i.d. ±1 matrix regenerated per batch the rest of
# 62.25 s (linear in p x k: that section's fit), the SRHT the rest of 2.60 s (p padded to 2^23, O(p log p)).
DENSE_GRAD_STEPS = 1.20 / (16 / 24.88)
DENSE_IID_S = (62.25 - 1.20) / (5.29e6 * 4096)  # s per batch per p x k
DENSE_SRHT_S = (2.60 - 1.20) / 16 / (2**23 * 23)  # s per example per p_pad log2(p_pad)
# Stage records of two measured runs (docs/benchmarks.md "`dsdm plan` against measured runs"; 2026-11-29, 2 quiet
# cores, nano proxies and models, V = 512, T = 128): the demo (20,348 pool examples) and the repro
# at T = 3.77M tokens (125,876), each taken relative to the cost model above.
DEMO_SCORE = (18.477, 4 * 2419)  # scores/dsdm: s; proxy x target examples of the mix's 3 tasks
DEMO_EVAL = (4.475, 1743)  # eval/*: s per model (mean of 16); holdout examples per model (6 tasks, <= 300 each)
# scores/<method>_<target>: s for one target (SemDeDup: its one untargeted run) at (demo, repro) pool tokens. A fixed
# part (loading, the target's side, k-means set-up) and a per-pool-token part, solved through the two runs: one
# per-token rate from the demo alone over-planned the repro's baselines 2.6x.
BASELINE_RUNS = ((20348 * 128, 125876 * 128), {"semdedup": (28.979, 59.763), "dsir": (2.348, 11.890),
                                               "classifier": (4.723, 8.661)})  # fmt: skip
# Pool build, tokens/s: V = 512 on the demo documents (the demo's pool record, 2.60M tokens in 5.13 s) and V = 8,192
# on 200 MB of pseudo-words (docs/benchmarks.md "Pool build", 1 worker); log-linear in V between them.
TOKENIZE_PER_S = {512: 2_604_544 / 5.131, 8192: 267_653}
READ_BYTES_PER_S = 1e9  # assumed sequential read of a feature store while scoring (not yet benchmarked)
BASE_RSS = 250 << 20  # Python + torch + dsdm before any work: docs/benchmarks.md "Featurize" (~250 MiB)
BLOCK = 4096  # file system block: every small file (records, configs, tokenizers) takes at least one
GPU_HARDWARE = {  # name -> (assumed FLOP/s, memory bytes)
    "a100": (312e12 * 0.35, 80e9),
    "h200": (989e12 * 0.35, 141e9),
}
HARDWARE = ["cpu", *GPU_HARDWARE]
GPU_NOTE = "assumed: 35% of the bf16 peak (no GPU measurement yet)"
CPU_NOTE = "cost model fitted to measured throughputs (docs/benchmarks.md, 2 CPU cores)"


@dataclass
class StagePlan:
    stage: str
    flops: float
    seconds: float
    disk: int
    """Bytes the stage leaves on disk."""
    ram: int
    """Peak host memory, bytes (model, optimizer, Gram; not the OS page cache)."""
    gpu: int = 0
    """Peak GPU memory, bytes (0 on cpu)."""


@functools.cache
def _shape(preset: str, vocab: int, seq_len: int, d_model: int = 0) -> tuple[int, int, int]:
    """(n_layer, d_model, distinct parameters) of a preset built on the meta device: shapes only, nothing allocated."""
    import torch

    from dsdm.model import build_model, num_params

    with torch.device("meta"):
        model = build_model(preset, vocab_size=vocab, seq_len=seq_len, **({"d_model": d_model} if d_model else {}))
    return model.config.n_layer, model.config.d_model, num_params(model)


def _train_s(m: dict, preset: str, vocab: int, seq_len: int, d_model: int = 0) -> float:
    """CPU seconds per training token under the cost model m."""
    from dsdm.model import flops_per_token

    body, head = flops_per_token(*_shape(preset, vocab, seq_len, d_model)[:2], vocab, seq_len)
    return m["overhead"] + body / m["body_rate"] + head / m["head_rate"]


def _feat_s(m: dict, preset: str, vocab: int, seq_len: int, d_model: int = 0, fcfg=None) -> float:
    """CPU seconds to featurize one pool example through one proxy."""
    step = seq_len * _train_s(m, preset, vocab, seq_len, d_model)
    if fcfg is None or fcfg.projector == "factorized":
        return m["feat_overhead"] + m["feat_steps"] * step
    p = _shape(preset, vocab, seq_len, d_model)[2]
    if fcfg.dense_projection == "srht":
        p_pad = 2 ** math.ceil(math.log2(p))
        return DENSE_GRAD_STEPS * step + DENSE_SRHT_S * p_pad * math.log2(p_pad)
    return DENSE_GRAD_STEPS * step + DENSE_IID_S * p * fcfg.proj_dim / fcfg.batch_size


@functools.cache
def cpu_model() -> dict:
    """The CPU cost model's constants, fitted and solved from the measured rows above (see the module docstring)."""
    from dsdm.model import flops_per_token

    rows, y = [], []
    for preset, over, vocab, seq_len, rate in CPU_TRAIN_MEASURED:
        body, head = flops_per_token(*_shape(preset, vocab, seq_len, **over)[:2], vocab, seq_len)
        rows.append([1.0, body, head])
        y.append(1.0 / rate)
    A, y = np.array(rows), np.array(y)
    c = np.linalg.lstsq(A / y[:, None], np.ones(len(y)), rcond=None)[0]  # relative error: every row weighs alike
    m = {"overhead": c[0], "body_rate": 1 / c[1], "head_rate": 1 / c[2]}
    (x1, y1), (x2, y2) = (
        (seq_len * _train_s(m, preset, vocab, seq_len, **over), 1.0 / rate)
        for preset, over, vocab, seq_len, rate in CPU_FEATURIZE_MEASURED
    )
    m["feat_steps"] = (y1 - y2) / (x1 - x2)
    m["feat_overhead"] = y1 - m["feat_steps"] * x1
    m["score_fraction"] = DEMO_SCORE[0] / DEMO_SCORE[1] / _feat_s(m, "nano", 512, 128)  # of a pool example
    m["eval_tokens"] = DEMO_EVAL[0] / DEMO_EVAL[1] / _train_s(m, "nano", 512, 128)  # training tokens per example
    (n1, n2), runs = BASELINE_RUNS
    per_token = {k: (s2 - s1) / (n2 - n1) for k, (s1, s2) in runs.items()}
    m["baseline_s"] = {k: (runs[k][0] - per_token[k] * n1, per_token[k]) for k in runs}  # (fixed s, s per pool token)
    return m


def _files(*sizes: int) -> int:
    """Bytes on disk of files of these sizes, each rounded up to whole blocks."""
    return sum(max(1, math.ceil(s / BLOCK)) * BLOCK for s in sizes)


def _model_dir(params: int, vocab: int) -> int:
    """A saved model: float32 safetensors, tokenizer.json (16-27 bytes per vocabulary entry), and five small files
    (config.json, curve.csv, train.json, tokenizer_config.json, the stage record)."""
    return _files(4 * params + 1024, 24 * vocab) + 5 * BLOCK


def _tokenize_per_s(vocab: int) -> float:
    (v1, r1), (v2, r2) = sorted(TOKENIZE_PER_S.items())
    x = min(1.0, max(0.0, math.log(vocab / v1) / math.log(v2 / v1)))
    return r1 * (r2 / r1) ** x


def _task_rows(spec: str, split: str) -> int | None:
    """Rows of a task's split, or None when the task cannot be read here."""
    from dsdm.tasks import load_task

    try:
        return len(getattr(load_task(spec), split))
    except (OSError, ValueError):
        return None


def _feature_dim(preset: str, vocab: int, seq_len: int, fcfg) -> int:
    """The stored feature dim: k for the dense projectors, sum k_o k_i <= k for the factorized one (split_dims)."""
    if fcfg.projector != "factorized":
        return fcfg.proj_dim
    import torch

    from dsdm.model import build_model
    from dsdm.sketch import split_dims

    with torch.device("meta"):
        model = build_model(preset, vocab_size=vocab, seq_len=seq_len)
    linears = [(n, x) for n, x in model.named_modules() if isinstance(x, torch.nn.Linear)]
    return sum(ko * ki for ko, ki in split_dims(linears, fcfg.proj_dim))


def plan(cfg, pool_examples: int, seq_len: int, vocab: int, gpus: int = 1, gpu: str = "cpu"):
    """cfg: an ExperimentConfig. -> (list of StagePlan, list of warnings, the hardware note)."""
    from dsdm.config import from_dict
    from dsdm.experiment import plan_cells
    from dsdm.featurize import FeaturizeConfig
    from dsdm.model import flops_per_token, preset_flops_per_token
    from dsdm.proxies import ProxiesConfig
    from dsdm.train import TrainConfig, num_steps

    if gpu not in HARDWARE:
        raise ValueError(f"--gpu must be one of {', '.join(HARDWARE)}, got {gpu!r}")
    gpu_rate, gpu_mem = GPU_HARDWARE.get(gpu, (0.0, 0))
    m = cpu_model()

    def seconds(flops: float, cpu_s: float) -> float:  # GPU: FLOPs at the assumed rate; CPU: the cost model
        return flops / (gpu_rate * gpus) if gpu_rate else cpu_s / gpus

    N, L = pool_examples, seq_len
    warnings: list[str] = []
    unread: list[str] = []

    def task_rows(spec: str, split: str, default: int) -> int:
        n = _task_rows(spec, split)
        if n is None:
            unread.append(spec)
        return default if n is None else n

    token_bytes = 2 if vocab <= 65536 else 4
    # tokens, offsets, meta.parquet (~27 bytes per example on the demo pools), tokenizer, pool.json, config, record
    pool_disk = _files(N * L * token_bytes, 8 * (N + 1) + 128, 27 * N, 24 * vocab) + 3 * BLOCK
    out = [StagePlan("pool", 0, N * L / _tokenize_per_s(vocab), pool_disk, 400 << 20)]
    if any(x in cfg.methods for x in ("dsdm", "dsdm-inverse")):
        pcfg = from_dict(ProxiesConfig, cfg.proxy, prefix="proxy.")
        tcfg = from_dict(TrainConfig, {k: v for k, v in pcfg.train.items() if k != "seed"}, prefix="proxy.train.")
        n_layer, d, P = _shape(tcfg.preset, vocab, L)
        body, head = flops_per_token(n_layer, d, vocab, L)
        subset = int(pcfg.fraction * N)
        tokens = pcfg.n * num_steps(tcfg, L, subset) * tcfg.batch_size * L
        flops = (body + head) * tokens
        state = 16 * P  # weights, gradients, AdamW m and v in float32
        members = pcfg.n * (1 + len(pcfg.snapshots))  # the ensemble: every proxy's final and snapshots
        disk = members * _model_dir(P, vocab) + pcfg.n * _files(8 * subset + 128) + 2 * BLOCK  # + int64 subsets
        cpu_s = tokens * _train_s(m, tcfg.preset, vocab, L)
        out.append(StagePlan("proxies", flops, seconds(flops, cpu_s), disk, BASE_RSS + state, state * bool(gpu_mem)))

        fcfg = from_dict(FeaturizeConfig, cfg.featurize, prefix="featurize.")
        dim, b = _feature_dim(tcfg.preset, vocab, L, fcfg), 2 if fcfg.storage_dtype == "float16" else 4
        groups = math.ceil(N / fcfg.shard_size / fcfg.gram_group)
        gram = dim * dim * 8 + 128
        # features, gram, q, done mask, manifest, record; at the peak one float64 Gram partial per group of shards
        # (docs/estimator.md "Feature store"; deleted once gram.npy is written)
        store = _files(N * dim * b + 128, gram, 4 * N + 128, N + 128) + 2 * BLOCK + groups * _files(gram)
        per_example = L * (4 / 6) * (body + head) + 2 * L * dim  # forward, backward to the activations, sketch
        flops = per_example * N * members
        work = 2 * dim * dim * 8 + 16 * P  # the group's Gram and a block product (or the total), float64; the proxy
        ram = BASE_RSS + work
        cpu_s = N * members * _feat_s(m, tcfg.preset, vocab, L, fcfg=fcfg)
        disk = members * store + 2 * BLOCK
        out.append(StagePlan("features", flops, seconds(flops, cpu_s), disk, ram, work * bool(gpu_mem)))
        if groups * gram > N * dim * b:
            warnings.append(
                f"features: the Gram partials ({_gb(members * groups * gram)}) outweigh the features; raise "
                f"featurize.gram_group (now {fcfg.gram_group}) or featurize.shard_size (now {fcfg.shard_size}), or "
                f"lower featurize.proj_dim (now {dim})"
            )
        # one pass over each store for all targets (datamodel.score_targets), after each distinct target task's
        # examples went through every proxy (score_fraction of a pool example each: 1.2 on the demo, fixed cost in it)
        tasks = list(dict.fromkeys(s for t in cfg.targets for s in t.tasks))
        targets = sum(task_rows(s, "target", 1000) for s in tasks)
        read = members * N * dim * b
        cpu_s = read / READ_BYTES_PER_S + members * targets * m["score_fraction"] * _feat_s(m, tcfg.preset, vocab, L)
        flops = 2 * N * dim * members * len(tasks) + members * targets * per_example
        disk = sum(_files(4 * N + 128, 4 * N * len(t.tasks) + 128) for t in cfg.targets) + 2 * BLOCK
        out.append(StagePlan("scores", flops, seconds(flops, cpu_s), disk, ram))
    base = [(x, n) for x, n in (("dsir", len(cfg.targets)), ("classifier", len(cfg.targets)), ("semdedup", 1))
            if x in cfg.methods]  # fmt: skip
    if base:  # on the CPU whatever the hardware: hashed n-gram features, a linear model, k-means
        cpu_s = sum(n * (m["baseline_s"][x][0] + N * L * m["baseline_s"][x][1]) for x, n in base)
        disk = sum(n * (_files(N + 128 if x == "semdedup" else 8 * N + 128) + 2 * BLOCK) for x, n in base)
        out.append(StagePlan("baselines", 0, cpu_s, disk, BASE_RSS + 64 * N))

    ecfg = from_dict(
        TrainConfig, {k: v for k, v in cfg.eval_model.items() if k not in ("seed", "tokens")}, "eval_model."
    )
    cells = plan_cells(cfg, L, N, vocab)
    # a cell's width: the preset's, or the compute curve's wider model (budget.compute_scaling: balanced)
    shapes = {c: _shape(ecfg.preset, vocab, L, c.d_model) for c in cells}
    per_token = {c: preset_flops_per_token(ecfg.preset, vocab, L, c.d_model) for c in cells}
    Pe = max(p for _, _, p in shapes.values())
    steps_tokens = {c: math.ceil(c.tokens / (ecfg.batch_size * L)) * ecfg.batch_size * L for c in cells}
    flops = sum(per_token[c] * steps_tokens[c] for c in cells)
    selections = {c.selection: c.k for c in cells}  # int64 indices, selection.json, record
    disk = sum(_model_dir(shapes[c][2], vocab) for c in cells)
    disk += sum(_files(8 * k + 128) + 2 * BLOCK for k in selections.values())
    # planned as local whatever training.executor says: two 1-thread Ray tasks on the 2 cores took 0.755 of the local
    # time on the demo's short cells but about the same time on the repro's long ones (docs/benchmarks.md "`dsdm plan`
    # against measured runs")
    cpu_s = sum(steps_tokens[c] * _train_s(m, ecfg.preset, vocab, L, c.d_model) for c in cells)
    out.append(StagePlan("models", flops, seconds(flops, cpu_s), disk, BASE_RSS + 16 * Pe, 16 * Pe * bool(gpu_mem)))
    specs = list(dict.fromkeys([s for t in cfg.targets for s in t.tasks] + list(cfg.unseen)))
    cap = cfg.eval.max_examples or None
    examples = sum(min(cap or math.inf, task_rows(s, "holdout", cap or 1000)) for s in specs)
    flops = sum(examples * m["eval_tokens"] * per_token[c] for c in cells)
    cpu_s = sum(examples * m["eval_tokens"] * _train_s(m, ecfg.preset, vocab, L, c.d_model) for c in cells)
    disk = len(cells) * (_files(512 + 16 * examples) + BLOCK)  # metrics.json, record
    out.append(StagePlan("eval", flops, seconds(flops, cpu_s), disk, BASE_RSS + 4 * Pe, 4 * Pe * bool(gpu_mem)))
    if unread:
        warnings.append(
            f"tasks not readable here, their sizes assumed ({cap or 1000} holdout, 1000 target examples): "
            + ", ".join(dict.fromkeys(unread))
        )
    for st in out:
        if gpu_mem and st.gpu > gpu_mem:
            knob = "featurize.proj_dim" if st.stage == "features" else f"the {st.stage} preset"
            warnings.append(
                f"{st.stage}: needs {_gb(st.gpu)} of GPU memory, the {gpu} has {_gb(gpu_mem)}; lower {knob}"
            )
    return out, warnings, GPU_NOTE if gpu_rate else CPU_NOTE


def check_fit(stages: list[StagePlan], out_dir: str | Path, ram_bytes: int | None = None) -> list[str]:
    """Warnings when the run will not fit the disk under out_dir or this machine's memory."""
    import os

    warnings = []
    path = Path(out_dir)
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    total = sum(s.disk for s in stages)
    if total > free:
        warnings.append(
            f"disk: the run needs {_gb(total)}, {path} has {_gb(free)} free; use another --out, "
            "featurize.storage_dtype=float16, a smaller featurize.proj_dim or fewer proxy.n"
        )
    ram = ram_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for s in stages:
        if s.ram > ram:
            warnings.append(f"{s.stage}: peak RAM {_gb(s.ram)} > {_gb(ram)} here; lower featurize.proj_dim")
    return warnings


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _time(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def table(stages: list[StagePlan]) -> str:
    rows = ["| stage | FLOPs | time | disk | peak RAM | peak GPU |", "|---|---:|---:|---:|---:|---:|"]
    for s in stages:
        gpu = _gb(s.gpu) if s.gpu else "-"
        rows.append(f"| {s.stage} | {s.flops:.2e} | {_time(s.seconds)} | {_gb(s.disk)} | {_gb(s.ram)} | {gpu} |")
    total = sum(s.disk for s in stages)
    rows.append(f"| total | {sum(s.flops for s in stages):.2e} | {_time(sum(s.seconds for s in stages))} | "
                f"{_gb(total)} | | |")  # fmt: skip
    return "\n".join(rows)
