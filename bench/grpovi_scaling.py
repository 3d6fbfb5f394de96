"""GRPOVI micro-benchmark: the O(n log n) variance-increase pass against the O(n^2) brute force.

    .venv/bin/python bench/grpovi_scaling.py [--threads 1] [--brute-max 10000]

For each group size n: random rewards in [0, 1] (half of them on a 0.1 grid, so there are ties) and
p = softmax(N(0, 1)). Prints n, the fast time (best of a few repeats), the brute-force time (n up to
--brute-max), their ratio, and fast time / (n log2 n) in ns: flat once per-call overhead is amortised
means O(n log n). Every brute-force run is also checked to give the same objective sum p z^2.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from reflow.algorithms.grpovi import variance_increase, variance_increase_bruteforce


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timings)")
    ap.add_argument("--brute-max", type=int, default=10_000, help="largest n for the O(n^2) brute force")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000, 100_000, 1_000_000])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    rows = []
    for n in args.sizes:
        grid = torch.randint(0, 11, (n,), generator=g).double() / 10
        r = torch.where(torch.rand(n, generator=g) < 0.5, grid, torch.rand(n, generator=g, dtype=torch.float64))
        p = torch.softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
        variance_increase(r, p, 0.0, 1.0)  # warm-up
        t_fast = best_time(lambda: variance_increase(r, p, 0.0, 1.0), repeats=7 if n <= 100_000 else 3)
        t_brute = None
        if n <= args.brute_max:
            t_brute = best_time(lambda: variance_increase_bruteforce(r, p, 0.0, 1.0), repeats=3 if n <= 1_000 else 1)
            z, zb = variance_increase(r, p, 0.0, 1.0), variance_increase_bruteforce(r, p, 0.0, 1.0)
            obj, obj_b = float((p * z**2).sum()), float((p * zb**2).sum())
            assert abs(obj - obj_b) <= 1e-9, (n, obj, obj_b)
        rows.append((n, t_fast, t_brute))

    print(f"GRPOVI variance increase, torch {torch.__version__}, {args.threads} thread(s), float64")
    print(f"{'n':>9} | {'fast (ms)':>10} | {'brute (ms)':>11} | {'brute/fast':>10} | {'fast/(n log2 n) (ns)':>20}")
    print("-" * 74)
    for n, tf, tb in rows:
        brute = f"{tb * 1e3:11.2f}" if tb is not None else f"{'-':>11}"
        ratio = f"{tb / tf:10.1f}" if tb is not None else f"{'-':>10}"
        print(f"{n:>9} | {tf * 1e3:10.3f} | {brute} | {ratio} | {tf / (n * math.log2(n)) * 1e9:20.2f}")


if __name__ == "__main__":
    main()
