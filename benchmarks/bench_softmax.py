"""crossent vs torch: log_softmax, softmax and nll_loss(log_softmax(x, 1), t), forward + backward.

Paired rounds in one process (torch, crossent, torch, crossent, ...) after warm-ups; prints the
median per-call time of each and the median of the per-pair ratios (crossent / torch).

    python benchmarks/bench_softmax.py [--rounds 15] [--shapes 4096x32000 8x21x128x128 64x10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import crossent


def _case(shape: tuple[int, ...], family: str, lib):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    up = torch.randn(shape, generator=gen)

    def step():
        if family == "nll(log_softmax)":
            loss = lib.nll_loss(lib.log_softmax(x, 1), t)
            loss.backward()
        else:
            getattr(lib, family)(x, 1).backward(up)
        x.grad = None

    return step


def _time(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--shapes", nargs="+", default=["4096x32000", "8x21x128x128", "64x10"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':>16} {'family':>18} {'torch ms':>9} {'crossent ms':>12} {'ratio':>6}")
    for spec in args.shapes:
        shape = tuple(int(d) for d in spec.split("x"))
        numel = torch.Size(shape).numel()
        reps = max(1, min(200, 2_000_000 // numel))  # ~ms per timed block for small shapes
        for family in ("log_softmax", "softmax", "nll(log_softmax)"):
            ours, theirs = _case(shape, family, crossent), _case(shape, family, F)
            for _ in range(3):  # warm-up: numba compilation, allocator, caches
                ours(), theirs()
            t_torch, t_ours, ratios = [], [], []
            for _ in range(args.rounds):
                a = _time(theirs, reps)
                b = _time(ours, reps)
                t_torch.append(a)
                t_ours.append(b)
                ratios.append(b / a)
            print(f"{spec:>16} {family:>18} {statistics.median(t_torch) * 1e3:9.3f} "
                  f"{statistics.median(t_ours) * 1e3:12.3f} {statistics.median(ratios):6.2f}")


if __name__ == "__main__":
    main()
