"""GPU cross-entropy benchmark (issues 5 and 13): crossent's Triton kernel vs torch eager,
torch.compile, and Liger, quack and flash-attention's Triton CE where they import; bf16 logits,
fwd+bwd and forward only. ``crossent bench`` runs its CE shapes (:func:`run`) when CUDA is
available; ``crossent bench --gpu`` (:func:`main`) is the full GPU benchmark, with ``--linear``
linear CE too (bench_gpu_linear.py) and with ``--sweep`` the kernel's block sizes;
``benchmarks/gpu_check.sh`` runs it as part of a lent GPU's first run.

    crossent bench --gpu                   # the CE shapes, prints a table
    crossent bench --gpu --quick           # one small shape: a smoke test
    crossent bench --gpu --linear --sweep --json out.json --markdown out.md

The most wanted results come first (the (8192, 128256) CE target, then linear CE, then the
block sweep, then the other CE shapes), and the JSON and markdown files are rewritten after each
shape, so a run cut short still leaves what it measured.

Honesty rules: every contender's loss and gradient are checked against float32 torch on the
same data before any timing (a contender that disagrees is reported and not timed); torch.compile
is compiled per shape with ``dynamic=False``; times are ``do_bench`` medians
(``return_mode="median"``) with at least ~25 repetitions even for 20-50 ms steps, taken in rounds
that alternate the contenders (A B C A B C ...), and each call reads the next of several input
buffers (together larger than L2) so no contender reads logits another left in L2. ``vs
crossent`` is the median over rounds of the per-round ratio to crossent's time. Effective
bandwidth counts the bytes that must move: fwd+bwd reads the logits and writes their gradient,
forward only reads them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

# (N, V): the 2.9 TB/s target of issue 13 first, then issue 5's three shapes.
SHAPES = [(8192, 128256), (32768, 4096), (32768, 65536), (16384, 131072)]
QUICK_SHAPES = [(4096, 32768)]
L2_BYTES = 50 * 2**20  # H100: 50 MB; rotating at least 4x this defeats it on any current GPU
MIN_REPS = 25  # do_bench's rep (ms) is sized from one step so that it runs at least this often


def contenders(inplace: bool) -> dict[str, Callable]:
    """name -> fn(logits, target) returning the mean loss; all take (N, V) bf16 logits. Call it
    once per shape: torch.compile is built fresh with ``dynamic=False``."""
    import crossent
    import crossent.backends.triton  # noqa: F401  (imported before torch.compile traces a call)

    found: dict[str, Callable] = {
        "crossent triton": lambda x, y: crossent.cross_entropy(x, y, impl="triton"),
        "torch eager": F.cross_entropy,
        "torch.compile": torch.compile(F.cross_entropy, fullgraph=True, dynamic=False),
    }
    if inplace:
        found["crossent triton inplace"] = lambda x, y: crossent.cross_entropy(
            x, y, impl="triton", inplace_backward=True)
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        found["liger"] = lambda x, y: liger_cross_entropy(x, y)
    except Exception as e:  # noqa: BLE001  (any failure to import leaves it out, said aloud)
        print(f"Liger left out: {e!r}", file=sys.stderr)
    try:
        from quack.cross_entropy import cross_entropy as quack_ce

        found["quack"] = lambda x, y: quack_ce(x, y).mean()  # per-row losses; nothing ignored
    except Exception as e:  # noqa: BLE001
        print(f"quack left out: {e!r}", file=sys.stderr)
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

        found["flash-attn triton"] = lambda x, y: cross_entropy_loss(x, y)[0].mean()
    except Exception as e:  # noqa: BLE001
        print(f"flash-attn left out: {e!r}", file=sys.stderr)
    return found


def copy_bandwidth(n_bytes: int) -> float:
    """TB/s of a device-to-device copy of ``n_bytes`` (counted read + write)."""
    from triton.testing import do_bench

    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * n_bytes / (ms * 1e-3) / 1e12


def _logits_of_an_op(x: torch.Tensor) -> torch.Tensor:
    """``x`` as logits a model made (not a leaf, not a view of one: what ``inplace_backward``
    needs), with no extra memory: ``x + 0`` with a 0-d leaf, whose backward saves nothing."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
    return x.detach() + zero


def disagreement(fn: Callable, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """Why ``fn``'s mean loss or gradient on ``x (N, V)`` bf16 differs from float32 torch's by
    more than bf16 rounding, or None when they agree."""
    leaf = x.detach().float().requires_grad_()
    ref = F.cross_entropy(leaf, y)
    (g_ref,) = torch.autograd.grad(ref, leaf)  # (N, V) float32
    del leaf
    h = _logits_of_an_op(x)  # a copy: in-place contenders overwrite it
    loss = fn(h, y)
    (g,) = torch.autograd.grad(loss, h)
    loss, ref = float(loss.detach()), float(ref.detach())
    loss_err = abs(loss - ref)
    if not loss_err <= 1e-2 * abs(ref) + 1e-3:
        return f"loss {loss:.6g} vs {ref:.6g}"
    # Each gradient element is rounded to bf16 once (2^-9 relative); allow 2^-7 of the largest.
    grad_err = float((g.detach().float() - g_ref).abs().max())
    bound = 2**-7 * float(g_ref.abs().max())
    if not grad_err <= bound:
        return f"gradient off by {grad_err:.3g} (bound {bound:.3g})"
    return None


def bench_case(n_rows: int, n_classes: int, fns: dict[str, Callable], rounds: int) -> list[dict]:
    from triton.testing import do_bench

    buf_bytes = n_rows * n_classes * 2
    n_bufs = max(2, -(-4 * L2_BYTES // buf_bytes))  # ceil: together >= 4x L2
    gen = torch.Generator(device="cuda").manual_seed(0)
    # (N, V) bf16 logits made by an op, each used in turn; gradients are taken w.r.t. them
    xs = [_logits_of_an_op((torch.randn(n_rows, n_classes, device="cuda", generator=gen) * 2)
                           .bfloat16()) for _ in range(n_bufs)]
    ys = [torch.randint(0, n_classes, (n_rows,), device="cuda", generator=gen) for _ in range(n_bufs)]
    wrong = {name: disagreement(fn, xs[0], ys[0]) for name, fn in fns.items()}
    for name, why in wrong.items():
        if why is not None:
            print(f"{name} disagrees with torch at {n_rows}x{n_classes}, not timed: {why}",
                  file=sys.stderr)
    timed = {name: fn for name, fn in fns.items() if wrong[name] is None}
    out = []
    for mode in ("fwd+bwd", "fwd"):
        names = [n for n in timed if not (mode == "fwd" and n.endswith("inplace"))]
        samples: dict[str, list[float]] = {name: [] for name in names}
        peak: dict[str, int] = {}
        for _ in range(rounds):
            for name in names:
                step = _step(timed[name], xs, ys, mode)
                step()  # compile / autotune outside the timing
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                step()
                torch.cuda.synchronize()
                once_ms = (time.perf_counter() - start) * 1e3
                peak[name] = torch.cuda.max_memory_allocated() - base
                samples[name].append(do_bench(step, warmup=max(10, 2 * once_ms),
                                              rep=max(100, MIN_REPS * once_ms),
                                              return_mode="median"))
        moved = buf_bytes * (2 if mode == "fwd+bwd" else 1)
        ours = samples.get("crossent triton")
        for name, ms in samples.items():
            t = statistics.median(ms)
            ratio = statistics.median(a / b for a, b in zip(ms, ours)) if ours else float("nan")
            out.append(dict(N=n_rows, V=n_classes, mode=mode, impl=name, ms=t,
                            tb_s=moved / (t * 1e-3) / 1e12, vs_crossent=ratio,
                            peak_extra_gb=peak[name] / 2**30))
    for name, why in wrong.items():
        if why is not None:
            out.append(dict(N=n_rows, V=n_classes, mode="disagrees", impl=name, ms=float("nan"),
                            tb_s=float("nan"), vs_crossent=float("nan"),
                            peak_extra_gb=float("nan"), why=why))
    return out


def _step(fn: Callable, xs: list, ys: list, mode: str) -> Callable[[], None]:
    """One call on the next buffer: forward only (no_grad), or forward + grad w.r.t. logits.

    In-place contenders (ours with inplace_backward, Liger always) leave gradients in the
    buffers that later calls read as logits: finite values, and no kernel here branches on
    data, so the timings are unaffected.
    """
    state = {"i": 0}

    def run() -> None:
        i = state["i"] = (state["i"] + 1) % len(xs)
        if mode == "fwd":
            with torch.no_grad():
                fn(xs[i], ys[i])
            return
        torch.autograd.grad(fn(xs[i], ys[i]), xs[i])

    return run


def sweep_blocks(shapes: list[tuple[int, int]]) -> list[dict]:
    """fwd+bwd time of crossent's kernel per (loop block, elements per thread) at each shape: the
    measurements ``crossent/backends/triton/launch.py``'s table is to be set from."""
    from triton.testing import do_bench

    from ..backends.triton import launch

    saved = dict(launch.LOOP_BLOCK), dict(launch.SINGLE_MAX), launch.ELEMS_PER_THREAD
    fn = contenders(inplace=False)["crossent triton"]
    rows = []
    try:
        for n_rows, n_classes in shapes:
            gen = torch.Generator(device="cuda").manual_seed(1)
            xs = [_logits_of_an_op((torch.randn(n_rows, n_classes, device="cuda", generator=gen)
                                    * 2).bfloat16()) for _ in range(2)]
            ys = [torch.randint(0, n_classes, (n_rows,), device="cuda", generator=gen)] * 2
            step = _step(fn, xs, ys, "fwd+bwd")
            for block in (4096, 8192, 16384, 32768):
                for per_thread in (8, 16, 32):
                    launch.LOOP_BLOCK[torch.float32] = block
                    launch.SINGLE_MAX[torch.float32] = block  # rows up to one block: in registers
                    launch.ELEMS_PER_THREAD = per_thread
                    step()
                    ms = do_bench(step, warmup=10, rep=100, return_mode="median")
                    rows.append(dict(N=n_rows, V=n_classes, block=block, elems_per_thread=per_thread,
                                     ms=ms, tb_s=4 * n_rows * n_classes / (ms * 1e-3) / 1e12))
    finally:
        (launch.LOOP_BLOCK, launch.SINGLE_MAX, launch.ELEMS_PER_THREAD) = saved
    return rows


def run(quick: bool, rounds: int, step_done: Callable[[], None] = lambda: None) -> dict:
    """Every shape (one small one with ``quick``): device info and one row per shape, mode, impl."""
    import triton

    props = torch.cuda.get_device_properties(0)
    rows = []
    for n_rows, n_classes in QUICK_SHAPES if quick else SHAPES:
        rows += bench_case(n_rows, n_classes, contenders(inplace=True), 1 if quick else rounds)
        step_done()
    return dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                copy_tb_s=copy_bandwidth(2**30), rows=rows)


def markdown(result: dict) -> str:
    """The rows of :func:`run` (and ``linear_rows``, ``sweep`` when present) as markdown tables
    ready for BENCHMARKS.md."""
    lines = [f"{result['device']}, torch {result['torch']}, Triton {result['triton']}; device "
             f"copy {result['copy_tb_s']:.2f} TB/s (read + write). bf16 logits, mean loss.", "",
             "| N x V | mode | impl | ms (median) | TB/s | vs crossent | peak extra GiB |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["mode"] == "disagrees":
            lines.append(f"| {r['N']}x{r['V']} | disagrees | {r['impl']} | {r['why']} | | | |")
            continue
        lines.append(f"| {r['N']}x{r['V']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | "
                     f"{r['tb_s']:.2f} | {r['vs_crossent']:.2f} | {r['peak_extra_gb']:.2f} |")
    if result.get("linear_rows"):
        lines += ["", "| N x H x V | impl | ms (median) | x 3 GEMMs | peak extra GiB |",
                  "|---|---|---:|---:|---:|"]
        for r in result["linear_rows"]:
            lines.append(f"| {r['N']}x{r['H']}x{r['V']} | {r['impl']} | {r['ms']:.2f} | "
                         f"{r['vs_gemms']:.2f} | {r['peak_extra_gb']:.2f} |")
    if result.get("sweep"):
        lines += ["", "| N x V | loop block | elems/thread | ms | TB/s |", "|---|---:|---:|---:|---:|"]
        for r in result["sweep"]:
            lines.append(f"| {r['N']}x{r['V']} | {r['block']} | {r['elems_per_thread']} | "
                         f"{r['ms']:.3f} | {r['tb_s']:.2f} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossent bench --gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small shape (smoke test)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per case")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--markdown", help="also write them as markdown tables to this file")
    p.add_argument("--linear", action="store_true",
                   help="also linear CE vs the three bare GEMMs, torch, torch.compile, Liger, CCE")
    p.add_argument("--sweep", action="store_true",
                   help="also time the kernel per block size and warps (launch.py's table)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``crossent bench --gpu``: print the tables as they come, save JSON/markdown per shape."""
    args = _parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("crossent bench --gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from .bench_gpu_linear import QUICK_SHAPE, SHAPES as LINEAR_SHAPES, linear_case

    props = torch.cuda.get_device_properties(0)
    result = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                  copy_tb_s=copy_bandwidth(2**30), rows=[], linear_rows=[], sweep=[])
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"device copy bandwidth: {result['copy_tb_s']:.2f} TB/s (read + write)")
    rounds = 1 if args.quick else args.rounds
    shapes = QUICK_SHAPES if args.quick else SHAPES

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(markdown(result))

    def ce(shape: tuple[int, int]) -> None:
        for r in bench_case(*shape, contenders(inplace=True), rounds):
            result["rows"].append(r)
            print(f"{r['N']:>6} {r['V']:>7} {r['mode']:9} {r['impl']:24} {r['ms']:8.3f} "
                  f"{r['tb_s']:6.2f} {r['vs_crossent']:6.2f} {r['peak_extra_gb']:8.2f}")
        save()

    print(f"{'N':>6} {'V':>7} {'mode':9} {'impl':24} {'ms':>8} {'TB/s':>6} {'x ours':>6} {'peak+GB':>8}")
    ce(shapes[0])
    if args.linear:
        print(f"\n{'N':>6} {'H':>6} {'V':>7} {'impl':40} {'ms':>8} {'x GEMMs':>8} {'peak+GB':>8}")
        for shape in [QUICK_SHAPE] if args.quick else LINEAR_SHAPES:
            for r in linear_case(shape, rounds):
                result["linear_rows"].append(r)
                print(f"{r['N']:>6} {r['H']:>6} {r['V']:>7} {r['impl']:40} {r['ms']:8.3f} "
                      f"{r['vs_gemms']:8.2f} {r['peak_extra_gb']:8.2f}")
            save()
    if args.sweep:
        result["sweep"] = sweep_blocks(QUICK_SHAPES if args.quick else [(8192, 32768), (8192, 128256)])
        for r in result["sweep"]:
            print(f"sweep {r['N']}x{r['V']} block {r['block']:>6} elems/thread "
                  f"{r['elems_per_thread']:>3}: {r['ms']:.3f} ms {r['tb_s']:.2f} TB/s")
        save()
    print()
    for shape in shapes[1:]:
        ce(shape)
    return 0
