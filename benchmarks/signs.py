"""Rate of the dense projector's random signs: dsdm.featurize.rademacher (numpy PCG64 bytes, 8 signs per byte through
a lookup table; sketch_version 2) against one torch.randint draw per sign (sketch_version 1), and a (B x n) @ (n x k)
product of the same size for scale. One thread, side by side in one process; read the ratio.

Run: .venv/bin/python benchmarks/signs.py [--rows 4096 --cols 4096 --batch 16 --reps 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from dsdm.featurize import rademacher


def torch_randint_signs(rows: int, cols: int, seed: int) -> torch.Tensor:
    """The sketch_version 1 generator: one int8 draw per sign from torch's CPU generator."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return torch.randint(0, 2, (rows, cols), generator=g, dtype=torch.int8).float().mul_(2).sub_(1)


def best_of(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096, help="k, the projection dimension")
    ap.add_argument("--batch", type=int, default=16, help="B of the matmul row (featurize batch)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.rows * args.cols
    grads = torch.randn(args.batch, args.rows)
    block = rademacher(args.rows, args.cols, 0, 0, "w", 0)
    arms = {
        "torch.randint (sketch v1)": lambda: torch_randint_signs(args.rows, args.cols, 0),
        "dsdm rademacher (sketch v2)": lambda: rademacher(args.rows, args.cols, 0, 0, "w", 0),
        f"matmul ({args.batch} x n) @ (n x k)": lambda: grads @ block,
    }
    base = None
    print(f"{n:,} entries per call ({args.rows} x {args.cols}), 1 thread, best of {args.reps}\n")
    print(f"{'arm':34s} {'ms':>9s} {'M entries/s':>12s} {'vs v1':>7s}")
    for name, fn in arms.items():
        s = best_of(fn, args.reps)
        base = base or s
        print(f"{name:34s} {s * 1e3:9.1f} {n / s / 1e6:12.0f} {base / s:6.2f}x")


if __name__ == "__main__":
    main()
