"""The seeds' hand-written cross-entropy as the slow baseline (seed 004's row loop, seed 003's
one-hot form) against torch and crossent: fwd+bwd, fp32, alternating rounds, median times.

    python benchmarks/bench_seed_loop.py [--rows 1024] [--classes 1000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import crossent


def seed_loop(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    """Seed 004's CELoss: a Python loop over rows, log(sum(exp)) - x_y (no max-subtraction)."""
    total = 0
    for i in range(y_pred.shape[0]):
        total = total + torch.log(torch.sum(torch.exp(y_pred[i]))) - y_pred[i, y_true[i].item()]
    return total / y_pred.shape[0]


def seed_one_hot(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Seed 003's myCEE, as a mean: exp, log-sum, one-hot product."""
    a = torch.log(torch.exp(outputs).sum(1))
    b = (F.one_hot(targets, outputs.shape[1]).float() * outputs).sum(1)
    return (a - b).mean()


CONTENDERS = {
    "seed 004 row loop": seed_loop,
    "seed 003 one-hot": seed_one_hot,
    "torch F.cross_entropy": F.cross_entropy,
    "crossent.cross_entropy": crossent.cross_entropy,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, a.classes, generator=gen)  # moderate logits: the seeds' forms overflow past ~88
    t = torch.randint(0, a.classes, (a.rows,), generator=gen)
    times: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    for r in range(a.rounds + 1):  # round 0 is the warm-up
        for name, fn in CONTENDERS.items():
            logits = x.clone().requires_grad_()
            start = time.perf_counter()
            fn(logits, t).backward()
            if r:
                times[name].append(time.perf_counter() - start)
    ref = statistics.median(times["torch F.cross_entropy"])
    print(f"fwd+bwd, fp32, {a.rows} x {a.classes}, median of {a.rounds} alternating rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| contender | ms | × torch |\n|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {1e3 * m:.2f} | {m / ref:.2f} |")


if __name__ == "__main__":
    main()
