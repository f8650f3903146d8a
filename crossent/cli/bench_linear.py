"""Fused linear + cross-entropy on CPU: crossent vs torch, fp32 forward + backward.

Used by ``crossent bench --linear`` (rows in its report) and ``crossent bench --linear-only``
(:func:`main`: a markdown table, with ``--floor`` and the ``--chunk-sizes`` trade-off).
Contenders, each returning the gradients of input, weight and bias:
- ``crossent``: ``crossent.linear.linear_cross_entropy`` (chunked, gradients made in forward);
- ``torch``: unfused ``F.cross_entropy(x @ W.T + b, t)``;
- ``torch_chunked``: ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  (torch >= 2.13; skipped where absent).

Time: contenders alternate in one process (A B C A B C ...) after a warm-up; ratios are the
median of the per-round ratios, absolute times the medians.
Memory: a fresh subprocess per (shape, contender) with ``MALLOC_MMAP_THRESHOLD_=131072`` and
``CROSSENT_CPU_CACHE=0`` (big blocks come from mmap and are unmapped when freed, so the peak is
not hidden by a resident heap or buffer cache); after one warm-up call the gradients are
dropped, VmHWM is reset (``5`` into ``/proc/self/clear_refs``), one fwd+bwd runs, and
``extra = VmHWM - VmRSS(before) - bytes of the returned gradients``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = [(2048, 512, 32000), (4096, 1024, 50257), (1024, 2048, 128256)]  # (N, H, V)
QUICK_SHAPES = [(256, 128, 4096)]


def contenders(chunk_sizes: tuple[int, ...] = ()) -> dict[str, Callable]:
    """name -> fn(x (N, H), w (V, H), b (V,), t (N,)) returning the mean loss."""
    from crossent.linear import linear_cross_entropy

    out = {
        "crossent": lambda x, w, b, t: linear_cross_entropy(x, w, t, linear_bias=b),
        "torch": lambda x, w, b, t: F.cross_entropy(x @ w.T + b, t),
    }
    for rows in chunk_sizes:  # the chunk-size trade-off: crossent with a fixed chunk_size
        out[f"crossent r={rows}"] = (
            lambda rows: lambda x, w, b, t: linear_cross_entropy(
                x, w, t, linear_bias=b, chunk_size=rows))(rows)
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        out["torch_chunked"] = lambda x, w, b, t: F.linear_cross_entropy(
            x, w, t, linear_bias=b, options=options)
    return out


def make_inputs(n: int, h: int, v: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen).requires_grad_()  # (N, H)
    w = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_()  # (V, H)
    b = (torch.randn(v, generator=gen) * 0.1).requires_grad_()  # (V,)
    t = torch.randint(0, v, (n,), generator=gen)  # (N,) every row counted
    return x, w, b, t


def step(fn, x, w, b, t) -> float:
    """One forward + backward; returns seconds. Gradients are dropped first."""
    x.grad = w.grad = b.grad = None
    start = time.perf_counter()
    fn(x, w, b, t).backward()
    return time.perf_counter() - start


def gemm_floor() -> Callable:
    """The three fp32 products any exact linear CE runs (logits, grad of input, grad of weight),
    into buffers made on the first call: no loss, no page faults. Returns ``x.sum() * 0`` so
    :func:`step` can time it like a contender; the floor no implementation here can beat."""
    bufs: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def fn(x, w, b, t):
        key = (x.shape[0], w.shape[0])
        if key not in bufs:
            bufs[key] = (x.new_empty(key), torch.empty_like(x), torch.empty_like(w))
        logits, gx, gw = bufs[key]
        with torch.no_grad():
            torch.mm(x, w.t(), out=logits)
            torch.mm(logits, w, out=gx)
            torch.mm(logits.t(), x, out=gw)
        return x.sum() * 0

    return fn


def time_shape(shape, rounds: int, chunk_sizes: tuple[int, ...] = (),
               extra: dict[str, Callable] | None = None) -> dict:
    """Median seconds per contender, and ``ratio_<other>`` = median crossent / other per round.
    ``extra``: more name -> fn entries timed in the same rounds (e.g. :func:`gemm_floor`)."""
    fns = {**contenders(chunk_sizes), **(extra or {})}
    inputs = make_inputs(*shape)
    for fn in fns.values():  # warm-up: numba compile, allocator, page faults of the weights
        step(fn, *inputs)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(step(fn, *inputs))
    result = {name: statistics.median(ts) for name, ts in times.items()}
    for other in fns:
        if not other.startswith("crossent"):
            ratios = [a / b for a, b in zip(times["crossent"], times[other])]
            result[f"ratio_{other}"] = statistics.median(ratios)
            for name in fns:  # fixed chunk sizes, against torch unfused only
                if name.startswith("crossent r=") and other == "torch":
                    result[f"ratio_{name}"] = statistics.median(
                        a / b for a, b in zip(times[name], times[other]))
    # every contender's own ratio to torch unfused, for the CLI table
    result["vs_torch"] = {name: statistics.median(a / b for a, b in zip(ts, times["torch"]))
                          for name, ts in times.items()}
    return result


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(shape, name: str) -> None:
    """Runs in a fresh process: print the extra peak of one fwd+bwd as JSON."""
    fn = contenders()[name]
    x, w, b, t = make_inputs(*shape)
    step(fn, x, w, b, t)
    x.grad = w.grad = b.grad = None
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(fn, x, w, b, t)
    peak = _status("VmHWM")
    grads = sum(g.numel() * g.element_size() for g in (x.grad, w.grad, b.grad))
    print(json.dumps({"extra": peak - before - grads, "grads": grads}))


def measure_memory(shape, name: str) -> int:
    """Extra peak bytes of one fwd+bwd of contender ``name``, measured in a fresh process."""
    # CROSSENT_CPU_CACHE=0: freed huge-page buffers are unmapped, so the warm-up call's buffers
    # do not sit in RSS before the measured call and hide its peak.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", CROSSENT_CPU_CACHE="0")
    code = (f"from crossent.cli.bench_linear import memory_child; "
            f"memory_child({tuple(shape)!r}, {name!r})")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra"]


def linear_rows(shapes, rounds: int, memory: bool, step_done: Callable[[], None]) -> list[dict]:
    """One row per shape and contender for ``crossent bench --linear``; ``step_done`` per shape."""
    rows = []
    for shape in shapes:
        res = time_shape(shape, rounds)
        n, _, v = shape
        logits_bytes = n * v * 4  # fp32 (N, V) logits that the unfused path materialises
        for name, ratio in res["vs_torch"].items():
            extra = measure_memory(shape, name) if memory else None
            rows.append(dict(shape=",".join(map(str, shape)), contender=name,
                             median_ms=1e3 * res[name], ratio=ratio, runs=rounds,
                             extra_bytes=extra,
                             extra_x=None if extra is None else extra / logits_bytes))
        step_done()
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossent bench --linear-only",
                                description="linear + cross-entropy on CPU as a markdown table")
    p.add_argument("--shapes", nargs="*", default=None, help=f"N,H,V triples (default {SHAPES})")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds after warm-up")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory probes")
    p.add_argument("--no-time", action="store_true", help="memory only")
    p.add_argument("--chunk-sizes", default="",
                   help="comma-separated rows: also time crossent with these chunk sizes "
                        "(ratios to torch unfused; no memory)")
    p.add_argument("--floor", action="store_true",
                   help="also time the three bare fp32 products (logits, grad of input, grad of "
                        "weight) into ready buffers: the floor for any exact method")
    return p


def main(argv: list[str] | None = None) -> int:
    """``crossent bench --linear-only``: print one markdown row per shape (BENCHMARKS.md's table)."""
    args = _parser().parse_args(argv)
    sweep = tuple(int(v) for v in args.chunk_sizes.split(",") if v)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    names = list(contenders())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 fwd+bwd, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    head = ["N, H, V"] + [f"{n} s" for n in names] + [f"crossent / {n}" for n in names[1:]]
    if args.floor:
        head += ["3 GEMMs s", "crossent / 3 GEMMs", "torch / 3 GEMMs"]
    head += [f"extra MiB {n}" for n in names]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for shape in shapes:
        row = [", ".join(str(v) for v in shape)]
        if not args.no_time:
            res = time_shape(shape, args.rounds, sweep, {"gemms": gemm_floor()} if args.floor else None)
            row += [f"{res[n]:.2f}" for n in names]
            row += [f"{res['ratio_' + n]:.2f}x" for n in names[1:]]
            if args.floor:
                row += [f"{res['gemms']:.2f}", f"{res['ratio_gemms']:.2f}x",
                        f"{1 / res['vs_torch']['gemms']:.2f}x"]
            for rows in sweep:
                print(f"  {shape}: chunk_size={rows}: {res[f'crossent r={rows}']:.2f} s, "
                      f"{res[f'ratio_crossent r={rows}']:.2f}x torch unfused", flush=True)
        else:
            row += ["-"] * (2 * len(names) - 1 + 3 * args.floor)
        row += ([f"{measure_memory(shape, n) / 2**20:.0f}" for n in names] if not args.no_memory
                else ["-"] * len(names))
        print("| " + " | ".join(row) + " |", flush=True)
    return 0
