"""Training and evaluation throughput of every model preset on this machine, printed as a table.

Training = the trainer's own step (dsdm.train.lm_loss + AdamW with its parameter groups + grad clipping), evaluation
= a no-grad forward with log-softmax (dsdm.evaluate.continuation_scores), both on random token batches of shape
(batch, seq_len). Each preset is warmed up, then timed for at least `--min-seconds` (or `--min-steps` steps).

Run:  .venv/bin/python benchmarks/models.py [--presets micro nano tiny mini small] [--batch-size 16] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


def timed(fn, min_steps: int, min_seconds: float) -> float:
    """Seconds per call of fn(), after 2 warm-up calls."""
    for _ in range(2):
        fn()
    n, start = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - start < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    from dsdm.evaluate import continuation_scores
    from dsdm.model import PRESETS, build_model, num_params
    from dsdm.train import lm_loss, param_groups

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["micro", "nano", "tiny", "mini", "small"], choices=list(PRESETS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=5.0)
    args = ap.parse_args()

    torch.manual_seed(0)
    B, T = args.batch_size, args.seq_len
    tokens = torch.randint(0, args.vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    score = np.ones((B, T), dtype=bool)
    score[:, 0] = False
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"# batch {B} x seq_len {T}, vocab {args.vocab}, float32")
    print("| preset | params | train tokens/s | train ms/step | eval tokens/s | eval / train |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.presets:
        model = build_model(name, args.vocab, T, seed=0).train()
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))

        def step():
            loss = lm_loss(model(tokens), tokens, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        t_train = timed(step, args.min_steps, args.min_seconds)
        t_eval = timed(
            lambda: continuation_scores(model, tokens.numpy(), score, "cpu", B), args.min_steps, args.min_seconds
        )
        tr, ev = B * T / t_train, B * T / t_eval
        print(
            f"| {name} | {num_params(model) / 1e6:.2f}M | {tr:,.0f} | {1000 * t_train:.1f} | {ev:,.0f} "
            f"| {ev / tr:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
