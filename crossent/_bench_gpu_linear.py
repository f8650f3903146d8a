"""GPU linear cross-entropy benchmark (issue 5): crossent vs the three bare GEMMs, torch unfused,
torch.compile and Liger's fused linear CE (when importable), bf16, forward + backward.

The issue's target: crossent ≤ 1.15x the time of the three bare products every exact method
runs (logits ``x @ W.T``, grad of input ``G @ W``, grad of weight ``G.T @ x``, into buffers made
beforehand), and ≤ 2 GB of peak memory beyond the returned gradients of input and weight.
Time: median of ``triton.testing.do_bench`` medians over rounds that alternate the contenders.
Memory: ``torch.cuda.max_memory_allocated`` during one step, minus what was allocated before it
and minus the bytes of the gradients it returns.
"""
from __future__ import annotations

import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from ._bench_linear import gemm_floor

SHAPE = (4096, 4096, 128256)  # (N, H, V): a Llama-3 head over 4096 tokens
QUICK_SHAPE = (1024, 1024, 32768)


def contenders() -> dict[str, Callable]:
    """name -> fn(x (N, H), w (V, H), t (N,)) returning the mean loss."""
    import crossent
    import crossent.backends.triton  # noqa: F401  (imported before torch.compile traces a call)

    def unfused(x, w, t):
        return F.cross_entropy(x @ w.T, t)

    found: dict[str, Callable] = {
        "crossent linear": lambda x, w, t: crossent.linear_cross_entropy(x, w, t),
        "torch unfused": unfused,
        "torch.compile unfused": torch.compile(unfused, fullgraph=True),
    }
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        found["liger fused"] = lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t)
    except ImportError:
        print("liger_kernel not importable: Liger left out", file=sys.stderr)
    return found


def linear_case(shape: tuple[int, int, int], rounds: int) -> list[dict]:
    """One row per contender: ms, ratio to the bare GEMMs, peak extra GB."""
    from triton.testing import do_bench

    n, h, v = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, h, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    grad_bytes = (x.numel() + w.numel()) * 2

    def step_of(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.grad(fn(x, w, t), (x, w))
        return run

    steps = {name: step_of(fn) for name, fn in contenders().items()}
    gemms = gemm_floor()  # the three products into buffers made on its first call
    steps["3 bare GEMMs"] = lambda: gemms(x.detach(), w.detach(), None, t)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    peak: dict[str, float] = {}
    for _ in range(rounds):
        for name, step in steps.items():
            step()  # compile / autotune outside the timing
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            returned = 0 if name == "3 bare GEMMs" else grad_bytes
            peak[name] = (torch.cuda.max_memory_allocated() - base - returned) / 2**30
            samples[name].append(do_bench(step, warmup=5, rep=50))
    floor = statistics.median(samples["3 bare GEMMs"])
    rows = []
    for name, ms in samples.items():
        t_ms = statistics.median(ms)
        rows.append(dict(N=n, H=h, V=v, impl=name, ms=t_ms, vs_gemms=t_ms / floor,
                         peak_extra_gb=peak[name]))
    return rows
