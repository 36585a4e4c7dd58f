"""The prepared GPU check of issue 15: training, featurizing and scoring throughput at 125M on one GPU, and a short
end-to-end run on the embedded demo pool. Writes <out>/gpu_check.json (everything, written after every section, so a
run cut short keeps what it measured) and <out>/gpu_check.md (the tables for docs/benchmarks.md "GPU").

Sections (full sizes; --smoke: tiny sizes, CPU, < 2 minutes, what CI runs):

  train       the trainer's own step (dsdm.train._forward_backward: bf16 autocast, chunked LM-head cross-entropy,
              fused AdamW, grad clip) on random (B, 1024) batches of GPT-2 124M: tokens/s, ms/step, peak memory and
              MFU = 6 N + 12 L d T FLOP per token (nanoGPT's estimate, N without position embeddings) over 790 TFLOP/s
              (H200 bf16 dense, measured with an 8192^3 matmul). Arms: eager, unchunked loss, torch.compile.
  featurize   factorized sketch (dsdm.sketch.FactorizedSketch) at k = 4096 and 16384, float32 and bf16, on the
              same batch: examples/s and the ratio to the training step's examples/s; the bf16 feature error
              against float32; the Gram of the stored features summed on the device in float32 and float64 against
              numpy float64. SRHT dense sketch (exact per-example gradients of all 124M parameters), and the i.i.d.
              dense sketch with signs drawn on the device (dense_rng=device).
  score       dsdm.datamodel.stream_scores on the device: GB/s of float16 features read from a memmap (page cache:
              the file was just written) for 8 targets in one pass, against numpy on the CPU.
  e2e         the demo pool (data/demo) -> 2 proxies (+ a snapshot each) -> features -> scores -> top-k selection
              -> 2 evaluation models (DsDm and random selections, `small` preset: ~14M parameters) -> holdout loss
              on the 3 target tasks.
  tests       pytest -m gpu tests/test_gpu.py (if pytest is importable).

Run:  benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--smoke]   (installs missing packages from DIR first)
      PYTHONPATH=. python benchmarks/gpu_check.py [--smoke] [--out DIR] [--sections train,featurize,score,e2e,tests]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 790e12  # H200 bf16 dense, measured with an 8192^3 matmul (issue 15)
BERGSON_TOKENS_S = 38_000  # bergson's gradient collection, Pythia-160M on a GH200 (issue 15)

FULL = dict(
    preset="gpt2-125m", vocab=50257, seq=1024, batch=32, steps=10, ks=(4096, 16384), srht_k=16384, srht_batch=16,
    iid_k=4096, score_rows=65536, score_k=16384, score_targets=8, e2e_preset="small", e2e_fraction=1.0,
    e2e_seq=256, e2e_tokens=4_000_000, e2e_proj=4096, e2e_eval=300, e2e_tokenizer="train:8192", e2e_tasks=3,
    budget_s=450,
)  # fmt: skip
SMOKE = dict(
    preset="micro", vocab=512, seq=64, batch=8, steps=3, ks=(256, 1024), srht_k=256, srht_batch=4, iid_k=256,
    score_rows=4096, score_k=1024, score_targets=8, e2e_preset="micro", e2e_fraction=0.01, e2e_seq=64,
    e2e_tokens=20_000, e2e_proj=128, e2e_eval=20, e2e_tokenizer="train:512", e2e_tasks=1, budget_s=110,
)  # fmt: skip


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps: int, warmup: int = 2) -> float:
    """Median seconds per call of fn() over `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def batch(S, device, seed=0, n=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randint(0, S["vocab"], (n or S["batch"], S["seq"]), generator=g).to(device)
    return tokens, torch.ones_like(tokens, dtype=torch.bool)


# -----------------------------------------------------------------------------
# Sections


def section_train(S, device, res):
    from dsdm.model import build_model, num_params
    from dsdm.train import _forward_backward, param_groups

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens, mask = batch(S, device)
    arms = [("eager, chunked CE", 8192, False), ("eager, plain CE", 0, False), ("compiled, chunked CE", 8192, True)]
    arms = arms[:2] if device.type == "cpu" else arms  # compiling on CPU costs ~30 s of the smoke budget
    for name, chunk, compiled in arms:
        reset_peak(device)
        model = build_model(S["preset"], S["vocab"], S["seq"], seed=0).to(device).train()
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
        fwd = model.hidden if chunk else model
        started = time.perf_counter()
        fwd = torch.compile(fwd) if compiled else fwd

        def step():
            opt.zero_grad(set_to_none=True)
            _forward_backward(model, fwd, tokens, mask, 1, chunk, device, dtype)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        step()  # (compiles)
        sync(device)
        first = time.perf_counter() - started
        t = timed(step, device, S["steps"])
        n, cfg = num_params(model), model.config
        flops_tok = 6 * (n - cfg.seq_len * cfg.d_model) + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len
        tps = S["batch"] * S["seq"] / t
        res[name] = {
            "params": n,
            "batch": S["batch"],
            "seq": S["seq"],
            "dtype": str(dtype).replace("torch.", ""),
            "ms_per_step": round(1000 * t, 2),
            "tokens_per_s": round(tps),
            "examples_per_s": round(S["batch"] / t, 2),
            "mfu": round(flops_tok * tps / PEAK_FLOPS, 4),
            "first_step_s": round(first, 2),
            "peak_gib": peak_gib(device),
        }
        model = opt = fwd = None  # free before the next arm
    res["tokens_per_s_vs_2x_bergson"] = round(max(r["tokens_per_s"] for r in res.values()) / (2 * BERGSON_TOKENS_S), 3)


def section_featurize(S, device, res, train_res):
    from dsdm.model import build_model
    from dsdm.sketch import make_sketch, pool_score_mask

    model = build_model(S["preset"], S["vocab"], S["seq"], seed=0).to(device)
    tokens, mask = batch(S, device, seed=1)
    score = pool_score_mask(mask)
    train_eps = train_res.get("eager, chunked CE", {}).get("examples_per_s")
    feats = {}
    for k in S["ks"]:
        for precision in ("float32", "bf16"):
            reset_peak(device)
            sk = make_sketch(model, "factorized", k, 0, 0, device, precision=precision)
            out = {}

            def run():
                out["g"] = sk.sketch(tokens, score)[0]

            t = timed(run, device, max(2, S["steps"] // 2), warmup=1)
            eps = S["batch"] / t
            feats[(k, precision)] = out["g"].detach().double()
            res[f"factorized k={k} {precision}"] = {
                "dim": sk.dim,
                "examples_per_s": round(eps, 2),
                "vs_train_step": round(eps / train_eps, 3) if train_eps else None,
                "tokens_per_s": round(eps * S["seq"]),
                "peak_gib": peak_gib(device),
            }
        g32, g16 = feats[(k, "float32")], feats[(k, "bf16")]
        rel = (g16 - g32).norm(dim=1) / g32.norm(dim=1)
        res[f"factorized k={k} bf16 error"] = {"rel_err_max": float(rel.max()), "rel_err_median": float(rel.median())}
    # Gram on the device vs numpy float64, of the float16-stored features
    g = feats[(S["ks"][-1], "float32")].detach().to(torch.float16)
    ref = g.double().cpu().numpy()
    ref = ref.T @ ref
    import numpy as np

    diag = np.sqrt(np.outer(np.diag(ref), np.diag(ref))) + 1e-30
    for acc_dtype in (torch.float32, torch.float64):
        x = g.to(acc_dtype)
        acc = torch.zeros(x.shape[1], x.shape[1], dtype=acc_dtype, device=device)
        for s in range(0, x.shape[0], 4):
            acc.addmm_(x[s : s + 4].t(), x[s : s + 4])
        err = np.abs(acc.double().cpu().numpy() - ref) / diag
        res[f"gram on device {str(acc_dtype)[6:]} vs numpy float64"] = {"max_rel_err": float(err.max())}
    del feats
    # SRHT and device-drawn i.i.d. dense sketches: exact per-example gradients of all parameters
    t_small, m_small = tokens[: S["srht_batch"]], score[: S["srht_batch"]]
    for label, kw, k in (
        ("dense srht", {"dense_projection": "srht"}, S["srht_k"]),
        ("dense iid, device signs", {"dense_rng": "device"}, S["iid_k"]),
    ):
        reset_peak(device)
        sk = make_sketch(model, "dense", k, 0, 0, device, **kw)
        t = timed(lambda: sk.sketch(t_small, m_small), device, 1, warmup=1)
        res[f"{label} k={k}"] = {
            "batch": S["srht_batch"],
            "examples_per_s": round(S["srht_batch"] / t, 3),
            "s_per_batch": round(t, 3),
            "peak_gib": peak_gib(device),
        }
        from dsdm.model import set_attn_impl

        set_attn_impl(model, "sdpa")


def section_score(S, device, res):
    import numpy as np

    from dsdm.datamodel import stream_scores

    n, k, T = S["score_rows"], S["score_k"], S["score_targets"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, k))
        g = torch.Generator(device="cpu").manual_seed(0)
        for s in range(0, n, 8192):
            mm[s : s + 8192] = torch.randn(min(8192, n - s), k, generator=g).half().numpy()
        mm.flush()
        del mm
        feats = np.load(path, mmap_mode="r")
        W = np.random.default_rng(0).standard_normal((k, T))
        gb = n * k * 2 / 1e9
        for label, dev, block in (("device", device, 8192), ("cpu numpy", None, 8192)):
            t0 = time.perf_counter()
            u = stream_scores(feats, W, block, dev)
            t = time.perf_counter() - t0
            res[label] = {
                "rows": n,
                "k": k,
                "targets": T,
                "GB": round(gb, 3),
                "s": round(t, 3),
                "GB_per_s": round(gb / t, 2),
            }
            if label == "device":
                u_dev = u
        ref = np.asarray(feats[:2048], dtype=np.float64) @ W
        res["device vs numpy max abs diff (first 2048 rows)"] = float(np.abs(u_dev[:2048] - ref).max())


def section_e2e(S, device, res, out_dir: Path):
    import numpy as np

    from dsdm import datamodel, featurize, proxies
    from dsdm.evaluate import evaluate_task
    from dsdm.ingest import PoolBuildConfig, build_pool
    from dsdm.model import load_model, num_params
    from dsdm.pool import Pool
    from dsdm.select import top_k
    from dsdm.tasks import load_task
    from dsdm.train import TrainConfig, train

    work = Path(tempfile.mkdtemp(prefix="dsdm-e2e-"))
    dev = str(device)
    tasks = [str(ROOT / "data/demo/tasks" / t) for t in ("lambada_style", "squad_style", "jeopardy_style")]
    tasks = tasks[: S["e2e_tasks"]]
    stages, t0 = {}, time.perf_counter()

    def mark(name):
        stages[name] = round(time.perf_counter() - t0 - sum(stages.values()), 2)

    docs = sorted(str(p) for p in (ROOT / "data/demo/docs").glob("*.parquet"))
    pcfg = PoolBuildConfig(tokenizer=S["e2e_tokenizer"], seq_len=S["e2e_seq"], sample_fraction=S["e2e_fraction"])
    pool = Pool(build_pool(docs, work / "pool", pcfg))
    mark("pool build")
    train_kw = {"preset": S["e2e_preset"], "batch_size": 32, "device": dev}
    # one snapshot each (proxy.snapshots): saving a model mid-run on the device, and 4 ensemble members to featurize
    pcfg_proxies = proxies.ProxiesConfig(n=2, fraction=0.4, train=train_kw, snapshots=[0.5])
    proxies.run(work / "pool", work / "proxies", pcfg_proxies)
    mark("2 proxies + snapshots")
    fcfg = featurize.FeaturizeConfig(proj_dim=S["e2e_proj"], batch_size=0 if device.type == "cuda" else 16, device=dev)
    featurize.run(work / "pool", work / "proxies", work / "features", fcfg)
    mark("featurize")
    datamodel.run(work / "features", tasks, work / "scores.npy", datamodel.ScoreConfig(), device)
    mark("score")
    k = min(len(pool) // 4, max(1, S["e2e_tokens"] // (4 * pool.seq_len)))  # 4 epochs of k examples
    picks = {
        "dsdm": top_k(np.load(work / "scores.npy"), k),
        "random": np.sort(np.random.default_rng(0).choice(len(pool), k, replace=False)),
    }
    mark("select")
    losses = {}
    for name, idx in picks.items():
        out = train(pool, idx, TrainConfig(tokens=S["e2e_tokens"], **train_kw), work / f"eval_{name}")
        model = load_model(out).to(device)
        losses[name] = {
            t.split("/")[-1]: round(
                evaluate_task(model, pool.tokenizer, load_task(t), max_examples=S["e2e_eval"], device=device)["loss"],
                4,
            )
            for t in tasks
        }
        losses[name]["params"] = num_params(model)
    mark("2 eval models + eval")
    res.update(
        {
            "pool_examples": len(pool),
            "seq_len": pool.seq_len,
            "selected": int(k),
            "stages_s": stages,
            "total_s": round(time.perf_counter() - t0, 2),
            "holdout_loss": losses,
        }
    )


def section_tests(S, device, res):
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests/test_gpu.py")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    res["returncode"] = out.returncode
    res["summary"] = (out.stdout.strip().splitlines() or [""])[-1]
    if out.returncode not in (0, 5):
        res["tail"] = out.stdout[-3000:]


# -----------------------------------------------------------------------------


def environment(device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_mem_gib=round(total / 2**30, 1))
    try:
        env["git"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        pass
    return env


def markdown(report: dict) -> str:
    lines = [
        f"gpu_check {'(smoke) ' if report['smoke'] else ''}— " + ", ".join(f"{k} {v}" for k, v in report["env"].items())
    ]
    for section, res in report["sections"].items():
        lines += ["", f"### {section}", ""]
        if "error" in res:
            lines.append(f"**failed**: `{res['error']}`")
            continue
        if "skipped" in res:
            lines.append(f"skipped: {res['skipped']}")
            continue
        speed = ("examples_per_s", "tokens_per_s", "GB_per_s")
        rows = {k: v for k, v in res.items() if isinstance(v, dict) and any(c in v for c in speed)}
        cols = list(dict.fromkeys(c for v in rows.values() for c in v))  # union, first-seen order
        if rows:
            lines += ["| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {k} | " + " | ".join(str(v.get(c, "")) for c in cols) + " |" for k, v in rows.items()]
        for k, v in res.items():
            if k not in rows and k != "time_s":
                lines.append(f"- {k}: {json.dumps(v)}")
        lines.append(f"- section wall time: {res.get('time_s')} s")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (CI), < 2 minutes")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"), help="directory for the JSON + markdown")
    ap.add_argument("--sections", default="train,featurize,score,e2e,tests")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    S = SMOKE if args.smoke else FULL
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        print(
            "gpu_check: no CUDA device; the full check needs one (use --smoke for the CPU smoke run)", file=sys.stderr
        )
        return 2
    os.environ.setdefault("DSDM_PROGRESS", "0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"smoke": args.smoke, "env": environment(device), "sizes": S, "sections": {}}
    print(json.dumps(report["env"]), flush=True)
    wanted = args.sections.split(",")
    need_s = {"train": 60, "featurize": 90, "score": 30, "e2e": 150 if not args.smoke else 30, "tests": 40}
    for name in wanted:
        res: dict = {}
        left = S["budget_s"] - (time.perf_counter() - started)
        if left < need_s.get(name, 30) * (0.2 if args.smoke else 1.0):
            res["skipped"] = f"{left:.0f} s left of the {S['budget_s']} s budget"
        else:
            t0 = time.perf_counter()
            try:
                if name == "train":
                    section_train(S, device, res)
                elif name == "featurize":
                    section_featurize(S, device, res, report["sections"].get("train", {}))
                elif name == "score":
                    section_score(S, device, res)
                elif name == "e2e":
                    section_e2e(S, device, res, out)
                elif name == "tests":
                    section_tests(S, device, res)
                else:
                    raise ValueError(f"unknown section {name!r}")
            except Exception as e:  # noqa: BLE001 - one failed section must not lose the others' numbers
                res["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            res["time_s"] = round(time.perf_counter() - t0, 1)
        report["sections"][name] = res
        report["total_s"] = round(time.perf_counter() - started, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"[gpu_check] {name}: {json.dumps(res, default=str)[:2000]}", flush=True)
    (out / "gpu_check.md").write_text(markdown(report))
    print((out / "gpu_check.md").read_text())
    failed = [n for n, r in report["sections"].items() if "error" in r]
    if failed:
        print(f"gpu_check: sections failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
