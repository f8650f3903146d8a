"""Fused linear + cross-entropy on CPU: crossent vs torch, fp32 forward + backward.

Contenders, each returning the gradients of input, weight and bias:
- ``crossent``: ``crossent.linear.linear_cross_entropy`` (chunked, gradients made in forward);
- ``torch``: unfused ``F.cross_entropy(x @ W.T + b, t)``;
- ``torch_chunked``: ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  (torch >= 2.13; skipped where absent).

Time: contenders alternate in one process (A B C A B C ...) after a warm-up; the table gives
the median of the per-round ratios to each torch contender, and median absolute times.
Memory: a fresh subprocess per (shape, contender) with ``MALLOC_MMAP_THRESHOLD_=131072`` and
``CROSSENT_CPU_CACHE=0`` (big blocks come from mmap and are unmapped when freed, so the peak is
not hidden by a resident heap or buffer cache); after one warm-up call the gradients are dropped, VmHWM is reset (``5`` into
``/proc/self/clear_refs``), one fwd+bwd runs, and ``extra = VmHWM - VmRSS(before) - bytes of the
returned gradients``.

    python benchmarks/bench_linear.py                  # the three issue shapes
    python benchmarks/bench_linear.py --shapes 2048,512,32000 --rounds 5
    python benchmarks/bench_linear.py --shapes 1024,2048,128256 --no-memory --chunk-sizes 96,128,512
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(2048, 512, 32000), (4096, 1024, 50257), (1024, 2048, 128256)]
MIB = 1 << 20


def contenders(chunk_sizes: tuple[int, ...] = ()) -> dict:
    from crossent.linear import linear_cross_entropy

    out = {
        "crossent": lambda x, w, b, t: linear_cross_entropy(x, w, t, b),
        "torch": lambda x, w, b, t: F.cross_entropy(x @ w.T + b, t),
    }
    for rows in chunk_sizes:  # the chunk-size trade-off: crossent with a fixed chunk_size
        out[f"crossent r={rows}"] = (
            lambda rows: lambda x, w, b, t: linear_cross_entropy(x, w, t, b, chunk_size=rows))(rows)
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


def time_shape(shape, rounds: int, chunk_sizes: tuple[int, ...] = ()) -> dict:
    fns = contenders(chunk_sizes)
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
    # CROSSENT_CPU_CACHE=0: freed huge-page buffers are unmapped, so the warm-up call's buffers
    # do not sit in RSS before the measured call and hide its peak.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", CROSSENT_CPU_CACHE="0")
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_linear; bench_linear.memory_child({tuple(shape)!r}, {name!r})")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=None, help="N,H,V triples")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--chunk-sizes", default="",
                        help="comma-separated rows: also time crossent with these chunk sizes "
                             "(ratios to torch unfused; no memory)")
    args = parser.parse_args()
    sweep = tuple(int(v) for v in args.chunk_sizes.split(",") if v)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    names = list(contenders())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 fwd+bwd, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    head = ["N, H, V"] + [f"{n} s" for n in names] + [f"crossent / {n}" for n in names[1:]]
    head += [f"extra MiB {n}" for n in names]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for shape in shapes:
        row = [", ".join(str(v) for v in shape)]
        if not args.no_time:
            res = time_shape(shape, args.rounds, sweep)
            row += [f"{res[n]:.2f}" for n in names]
            row += [f"{res['ratio_' + n]:.2f}x" for n in names[1:]]
            for rows in sweep:
                print(f"  {shape}: chunk_size={rows}: {res[f'crossent r={rows}']:.2f} s, "
                      f"{res[f'ratio_crossent r={rows}']:.2f}x torch unfused", flush=True)
        else:
            row += ["-"] * (2 * len(names) - 1)
        if not args.no_memory:
            row += [f"{measure_memory(shape, n) / MIB:.0f}" for n in names]
        else:
            row += ["-"] * len(names)
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
