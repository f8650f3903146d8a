"""GPU cross-entropy benchmark core (issue 5), shared by ``crossent bench`` (when CUDA is
available) and ``benchmarks/bench_triton.py``: crossent's Triton kernel vs torch eager,
torch.compile and Liger (when importable), bf16 logits, fwd+bwd and forward only.

Time is the median of ``triton.testing.do_bench`` medians, taken in rounds that alternate the
contenders (A B C A B C ...), each call on the next of several input buffers (together larger
than L2) so no contender reads logits that a previous call left in L2. Effective bandwidth
counts the bytes that must move: fwd+bwd reads the logits and writes their gradient, forward
only reads the logits (targets and per-row outputs are < 0.1% and not counted).
"""
from __future__ import annotations

import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = [(32768, 4096), (32768, 65536), (16384, 131072)]  # (N, V) from issue 5
QUICK_SHAPES = [(4096, 32768)]
L2_BYTES = 50 * 2**20  # H100: 50 MB; rotating at least 4x this defeats it on any current GPU


def contenders(inplace: bool) -> dict[str, Callable]:
    """name -> fn(logits, target) returning the mean loss; all take (N, V) bf16 logits."""
    import crossent
    import crossent.backends.triton  # noqa: F401  (imported before torch.compile traces a call)

    found: dict[str, Callable] = {
        "crossent triton": lambda x, y: crossent.cross_entropy(x, y, impl="triton"),
        "torch eager": F.cross_entropy,
        "torch.compile": torch.compile(F.cross_entropy, fullgraph=True),
    }
    if inplace:
        found["crossent triton inplace"] = lambda x, y: crossent.cross_entropy(
            x, y, impl="triton", inplace_backward=True)
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        found["liger"] = lambda x, y: liger_cross_entropy(x, y)
    except ImportError:
        print("liger_kernel not importable: Liger left out", file=sys.stderr)
    return found


def copy_bandwidth(n_bytes: int) -> float:
    """TB/s of a device-to-device copy of ``n_bytes`` (counted read + write)."""
    from triton.testing import do_bench

    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    return 2 * n_bytes / (ms * 1e-3) / 1e12


def bench_case(n_rows: int, n_classes: int, fns: dict[str, Callable], rounds: int) -> list[dict]:
    from triton.testing import do_bench

    buf_bytes = n_rows * n_classes * 2
    n_bufs = max(2, -(-4 * L2_BYTES // buf_bytes))  # ceil: together >= 4x L2
    gen = torch.Generator(device="cuda").manual_seed(0)
    # (N, V) bf16 leaves, each used in turn; a fresh non-leaf view per call for in-place grads
    xs = [(torch.randn(n_rows, n_classes, device="cuda", generator=gen) * 2).bfloat16()
          for _ in range(n_bufs)]
    ys = [torch.randint(0, n_classes, (n_rows,), device="cuda", generator=gen) for _ in range(n_bufs)]
    out = []
    for mode in ("fwd+bwd", "fwd"):
        samples: dict[str, list[float]] = {name: [] for name in fns}
        peak: dict[str, int] = {}
        for _ in range(rounds):
            for name, fn in fns.items():
                if mode == "fwd" and name.endswith("inplace"):
                    continue
                step = _step(fn, xs, ys, mode, inplace=name.endswith("inplace"))
                step()  # compile / autotune outside the timing
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peak[name] = torch.cuda.max_memory_allocated() - base
                samples[name].append(do_bench(step, warmup=10, rep=100))
        moved = buf_bytes * (2 if mode == "fwd+bwd" else 1)
        for name, ms in samples.items():
            if not ms:
                continue
            t = statistics.median(ms)
            out.append(dict(N=n_rows, V=n_classes, mode=mode, impl=name, ms=t,
                            tb_s=moved / (t * 1e-3) / 1e12, peak_extra_gb=peak[name] / 2**30))
    return out


def _step(fn: Callable, xs: list, ys: list, mode: str, inplace: bool) -> Callable[[], None]:
    """One call on the next buffer: forward only (no_grad), or forward + grad w.r.t. logits."""
    state = {"i": 0}

    def run() -> None:
        i = state["i"] = (state["i"] + 1) % len(xs)
        if mode == "fwd":
            with torch.no_grad():
                fn(xs[i], ys[i])
            return
        leaf = xs[i].detach().requires_grad_()
        # In-place contenders (ours with inplace_backward, Liger always) leave gradients in the
        # buffers that later calls read as logits: finite values, and no kernel here branches
        # on data, so the timings are unaffected.
        # in-place needs logits made by an op, as in a model; view_as costs nothing
        x = leaf.view_as(leaf) if inplace else leaf
        loss = fn(x, ys[i])
        torch.autograd.grad(loss, leaf)

    return run


def run(quick: bool, rounds: int, step_done: Callable[[], None] = lambda: None) -> dict:
    """Every shape (one small one with ``quick``): device info and one row per shape, mode, impl."""
    import triton

    props = torch.cuda.get_device_properties(0)
    fns = contenders(inplace=True)
    rows = []
    for n_rows, n_classes in QUICK_SHAPES if quick else SHAPES:
        rows += bench_case(n_rows, n_classes, fns, 1 if quick else rounds)
        step_done()
    return dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                copy_tb_s=copy_bandwidth(2**30), rows=rows)
