"""Issue 11's targets, ``crossent bench --sweep``: crossent's time / torch's for small and
mid-size shapes, segmentation, linear CE, softmax/log_softmax/nll, the seeds' training loop.

Method (DESIGN.md, "Measuring honestly"): every case is forward + backward. Each contender runs
three warm-up calls; then a batch of ``k`` calls is one sample, ``k`` chosen from the warm-up so
a sample takes at least ~5 ms (a 64x10 call takes tens of microseconds: timing one call would
measure the clock and the scheduler); samples alternate torch, crossent, torch, crossent, ... in
one process, and the figure is the median of the per-pair ratios crossent / torch. Large cases
run fewer pairs (at least 3) so the default sweep stays under ~10 minutes on 2 cores.
Peak memory (segmentation): a fresh subprocess per case and contender, as ``crossent bench``
measures it (``MALLOC_MMAP_THRESHOLD_=131072``, warm-up, VmHWM reset, one call), as a multiple
of the logits' bytes. First call: a fresh process with numba's cache already written
(``crossent bench --jit``'s method).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import crossent

Step = Callable[[], None]
MIN_SAMPLE_S = 0.005  # a timed sample (k calls) lasts at least this long
CASE_BUDGET_S = 12.0  # pairs of a large case are cut down to about this much time (>= 3 pairs)
SEG_IGNORE = 255  # segmentation's usual "void" label; about 1 pixel in 10 carries it


@dataclass(frozen=True)
class Case:
    """One comparison: ``make()`` returns (crossent step, torch step), each one fwd+bwd."""

    name: str
    target: float  # crossent / torch must be <= this
    make: Callable[[], tuple[Step, Step]]
    logits_bytes: int = 0  # > 0: also measure peak memory (fresh process), target <= 1.0x logits


def _grad(out: torch.Tensor, inputs, up: torch.Tensor | None = None) -> None:
    """Backward to ``inputs`` without accumulating into ``.grad`` (no growing state per call)."""
    torch.autograd.grad(out, inputs, up)


def _ce(n: int, c: int, dtype: torch.dtype) -> Callable[[], tuple[Step, Step]]:
    def make() -> tuple[Step, Step]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, generator=gen).mul_(2).to(dtype).requires_grad_()  # (N, C) leaf
        t = torch.randint(0, c, (n,), generator=gen)  # (N,)
        return (lambda: _grad(crossent.cross_entropy(x, t), x),
                lambda: _grad(F.cross_entropy(x, t), x))
    return make


def _seg(shape: tuple[int, ...]) -> Callable[[], tuple[Step, Step]]:
    def make() -> tuple[Step, Step]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).requires_grad_()  # (B, C, H, W) fp32
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)  # (B, H, W)
        t[torch.rand(t.shape, generator=gen) < 0.1] = SEG_IGNORE
        return (lambda: _grad(crossent.cross_entropy(x, t, ignore_index=SEG_IGNORE), x),
                lambda: _grad(F.cross_entropy(x, t, ignore_index=SEG_IGNORE), x))
    return make


def _linear(n: int, h: int, v: int) -> Callable[[], tuple[Step, Step]]:
    def make() -> tuple[Step, Step]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, h, generator=gen).requires_grad_()  # (N, H)
        w = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_()  # (V, H)
        t = torch.randint(0, v, (n,), generator=gen)  # (N,)
        return (lambda: _grad(crossent.linear_cross_entropy(x, w, t), (x, w)),
                lambda: _grad(F.cross_entropy(x @ w.T, t), (x, w)))
    return make


def _family(shape: tuple[int, ...], family: str) -> Callable[[], tuple[Step, Step]]:
    def make() -> tuple[Step, Step]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).requires_grad_()
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
        up = torch.randn(shape, generator=gen)  # a non-trivial upstream gradient

        def step(lib) -> Step:
            if family == "nll(log_softmax)":
                return lambda: _grad(lib.nll_loss(lib.log_softmax(x, 1), t), x)
            fn = getattr(lib, family)
            return lambda: _grad(fn(x, 1), x, up)
        return step(crossent), step(F)
    return make


def _seed_loop(batch: int = 64) -> Callable[[], tuple[Step, Step]]:
    """One Adam step of the seeds' 64 -> 256 -> 128 -> 10 classifier (``crossent demo``'s model),
    on random digits-sized data: the same loop with crossent's and torch's CrossEntropyLoss."""
    from .demo import DNN

    def make() -> tuple[Step, Step]:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 64, generator=gen)  # (B, 64) like the 8x8 digits in [0, 1]
        y = torch.randint(0, 10, (batch,), generator=gen)  # (B,)

        def step(loss_fn: torch.nn.Module) -> Step:
            torch.manual_seed(0)  # same initial weights for both
            model = DNN(64, 10, softmax_output=False)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)

            def run() -> None:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            return run
        return step(crossent.CrossEntropyLoss()), step(torch.nn.CrossEntropyLoss())
    return make


# (N, C): 8 to 128256 classes, 80 to ~10^9 logits. fp32 stops at (4096, 128256): torch's fp32
# fwd+bwd at (8192, 128256) peaks near 17 GB, too much for this shared 23 GB machine.
SWEEP = [(8, 10), (64, 10), (32, 100), (256, 32), (1024, 16), (64, 1000), (256, 1000),
         (1024, 1000), (128, 32000), (512, 50257), (2048, 32000), (4096, 50257), (2048, 128256)]
SWEEP_LAST = {torch.float32: (4096, 128256), torch.bfloat16: (8192, 128256)}
SMALL = 4096  # below this many logits the target is 1.25x (per-call overhead), else 1.0x
SEG = [((8, 21, 128, 128), 1.0), ((4, 19, 256, 256), 1.0), ((2, 150, 128, 128), 1.0),
       ((16, 10, 32, 32), 1.25)]
LINEAR = [(64, 64, 1000), (256, 64, 1000)]  # (N, H, V): the case and a smaller batch
FAMILIES = ("log_softmax", "softmax", "nll(log_softmax)")
FAMILY_SHAPES = [((4096, 32000), 1.0), ((8, 21, 128, 128), 1.0), ((64, 10), 1.25)]


def cases(quick: bool) -> list[Case]:
    """The sweep's cases in order; ``quick``: one tiny case of each kind (a smoke test)."""
    if quick:
        return [Case("ce 64x10 fp32", 1.25, _ce(64, 10, torch.float32)),
                Case("seg 2x5x8x8 fp32", 1.0, _seg((2, 5, 8, 8)), 2 * 5 * 8 * 8 * 4),
                Case("linear 32x16x100 fp32", 1.0, _linear(32, 16, 100)),
                Case("softmax 64x10", 1.25, _family((64, 10), "softmax")),
                Case("seed loop (B=64)", 1.05, _seed_loop())]
    out = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for n, c in SWEEP + [SWEEP_LAST[dtype]]:
            out.append(Case(f"ce {n}x{c} {tag}", 1.25 if n * c < SMALL else 1.0, _ce(n, c, dtype)))
    for shape, target in SEG:
        out.append(Case("seg " + "x".join(map(str, shape)) + " fp32", target, _seg(shape),
                        math.prod(shape) * 4))
    for n, h, v in LINEAR:
        out.append(Case(f"linear {n}x{h}x{v} fp32", 1.0, _linear(n, h, v)))
    for shape, target in FAMILY_SHAPES:
        for family in FAMILIES:
            out.append(Case(f"{family} " + "x".join(map(str, shape)), target, _family(shape, family)))
    out.append(Case("seed loop (B=64)", 1.05, _seed_loop()))
    return out


def _sample(step: Step, k: int) -> float:
    start = time.perf_counter()
    for _ in range(k):
        step()
    return (time.perf_counter() - start) / k


def time_case(case: Case, rounds: int) -> dict:
    """Warm-up, batch size, then paired samples (torch, crossent, ...); medians per call."""
    ours, theirs = case.make()
    for _ in range(3):  # warm-up: numba dispatch, allocator pools, page faults
        ours(), theirs()
    gc.collect()
    # The batch size from the best of three short batches each: one call right after
    # gc.collect() runs on cold caches (10x a warm small call), which made k ten times too
    # small and the samples ~0.3 ms instead of MIN_SAMPLE_S.
    one = max(min(_sample(step, 3) for _ in range(3)) for step in (ours, theirs))
    k = max(1, math.ceil(MIN_SAMPLE_S / one))
    pairs = max(3, min(rounds, int(CASE_BUDGET_S / (2 * k * one))))
    t_ours, t_torch = [], []
    for _ in range(pairs):
        t_torch.append(_sample(theirs, k))
        t_ours.append(_sample(ours, k))
    del ours, theirs
    gc.collect()
    return dict(case=case.name, target=case.target, ours_ms=1e3 * statistics.median(t_ours),
                torch_ms=1e3 * statistics.median(t_torch), calls_per_sample=k, pairs=pairs,
                ratio=statistics.median(a / b for a, b in zip(t_ours, t_torch)))


def _memory_child(name: str, quick: bool, which: str) -> dict:
    """In a fresh process: extra peak resident bytes of one call after a warm-up."""
    from .bench import _status_kib

    case = next(c for c in cases(quick) if c.name == name)
    ours, theirs = case.make()
    step = ours if which == "crossent" else theirs
    step()  # warm-up: JIT, thread pools, allocator
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    step()
    extra = 1024 * (_status_kib("VmHWM") - before)
    return dict(extra_bytes=extra, extra_x=extra / case.logits_bytes)


def memory(case: Case, quick: bool) -> dict:
    """``{contender: extra peak as a multiple of the logits}``, one fresh subprocess each."""
    # CROSSENT_CPU_CACHE=0: a cached gradient mapping from the warm-up would hide the peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "CROSSENT_CPU_CACHE": "0"}
    out = {}
    for which in ("crossent", "torch"):
        cmd = [sys.executable, "-m", "crossent", "bench", "--sweep", "--_memory", case.name, which]
        cmd += ["--quick"] if quick else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[which] = json.loads(proc.stdout.splitlines()[-1])["extra_x"]
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossent bench --sweep", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one tiny case of each kind (smoke test)")
    p.add_argument("--rounds", type=int, default=None,
                   help="paired samples per case (default 9, 3 with --quick; large cases: fewer)")
    p.add_argument("--only", nargs="+", metavar="PREFIX",
                   help="only cases whose name starts so (e.g. 'ce 64x' seg; one that matches "
                        "nothing, e.g. none, leaves only the first-call measurement)")
    p.add_argument("--no-memory", action="store_true", help="skip the segmentation memory probes")
    p.add_argument("--no-jit", action="store_true", help="skip the first-call measurement")
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    p.add_argument("--plain", action="store_true", help="plain text tables, no rich")
    p.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print one table with pass/fail per target, optionally write JSON."""
    args = _parser().parse_args(argv)
    if args._memory:
        print(json.dumps(_memory_child(args._memory[0], args.quick, args._memory[1])))
        return 0
    from .bench import _machine, first_call_times
    from .console import Console

    console = Console(plain=args.plain)
    chosen = [c for c in cases(args.quick)
              if not args.only or any(c.name.startswith(p) for p in args.only)]
    machine = _machine()
    console.line(f"load average at start: {machine['load_avg']}")
    # The timings are of the loaded backend: until numba's background load ends, impl="auto"
    # runs the torch stand-in, and a case timed then (the first of an --only run) mixed the two.
    # (The first call is measured on its own, in fresh processes.)
    from .._core.dispatch import ready

    ready("numba", wait=True)
    from ..backends import native

    # the measured configuration: the small calls' nodes are compiled ones only once built
    machine["native"] = native.load_built()
    console.line("compiled nodes: " + ("loaded" if machine["native"] else
                                       "not loaded (Python nodes; `crossent build` makes them)"))
    rows = []
    with console.progress("sweep", len(chosen)) as step_done:
        for case in chosen:
            row = time_case(case, args.rounds or (3 if args.quick else 9))
            if case.logits_bytes and not args.no_memory:
                row["memory_x"] = memory(case, args.quick)
            rows.append(row)
            step_done()
    # The first call in a fresh process: its own cold run writes numba's cache first.
    jit = [] if args.quick or args.no_jit else first_call_times()
    table = []
    for r in rows:
        mem = r.get("memory_x")
        r["pass"] = ok = r["ratio"] <= r["target"] and (mem is None or mem["crossent"] <= 1.0)
        table.append((r["case"], f"{r['ours_ms']:.3f}", f"{r['torch_ms']:.3f}", f"{r['ratio']:.2f}",
                      f"<= {r['target']:.2f}",
                      "-" if mem is None else f"{mem['crossent']:.2f} / {mem['torch']:.2f}",
                      f"{r['calls_per_sample']}x{r['pairs']}", "pass" if ok else "FAIL"))
    console.table("fwd+bwd, crossent / torch: median of per-pair ratios (samples of k calls, "
                  "k x pairs); memory: extra peak / logits bytes, crossent / torch (target <= 1.0)",
                  ["case", "crossent ms", "torch ms", "ratio", "target", "memory x",
                   "k x pairs", "result"], table, left=1)
    for r in jit:
        if "returncode" in r:
            console.line(f"first fwd+bwd in a fresh process, {r['cache']}: the process failed "
                         f"(exit status {r['returncode']}):\n{r['stderr']}")
            continue
        console.line(f"first fwd+bwd in a fresh process, {r['cache']}: {r['seconds']:.3f} s"
                     + (" (target <= 0.25 s)" if r["cache"] == "warm cache" else ""))
    console.line(f"load average at end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                           command="crossent bench --sweep " + " ".join(argv or []),
                           machine=machine, rows=rows, jit=jit), f, indent=1)
    return 0
