"""CPU timing and peak-memory harness: crossent vs torch eager (and torch.compile), ``crossent bench``.

Method (DESIGN.md, "Measuring honestly"):
- time: every contender runs once as warm-up, then the contenders alternate (A B C A B C ...)
  ``--repeats`` times in one process; each contender's figure is the median of its per-round
  ratio to torch eager, so drift of the shared machine cancels within a round;
- peak memory: a fresh subprocess per case and contender (``MALLOC_MMAP_THRESHOLD_=131072`` so
  glibc serves large blocks from fresh mappings), one warm-up call, then ``5`` is written to
  ``/proc/self/clear_refs`` (resets VmHWM), one more call runs, and ``VmHWM - VmRSS(before)`` is
  reported as a multiple of the logits' size ``N * C * itemsize``;
- torch's allocator reads ``THP_MEM_ALLOC_ENABLE`` once per process: ``--thp both`` times a
  second set in a child process with it set to 1.
Targets: class-index targets, reduction "mean", every 7th row ignored.
Effective bandwidth (GB/s) counts the bytes that must move: fwd+bwd reads the logits and writes
their gradient, fwd and no-grad read them. ``--linear`` adds bench_linear.py's cases;
with CUDA (and triton) bench_gpu.py's CE shapes run too. Tables and ``--plot``: bench_report.py.
Other modes: ``--sweep`` (issue 11's targets, bench_sweep.py), ``--linear-only`` (the linear CE
table with ``--shapes``, ``--floor``, ``--chunk-sizes``: bench_linear.py), ``--gpu`` (the full
GPU benchmark with ``--linear``, ``--sweep``, ``--markdown``: bench_gpu.py).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import math
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

import crossent

from .._core.dispatch import ready
from . import bench_linear as _bench_linear
from .bench_report import plot, print_report

CASES = {  # name -> (N, C, dtype)
    "8192x32000": (8192, 32000, torch.float32),
    "4096x50257": (4096, 50257, torch.float32),
    "2048x128256": (2048, 128256, torch.float32),
    "bf16-8192x32000": (8192, 32000, torch.bfloat16),
}
QUICK_CASES = {"512x8192": (512, 8192, torch.float32), "bf16-256x8192": (256, 8192, torch.bfloat16)}
MODES = ("fwd+bwd", "fwd", "no-grad")
IGNORE_EVERY = 7  # about 1/7 of the rows carry ignore_index, as in padded LM batches
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _contenders(with_compile: bool) -> dict[str, tuple[Loss, bool]]:
    """name -> (loss function, writes the gradient into the logits)."""
    out: dict[str, tuple[Loss, bool]] = {
        "torch": (F.cross_entropy, False),
        "crossent": (crossent.cross_entropy, False),
        "crossent inplace": (lambda x, t: crossent.cross_entropy(x, t, inplace_backward=True), True),
    }
    if with_compile:
        out["torch.compile"] = (torch.compile(F.cross_entropy, dynamic=False), False)
    return out


def _inputs(n: int, c: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, c, generator=gen).mul_(2).to(dtype).requires_grad_()  # (N, C) leaf
    target = torch.randint(0, c, (n,), generator=gen)  # (N,)
    target[::IGNORE_EVERY] = -100
    return logits, target


def _prepare(base: torch.Tensor, inplace: bool) -> torch.Tensor:
    # In-place needs non-leaf logits (a model's output) and fresh values each call; not timed.
    return base.clone() if inplace else base


def _call(fn: Loss, mode: str, logits: torch.Tensor, target: torch.Tensor) -> None:
    if mode == "no-grad":  # evaluation: logits made under no_grad do not require grad
        with torch.no_grad():
            fn(logits.detach(), target)
        return
    loss = fn(logits, target)
    if mode == "fwd+bwd":
        torch.autograd.grad(loss, logits)  # the gradient w.r.t. the logits, no accumulation


def _timed(fn: Loss, inplace: bool, mode: str, base: torch.Tensor, target: torch.Tensor) -> float:
    logits = _prepare(base, inplace)
    gc.collect()
    start = time.perf_counter()
    _call(fn, mode, logits, target)
    return time.perf_counter() - start


def _applicable(name: str, inplace: bool, mode: str) -> bool:
    return not inplace or mode == "fwd+bwd"


def time_cases(cases: dict, modes: tuple[str, ...], repeats: int, with_compile: bool,
               step_done: Callable[[], None] = lambda: None) -> list[dict]:
    """Alternating timings in this process; one row per case, mode and contender.

    ``step_done`` is called after each (case, mode), outside the timed calls (progress bar)."""
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1"
    contenders = _contenders(with_compile)
    rows = []
    for case, (n, c, dtype) in cases.items():
        base, target = _inputs(n, c, dtype)
        for mode in modes:
            names = [k for k, (_, inplace) in contenders.items() if _applicable(k, inplace, mode)]
            first = {k: _timed(*contenders[k], mode, base, target) for k in names}  # warm-up
            times: dict[str, list[float]] = {k: [] for k in names}
            for _ in range(repeats):
                for k in names:
                    times[k].append(_timed(*contenders[k], mode, base, target))
            # effective bandwidth: the bytes that must move (logits read, gradient written)
            moved = n * c * base.element_size() * (2 if mode == "fwd+bwd" else 1)
            for k in names:
                ratios = [a / b for a, b in zip(times[k], times["torch"])]
                median = statistics.median(times[k])
                rows.append(dict(case=case, mode=mode, contender=k, thp=thp,
                                 median_ms=1e3 * median, ratio=statistics.median(ratios),
                                 gb_per_s=moved / median / 1e9, first_ms=1e3 * first[k],
                                 runs=repeats))
            step_done()
        del base, target
        gc.collect()
    return rows


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(case: str, contender: str, mode: str) -> dict:
    """Runs in a fresh process: extra peak resident memory of one call after a warm-up."""
    n, c, dtype = {**CASES, **QUICK_CASES}[case]
    fn, inplace = _contenders(contender == "torch.compile")[contender]
    base, target = _inputs(n, c, dtype)
    _call(fn, mode, _prepare(base, inplace), target)  # warm-up: JIT, thread pools, allocator
    logits = _prepare(base, inplace)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    _call(fn, mode, logits, target)
    extra = 1024 * (_status_kib("VmHWM") - before)
    return dict(case=case, contender=contender, mode=mode, extra_bytes=extra,
                extra_x=extra / (n * c * base.element_size()))


def memory_runs(with_compile: bool) -> list[tuple[str, str, str]]:
    """(contender, mode, THP_MEM_ALLOC_ENABLE) of the memory probes, per case."""
    runs = [("torch", "fwd+bwd", "0"), ("torch", "fwd+bwd", "1"), ("crossent", "fwd+bwd", "0"),
            ("crossent inplace", "fwd+bwd", "0"), ("torch", "no-grad", "0"),
            ("crossent", "no-grad", "0")]
    if with_compile:
        runs.append(("torch.compile", "fwd+bwd", "0"))
    return runs


def memory_cases(cases: dict, with_compile: bool,
                 step_done: Callable[[], None] = lambda: None) -> list[dict]:
    """One fresh subprocess per case, contender and mode; torch with and without THP."""
    rows = []
    for case in cases:
        for contender, mode, thp in memory_runs(with_compile):
            # CROSSENT_CPU_CACHE=0: the warm-up's cached gradient mapping would otherwise be
            # resident before the measured call and hide its peak.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "THP_MEM_ALLOC_ENABLE": thp,
                   "CROSSENT_CPU_CACHE": "0"}
            cmd = [sys.executable, "-m", "crossent.cli.bench", "--_memory", case, contender, mode]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rows.append({**json.loads(proc.stdout.splitlines()[-1]), "thp": thp == "1"})
            step_done()
    return rows


def alloc_fill_rates(nbytes: int, rounds: int) -> list[dict]:
    """GB/s of allocating and filling a fresh buffer: torch.empty vs crossent's huge-page buffer."""
    from ..backends._cpu_alloc import empty_huge

    makers = {"torch.empty": lambda n: torch.empty(n, dtype=torch.uint8),
              "huge-page mmap (crossent)": lambda n: empty_huge((n,), torch.uint8)}
    times: dict[str, list[float]] = {k: [] for k in makers}
    for _ in range(rounds):
        for name, make in makers.items():
            start = time.perf_counter()
            make(nbytes).fill_(1)
            times[name].append(time.perf_counter() - start)
            gc.collect()
    return [dict(allocator=k, gb=nbytes / 1e9, gb_per_s=nbytes / 1e9 / statistics.median(v),
                 runs=[round(t, 3) for t in v]) for k, v in times.items()]


def first_call_times() -> list[dict]:
    """Seconds from a fresh process's first fwd+bwd (64x32000) to its end: cold and warm JIT cache."""
    script = ("import time, torch, crossent; x = torch.randn(64, 32000, requires_grad=True); "
              "t = torch.randint(0, 32000, (64,)); s = time.perf_counter(); "
              "crossent.cross_entropy(x, t).backward(); print(time.perf_counter() - s)")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold cache", "warm cache"):  # the same empty directory, filled by the first
            env = {**os.environ, "NUMBA_CACHE_DIR": cache}
            run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                 text=True)
            if run.returncode != 0:  # reported with the rest, not lost with it
                rows.append(dict(cache=label, seconds=math.nan, returncode=run.returncode,
                                 stderr=run.stderr[-2000:]))
                continue
            rows.append(dict(cache=label, seconds=float(run.stdout.split()[-1])))
    return rows


def _machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=model, cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, load_avg=os.getloadavg(),
                thp=open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
                if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled") else "n/a")


def _timing_in_child(args: argparse.Namespace, thp: str) -> list[dict]:
    """Time the same cases in a subprocess whose torch allocator sees THP_MEM_ALLOC_ENABLE=thp."""
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        cmd = [sys.executable, "-m", "crossent.cli.bench", "--cases", *args.cases, "--modes",
               *args.modes, "--repeats", str(args.repeats), "--thp", "here", "--no-memory",
               "--json", tmp.name, "--plain", "--no-gpu"]
        if args.compile:
            cmd.append("--compile")
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp}
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.load(open(tmp.name))["timing"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crossent bench", description=__doc__.splitlines()[0],
        epilog="other benchmarks, each with its own --help: --sweep (issue 11's targets, pass/fail), "
               "--linear-only (the linear CE table: --shapes, --floor, --chunk-sizes), "
               "--gpu (Triton kernels, needs CUDA: --linear, --sweep, --markdown)")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test, CI)")
    p.add_argument("--cases", nargs="+", help=f"cases to run (default: all of {list(CASES)})")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds after warm-up (>= 5)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(F.cross_entropy)")
    p.add_argument("--thp", choices=("off", "on", "both", "here"), default=None,
                   help="torch allocator huge pages (THP_MEM_ALLOC_ENABLE) for the timings; "
                        "default both (off only with --quick)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--jit", action="store_true", help="also time the first call, cold/warm JIT cache")
    p.add_argument("--linear", action="store_true",
                   help="also time linear + cross-entropy (crossent vs torch unfused / chunked)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU benchmark even with CUDA")
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of speed-ups (and memory) vs torch")
    p.add_argument("--plain", action="store_true", help="plain text tables, no rich, no progress bar")
    p.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    return p


# The other benchmarks of ``crossent bench``, one flag each, checked in this order (``--gpu``
# first: ``--linear`` and ``--sweep`` are also flags of the GPU benchmark).
OTHER_MODES = {"--gpu": "bench_gpu", "--sweep": "bench_sweep", "--linear-only": "bench_linear"}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints tables (rich when installed) and optionally writes JSON.

    ``--gpu``, ``--sweep`` or ``--linear-only`` hands the other arguments to that benchmark."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Timings and memory are of the steady state: wait for the background load of numba that
    # impl="auto" starts (the first call of a process is timed on its own, in a fresh one).
    ready("numba", wait=True)
    for flag, module in OTHER_MODES.items():
        if flag in argv:
            rest = [a for a in argv if a != flag]
            return int(importlib.import_module(f"{__package__}.{module}").main(rest) or 0)
    args = _parser().parse_args(argv)
    if args._memory:
        print(json.dumps(_memory_child(*args._memory)))
        return 0
    from .console import Console

    console = Console(plain=args.plain)
    known = QUICK_CASES if args.quick else CASES
    args.cases = args.cases or list(known)
    cases = {k: {**CASES, **QUICK_CASES}[k] for k in args.cases}
    thp_runs = {"here": [None], "off": ["0"], "on": ["1"], "both": ["0", "1"]}[
        args.thp or ("off" if args.quick else "both")]
    here = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    in_here = [t for t in thp_runs if t is None or t == here]
    gpu_wanted = (not args.no_gpu and torch.cuda.is_available()
                  and importlib.util.find_spec("triton") is not None)
    linear_shapes = _bench_linear.QUICK_SHAPES if args.quick else _bench_linear.SHAPES
    total = (len(cases) * len(args.modes) * len(in_here) + len(thp_runs) - len(in_here)
             + (0 if args.no_memory else len(cases) * len(memory_runs(args.compile)))
             + (len(linear_shapes) if args.linear else 0)
             + (len(_bench_gpu_shapes(args.quick)) if gpu_wanted else 0))
    timing: list[dict] = []
    with _progress(console, args.plain, total) as step:
        for thp in thp_runs:
            if thp is None or thp == here:
                timing += time_cases(cases, tuple(args.modes), args.repeats, args.compile, step)
            else:
                timing += _timing_in_child(args, thp)
                step()
        memory = [] if args.no_memory else memory_cases(cases, args.compile, step)
        linear = (_bench_linear.linear_rows(linear_shapes, args.repeats, not args.no_memory, step)
                  if args.linear else [])
        gpu = _run_gpu(args.quick, args.repeats, step) if gpu_wanted else None
    if not gpu_wanted:
        console.line("GPU benchmark skipped: " + ("--no-gpu" if args.no_gpu else "no CUDA GPU"
                     if not torch.cuda.is_available() else "triton is not installed"))
    jit = first_call_times() if args.jit else []
    n, c, dtype = next(iter(cases.values()))
    alloc = alloc_fill_rates(n * c * torch.empty((), dtype=dtype).element_size(), args.repeats)
    machine = _machine()
    print_report(console, timing, memory, jit, alloc, machine, linear, gpu)
    if args.plot:
        skipped = plot(args.plot, timing, memory, linear)
        console.line(skipped or f"plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                           command="crossent bench " + " ".join(argv),
                           machine=machine, timing=timing, memory=memory, jit=jit, alloc=alloc,
                           linear=linear, gpu=gpu), f, indent=1)
    return 0


def _progress(console, plain: bool, total: int):
    """A progress bar over the measured steps; nothing with ``--plain`` (its output is parsed)."""
    return contextlib.nullcontext(lambda: None) if plain else console.progress("measuring", total)


def _bench_gpu_shapes(quick: bool) -> list:
    from . import bench_gpu as _bench_gpu

    return _bench_gpu.QUICK_SHAPES if quick else _bench_gpu.SHAPES


def _run_gpu(quick: bool, rounds: int, step: Callable[[], None]) -> dict:
    from . import bench_gpu as _bench_gpu  # imports triton: only when a GPU is there

    return _bench_gpu.run(quick, rounds, step)


if __name__ == "__main__":
    sys.exit(main())
