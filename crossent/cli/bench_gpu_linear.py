"""GPU linear cross-entropy benchmark (issues 5 and 13): crossent vs the three bare GEMMs, torch
unfused, torch.compile, Liger's fused linear CE and Apple's CCE (``filter_eps=None``: exact),
where they import; bf16, forward + backward.

The issue's target: crossent <= 1.15x the time of the three bare products every exact method
runs (logits ``x @ W.T``, grad of input ``G @ W``, grad of weight ``G.T @ x``, into buffers made
beforehand), and <= 2 GB of peak memory beyond the returned gradients of input and weight. The
second shape needs several row chunks (its logits exceed the 1 GiB chunk budget): the path that
sums the weight gradient over chunks. Each contender's loss and gradients are checked against
float32 torch first (one that disagrees is reported, not timed); torch.compile is built per shape
with ``dynamic=False``. Time: median of ``do_bench`` medians over rounds that alternate the
contenders. Memory: ``torch.cuda.max_memory_allocated`` during one step, minus what was
allocated before it and minus the bytes of the gradients it returns.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .bench_linear import gemm_floor

SHAPES = [(4096, 4096, 128256), (16384, 4096, 128256)]  # (N, H, V): a Llama-3 head; 1 and 6 chunks
QUICK_SHAPE = (1024, 1024, 32768)
MIN_REPS = 10


def contenders() -> dict[str, Callable]:
    """name -> fn(x (N, H), w (V, H), t (N,)) returning the mean loss. Call once per shape."""
    import crossent
    import crossent.backends.triton  # noqa: F401  (imported before torch.compile traces a call)

    def unfused(x, w, t):
        return F.cross_entropy(x @ w.T, t)

    found: dict[str, Callable] = {
        "crossent linear": lambda x, w, t: crossent.linear_cross_entropy(x, w, t),
        "torch unfused": unfused,
        "torch.compile unfused": torch.compile(unfused, fullgraph=True, dynamic=False),
    }
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        found["liger fused"] = lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t)
    except Exception as e:  # noqa: BLE001  (any failure to import leaves it out, said aloud)
        print(f"Liger left out: {e!r}", file=sys.stderr)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        found["cce exact"] = lambda x, w, t: cce(x, w, t, filter_eps=None)
    except Exception as e:  # noqa: BLE001
        print(f"CCE left out: {e!r}", file=sys.stderr)
    return found


def disagreement(fn: Callable, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> str | None:
    """Why ``fn``'s loss or gradients differ from float32 torch's beyond bf16 rounding, or None."""
    xf, wf = (a.detach().float().requires_grad_() for a in (x, w))
    ref = F.cross_entropy(xf @ wf.T, t)
    g_ref = torch.autograd.grad(ref, (xf, wf))
    del xf, wf
    loss = fn(x, w, t)
    got = torch.autograd.grad(loss, (x, w))
    loss, ref = float(loss.detach()), float(ref.detach())
    if not abs(loss - ref) <= 1e-2 * abs(ref) + 1e-3:
        return f"loss {loss:.6g} vs {ref:.6g}"
    for name, g, r in zip(("input", "weight"), got, g_ref):
        err, bound = float((g.detach().float() - r).abs().max()), 2**-6 * float(r.abs().max())
        if not err <= bound:
            return f"grad of {name} off by {err:.3g} (bound {bound:.3g})"
    return None


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

    rows = []
    steps = {}
    for name, fn in contenders().items():
        why = disagreement(fn, x, w, t)
        if why is None:
            steps[name] = step_of(fn)
        else:
            print(f"{name} disagrees with torch at {shape}, not timed: {why}", file=sys.stderr)
            rows.append(dict(N=n, H=h, V=v, impl=f"{name} (disagrees: {why})", ms=float("nan"),
                             vs_gemms=float("nan"), peak_extra_gb=float("nan")))
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
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            once_ms = (time.perf_counter() - start) * 1e3
            returned = 0 if name == "3 bare GEMMs" else grad_bytes
            peak[name] = (torch.cuda.max_memory_allocated() - base - returned) / 2**30
            samples[name].append(do_bench(step, warmup=max(5, 2 * once_ms),
                                          rep=max(50, MIN_REPS * once_ms), return_mode="median"))
    floor = statistics.median(samples["3 bare GEMMs"])
    for name, ms in samples.items():
        t_ms = statistics.median(ms)
        rows.append(dict(N=n, H=h, V=v, impl=name, ms=t_ms, vs_gemms=t_ms / floor,
                         peak_extra_gb=peak[name]))
    return rows
