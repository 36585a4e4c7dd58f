"""dsdm plan: what an experiment config will cost before any work runs, per stage: FLOPs, time on the named
hardware, disk, peak RAM / GPU memory, and warnings naming the knob that fixes them (issue 16, item 4).

Times come from one small table of throughputs. The CPU rows are measured (docs/benchmarks.md "Featurize": a
5.29M-parameter GPT, T = 128, 2 threads, quiet 2-core machine: a training step 24.88 examples/s, the factorized
sketch 30.62 examples/s; "Pool build": ~267k tokens/s). No GPU throughput has been measured yet (docs/benchmarks.md
"GPU": not run), so the GPU rows are the vendor's dense bf16 peak times an assumed 35% utilization, and say so.
Disk sizes follow the file formats exactly (features N x dim x 2|4 bytes, one float64 Gram per shard, ...).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

# name -> (training/featurize FLOP/s, memory bytes, where the number comes from). FLOP/s = 6 * params * tokens / s.
_CPU_TRAIN = 6 * 5.29e6 * 128 * 24.88  # 1.01e11: docs/benchmarks.md "Featurize", arm train, k = 4096
_CPU_FEATURIZE = 6 * 5.29e6 * 128 * 30.62  # 1.24e11: docs/benchmarks.md "Featurize", arm factorized, k = 4096
HARDWARE = {
    "cpu": (_CPU_TRAIN, _CPU_FEATURIZE, None, "measured (docs/benchmarks.md Featurize, 2 CPU cores)"),
    "a100": (312e12 * 0.35, 312e12 * 0.35, 80e9, "assumed: 35% of the bf16 peak (no GPU measurement yet)"),
    "h200": (989e12 * 0.35, 989e12 * 0.35, 141e9, "assumed: 35% of the bf16 peak (no GPU measurement yet)"),
}
TOKENIZE_PER_S = 267_653  # tokens/s of a pool build, docs/benchmarks.md "Pool build" (200 MB, 1 worker)
READ_BYTES_PER_S = 1e9  # assumed sequential read of a feature store while scoring (not yet benchmarked)
BASE_RSS = 250 << 20  # Python + torch + dsdm before any work: docs/benchmarks.md "Featurize" (~250 MiB)


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


def _params(preset: str, vocab: int, seq_len: int) -> int:
    import torch

    from dsdm.model import build_model, num_params

    with torch.device("meta"):  # shapes only: nothing allocated
        return num_params(build_model(preset, vocab_size=vocab, seq_len=seq_len))


def plan(cfg, pool_examples: int, seq_len: int, vocab: int, gpus: int = 1, gpu: str = "cpu"):
    """cfg: an ExperimentConfig. -> (list of StagePlan, list of warnings, the hardware note)."""
    from dsdm.config import from_dict
    from dsdm.experiment import plan_cells
    from dsdm.featurize import FeaturizeConfig
    from dsdm.proxies import ProxiesConfig
    from dsdm.train import TrainConfig

    if gpu not in HARDWARE:
        raise ValueError(f"--gpu must be one of {', '.join(HARDWARE)}, got {gpu!r}")
    train_rate, feat_rate, gpu_mem = HARDWARE[gpu][0] * gpus, HARDWARE[gpu][1] * gpus, HARDWARE[gpu][2]
    N, L = pool_examples, seq_len
    token_bytes = 2 if vocab <= 65536 else 4
    out = [StagePlan("pool", 0, N * L / TOKENIZE_PER_S, N * L * token_bytes + 8 * (N + 1) + 48 * N, 400 << 20)]
    warnings: list[str] = []
    needs_proxies = any(m in cfg.methods for m in ("dsdm", "dsdm-inverse"))
    if needs_proxies:
        pcfg = from_dict(ProxiesConfig, cfg.proxy, prefix="proxy.")
        tcfg = from_dict(TrainConfig, {k: v for k, v in pcfg.train.items() if k != "seed"}, prefix="proxy.train.")
        P = _params(tcfg.preset, vocab, L)
        per_proxy = tcfg.tokens or (tcfg.steps * tcfg.batch_size * L) or int(pcfg.fraction * N) * L
        flops = 6 * P * per_proxy * pcfg.n
        state = 16 * P  # weights, gradients, AdamW m and v in float32
        kept = 4 * P + 8 * int(pcfg.fraction * N)  # float32 weights and the int64 subset (no optimizer state kept)
        out.append(
            StagePlan("proxies", flops, flops / train_rate, pcfg.n * kept, BASE_RSS + state, state * bool(gpu_mem))
        )
        fcfg = from_dict(FeaturizeConfig, cfg.featurize, prefix="featurize.")
        dim, b = fcfg.proj_dim, 2 if fcfg.storage_dtype == "float16" else 4
        shards = math.ceil(N / fcfg.shard_size)
        gram_disk = (shards + 1) * dim * dim * 8
        store = N * dim * b + 5 * N + gram_disk
        flops = 6 * P * L * N * pcfg.n
        work = 2 * dim * dim * 8 + 16 * P  # the shard's Gram and the running total, float64; the proxy
        ram = BASE_RSS + work
        out.append(StagePlan("features", flops, flops / feat_rate, pcfg.n * store, ram, work * bool(gpu_mem)))
        if gram_disk > N * dim * b:
            warnings.append(
                f"features: the per-shard Gram files ({_gb(pcfg.n * gram_disk)}) outweigh the features; raise "
                f"featurize.shard_size (now {fcfg.shard_size}) or lower featurize.proj_dim (now {dim})"
            )
        targets = max(1, len(cfg.targets))
        read = pcfg.n * N * dim * b  # one pass over each store for all targets (datamodel.score_targets)
        out.append(StagePlan("scores", 2 * N * dim * pcfg.n * targets, read / READ_BYTES_PER_S, 8 * N * targets, ram))
    ecfg = from_dict(
        TrainConfig, {k: v for k, v in cfg.eval_model.items() if k not in ("seed", "tokens")}, "eval_model."
    )
    Pe = _params(ecfg.preset, vocab, L)
    cells = plan_cells(cfg, L, N)
    flops = sum(6 * Pe * c.tokens for c in cells)
    out.append(
        StagePlan("models", flops, flops / train_rate, len(cells) * 4 * Pe, BASE_RSS + 16 * Pe, 16 * Pe * bool(gpu_mem))
    )
    for st in out:
        if gpu_mem and st.gpu > gpu_mem:
            knob = "featurize.proj_dim" if st.stage == "features" else f"the {st.stage} preset"
            warnings.append(
                f"{st.stage}: needs {_gb(st.gpu)} of GPU memory, the {gpu} has {_gb(gpu_mem)}; lower {knob}"
            )
    return out, warnings, HARDWARE[gpu][3]


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
