"""Featurizer speed and memory against a training step and the `traker` package, printed as a table (issue 5, item 8).

One model (a GPT-2-shaped GPT of 5.29M parameters: 4 layers, d_model 256, 4 heads, V = 8192, T = 128, tied head), one
batch of seeded random full-length sequences, and per arm the examples/s of

  train       a plain training step: forward + backward + AdamW (SDPA attention), the yardstick
  factorized  dsdm's per-Linear Kronecker sketch (FactorizedSketch, SDPA attention)
  dense       dsdm's exact TRAK: torch.func per-example gradients of every parameter x seeded Rademacher P
              (DenseSketch, eager attention: vmap has no batching rule for SDPA's backward on CPU)
  dense-srht  the same exact per-example gradients x a subsampled randomized Hadamard transform
              (dense_projection="srht": O(p log p) per example, no p x k random matrix)
  traker      traker 0.3.2's TRAKer.featurize with a causal-LM mean-margin output class (the same output function
              and Q as dsdm), all parameters, float32; on CPU TRAKer picks its BasicProjector (Gaussian, regenerated in
              blocks of 100 columns for every batch)

at each projection dimension k (train does not depend on k and is measured once). Every arm runs in its own fresh
process (so peak RSS, `ru_maxrss`, is that arm's alone): build the model, warm up, then time batches one by one and
report the median batch.

Slow arms. dense and traker regenerate their p x k projection for every batch (p = 5.29M: 2.2e10 random numbers per
batch at k = 4096, several minutes on this CPU). By default (`--slow fit`) they are measured end to end at two small
k and the batch time is extrapolated linearly in the amount of projection work (traker: number of 100-column blocks;
dense: k), which is how their code scales: t(k) = t_gradients + work(k) x t_unit. The table marks such rows
"fit(k1,k2)". `--slow full` measures them at the requested k instead (one batch, after a warm-up at a small k).
Peak RSS of a fitted row is the larger of its two runs (traker's block matrix, p x 100 floats, does not grow with k;
dense's rows per block shrink as k grows, so its peak is about the same).

Run:  .venv/bin/python benchmarks/featurize.py [--arms train,factorized,dense,dense-srht,traker] [--k 1024,4096]
      [--batches 10] [--batch-size 16] [--slow fit|full] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

ARMS = ("train", "factorized", "dense", "dense-srht", "traker")
SLOW = ("dense", "traker")
MODEL = {"preset": "mini", "vocab_size": 8192, "seq_len": 128, "d_model": 256}  # 4 layers, 4 heads, 5.29M params


def fit_points(arm: str, k: int) -> tuple[int, int]:
    """The two small k at which a slow arm is measured for the linear fit (traker: whole 100-column blocks)."""
    return (200, 400) if arm == "traker" else (128, 256)


def work(arm: str, k: int) -> float:
    """Projection work in the unit the arm's cost is linear in: traker generates ceil(k/100) blocks of 100 columns."""
    return -(-k // 100) if arm == "traker" else k


# -----------------------------------------------------------------------------
# One arm in one fresh process


def setup(batch_size: int, seed: int = 0):
    import torch

    from dsdm.featurize import pool_score_mask
    from dsdm.model import build_model

    model = build_model(MODEL["preset"], MODEL["vocab_size"], MODEL["seq_len"], seed=seed, d_model=MODEL["d_model"])
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, MODEL["vocab_size"], (batch_size, MODEL["seq_len"]), generator=g)
    mask = torch.ones_like(tokens, dtype=torch.bool)  # full-length pool examples
    return model, tokens, mask, pool_score_mask(mask)


def train_step_fn(model, tokens, mask, score, k):
    import torch

    from dsdm.train import lm_loss

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        loss = lm_loss(model(tokens), tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def dsdm_fn(projector, dense_projection="rademacher"):
    def build(model, tokens, mask, score, k):
        from dsdm.featurize import make_sketch

        sketch = make_sketch(model, projector, k, seed=0, proxy=0, dense_projection=dense_projection)
        return lambda: sketch.sketch(tokens, score)

    return build


def traker_fn(model, tokens, mask, score, k):
    import logging

    import torch
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput

    from dsdm.featurize import output_and_q
    from dsdm.model import set_attn_impl

    class CausalLMMargin(AbstractModelOutput):
        """f = mean per-token margin over scored tokens, Q = mean (1 - p): dsdm's output function (method.md §3.2)."""

        def __init__(self):
            super().__init__()

        def get_output(self, model, weights, buffers, tokens, score):  # one example: tokens, score (T,)
            logits = torch.func.functional_call(model, (weights, buffers), (tokens[None],))
            return output_and_q(logits, tokens[None], score[None])[0][0]

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            tokens, score = batch
            with torch.no_grad():
                logits = torch.func.functional_call(model, (weights, buffers), (tokens,))
            return output_and_q(logits, tokens, score)[1][:, None]

    set_attn_impl(model, "eager")  # torch.func.vmap cannot batch SDPA's backward on CPU
    model.eval()
    tmp = tempfile.mkdtemp(prefix="trak_bench_")
    n_calls = 64  # room in traker's memmap store for every call we make
    traker = TRAKer(
        model=model,
        task=CausalLMMargin(),
        train_set_size=n_calls * tokens.shape[0],
        save_dir=tmp,
        load_from_save_dir=False,
        device="cpu",
        proj_dim=k,
        use_half_precision=False,  # float16 on CPU is slower still; dsdm computes in float32 too
        logging_level=logging.WARNING,
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    # featurize() skips rows already marked featurized, so every call writes fresh rows.
    return lambda: traker.featurize(batch=(tokens, score), num_samples=tokens.shape[0])


BUILDERS = {
    "train": train_step_fn,
    "factorized": dsdm_fn("factorized"),
    "dense": dsdm_fn("dense"),
    "dense-srht": dsdm_fn("dense", "srht"),
    "traker": traker_fn,
}


def worker(arm: str, k: int, batches: int, warmup: int, batch_size: int, threads: int | None) -> dict:
    """Time `batches` calls of one arm after `warmup` calls; returns median seconds per batch and peak RSS."""
    import resource

    import psutil
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, tokens, mask, score = setup(batch_size)
    rss_setup = psutil.Process().memory_info().rss
    fn = BUILDERS[arm](model, tokens, mask, score, k)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "arm": arm,
        "k": k,
        "sec": statistics.median(times),
        "times": times,
        "peak_rss": peak,
        "rss_setup": rss_setup,
        "threads": torch.get_num_threads(),
    }


def interleaved(k: int, batches: int, warmup: int, batch_size: int, threads: int | None) -> dict:
    """train and factorized alternating batch by batch in one process: both see the same CPU contention."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    fns = {}
    for arm in ("train", "factorized"):
        model, tokens, mask, score = setup(batch_size)
        fns[arm] = BUILDERS[arm](model, tokens, mask, score, k)
    times = {arm: [] for arm in fns}
    for i in range(warmup + batches):
        for arm, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[arm].append(time.perf_counter() - t0)
    return {"arm": "interleaved", "k": k, "sec": {a: statistics.median(t) for a, t in times.items()}, "times": []}


def run_arm(arm: str, k: int, batches: int, warmup: int, args) -> dict:
    """Run `worker` in a fresh interpreter (peak RSS of this arm alone); its last stdout line is the JSON result."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        arm,
        "--k",
        str(k),
        "--batches",
        str(batches),
        "--warmup",
        str(warmup),
        "--batch-size",
        str(args.batch_size),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "DSDM_PROGRESS": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"arm {arm} k={k} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    secs = res["sec"] if isinstance(res["sec"], dict) else {arm: res["sec"]}
    for name, sec in secs.items():
        timed = ", ".join(f"{t:.2f}" for t in res["times"])
        print(
            f"  {name:10s} k={k:5d}  {sec:8.3f} s/batch  {'(batches: ' + timed + ')' if timed else '(interleaved)'}",
            file=sys.stderr,
            flush=True,
        )
    return res


_FIT_RUNS: dict[tuple[str, int], dict] = {}


def _cached_run(arm: str, k: int, args) -> dict:
    """A fit point, measured once per invocation and shared by every requested k."""
    if (arm, k) not in _FIT_RUNS:
        _FIT_RUNS[arm, k] = run_arm(arm, k, args.slow_batches, 1, args)
    return _FIT_RUNS[arm, k]


def measure_slow(arm: str, k: int, args) -> dict:
    """A slow arm at k: one measured batch at k (`--slow full`), or a linear fit in work(k) from two small k."""
    if args.slow == "full":
        res = run_arm(arm, k, 1, int(args.slow_warmup), args)
        res["how"] = "measured, 1 batch" + (" after 1 warm-up" if args.slow_warmup else " (no warm-up)")
        return res
    k1, k2 = fit_points(arm, k)
    r1, r2 = (_cached_run(arm, kk, args) for kk in (k1, k2))
    slope = (r2["sec"] - r1["sec"]) / (work(arm, k2) - work(arm, k1))
    base = r1["sec"] - slope * work(arm, k1)
    sec = base + slope * work(arm, k)
    return {
        "arm": arm,
        "k": k,
        "sec": sec,
        "peak_rss": max(r1["peak_rss"], r2["peak_rss"]),
        "how": f"fit(k={k1}: {r1['sec']:.2f}s, k={k2}: {r2['sec']:.2f}s; gradients {base:.2f}s)",
    }


# -----------------------------------------------------------------------------
# The table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--k", default="1024,4096", help="comma-separated projection dimensions")
    ap.add_argument("--batches", type=int, default=10, help="timed batches for the fast arms (train, factorized)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up batches for the fast arms")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--slow", choices=("fit", "full"), default="fit", help="how to time dense and traker (see above)")
    ap.add_argument("--slow-batches", type=int, default=1, help="timed batches per fit point of a slow arm")
    ap.add_argument("--slow-warmup", action="store_true", help="--slow full: one untimed batch first (doubles time)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per arm (default: torch's choice)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = interleaved if args.worker == "interleaved" else partial(worker, args.worker)
        print(json.dumps(fn(int(args.k), args.batches, args.warmup, args.batch_size, args.threads)))
        return

    import torch

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        ap.error(f"unknown arm(s) {bad}; choose from {ARMS}")
    ks = [int(k) for k in args.k.split(",")]
    started = time.time()
    print(
        f"# featurize benchmark: GPT {MODEL} (5.29M params), batch {args.batch_size}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        file=sys.stderr,
    )
    results: dict[tuple[str, int], dict] = {}
    if "train" in arms:
        res = run_arm("train", 0, args.batches, args.warmup, args)
        res["how"] = f"median of {args.batches}"
        for k in ks:
            results["train", k] = res
    for k in ks:
        for arm in arms:
            if arm == "train":
                continue
            if arm in SLOW:
                results[arm, k] = measure_slow(arm, k, args)
            else:  # dense-srht costs ~10 s a batch here: a few batches suffice for a median
                n, w = (min(args.batches, 3), 1) if arm == "dense-srht" else (args.batches, args.warmup)
                results[arm, k] = run_arm(arm, k, n, w, args)
                results[arm, k]["how"] = f"median of {n}"

    if "train" in arms and "factorized" in arms:  # the same pair again, alternating in one process
        for k in ks:
            results["interleaved", k] = run_arm("interleaved", k, args.batches, args.warmup, args)

    bs = args.batch_size
    print("\n| k | arm | examples/s | s/batch | peak RSS (MiB) | how |\n|---:|---|---:|---:|---:|---|")
    for k in ks:
        for arm in arms:
            r = results[arm, k]
            print(f"| {k} | {arm} | {bs / r['sec']:.2f} | {r['sec']:.3f} | {r['peak_rss'] / 2**20:.0f} | {r['how']} |")
    ratios = [
        ("factorized", "train"),
        ("factorized", "traker"),
        ("dense", "traker"),
        ("dense-srht", "traker"),
        ("dense-srht", "dense"),
        ("factorized", "dense"),
        ("factorized", "dense-srht"),
    ]
    targets = {
        ("factorized", "train"): "≥ 1.0 at k = 4096",
        ("factorized", "traker"): "≥ 80 at k = 4096",
        ("dense", "traker"): "≥ 10",
        ("dense-srht", "traker"): "≥ 10 (dense)",
    }
    print("\n| ratio of examples/s | " + " | ".join(f"k = {k}" for k in ks) + " | target |")
    print("|---|" + "---:|" * len(ks) + "---|")
    for a, b in ratios:
        if a in arms and b in arms:
            cells = " | ".join(f"{results[b, k]['sec'] / results[a, k]['sec']:.2f}×" for k in ks)
            print(f"| ({a}) / ({b}) | {cells} | {targets.get((a, b), '')} |")
    if ("interleaved", ks[0]) in results:
        cells = " | ".join(
            f"{results['interleaved', k]['sec']['train'] / results['interleaved', k]['sec']['factorized']:.2f}×"
            for k in ks
        )
        print(f"| (factorized) / (train), interleaved in one process | {cells} | ≥ 1.0 at k = 4096 |")
    print(f"\n(total wall time {time.time() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
