"""GPU cross-entropy benchmark (issues 5 and 13): crossent's Triton kernel vs torch eager,
torch.compile, Liger, quack and flash-attention's Triton CE (those that import), bf16 logits,
fwd+bwd and forward only; with ``--linear`` also linear CE; with ``--sweep`` the kernel's block
sizes. ``benchmarks/gpu_check.sh`` runs it as part of a lent GPU's first run.

    python benchmarks/bench_triton.py                 # the CE shapes, prints a table
    python benchmarks/bench_triton.py --quick         # one small shape: a smoke test
    python benchmarks/bench_triton.py --linear --sweep --json out.json --markdown out.md

Methods (medians, alternation, agreement checks, L2 rotation): ``crossent/_bench_gpu.py`` and
``crossent/_bench_gpu_linear.py``. The most wanted results come first (the (8192, 128256) CE
target, then linear CE, then the block sweep, then the other CE shapes), and the JSON and
markdown files are rewritten after each shape, so a run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from crossent.cli.bench_gpu import (QUICK_SHAPES, SHAPES, bench_case, contenders, copy_bandwidth,
                                 markdown, sweep_blocks)
from crossent.cli.bench_gpu_linear import QUICK_SHAPE, SHAPES as LINEAR_SHAPES, linear_case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape (smoke test)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per case")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--markdown", help="also write them as markdown tables to this file")
    parser.add_argument("--linear", action="store_true",
                        help="also linear CE vs the three bare GEMMs, torch, torch.compile, Liger, CCE")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the kernel per block size and warps (launch.py's table)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

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


if __name__ == "__main__":
    sys.exit(main())
