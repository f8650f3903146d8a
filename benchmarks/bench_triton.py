"""GPU cross-entropy benchmark (issue 5): crossent's Triton kernel vs torch eager, torch.compile
and Liger (when importable), bf16 logits, fwd+bwd and forward only.

    python benchmarks/bench_triton.py                 # the issue's three shapes, prints a table
    python benchmarks/bench_triton.py --quick         # one small shape: a smoke test
    python benchmarks/bench_triton.py --json out.json
    python benchmarks/bench_triton.py --linear        # also linear CE (4096 x 4096 x 128256)

Time is the median of ``triton.testing.do_bench`` medians, taken in rounds that alternate the
contenders (A B C A B C ...), each call on the next of several input buffers (together larger
than L2) so no contender reads logits that a previous call left in L2. Effective bandwidth
counts the bytes that must move: fwd+bwd reads the logits and writes their gradient, forward
only reads the logits (targets and per-row outputs are < 0.1% and not counted). The device's
own copy bandwidth (``dst.copy_(src)``: read + write) is printed for scale.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from crossent._bench_gpu import QUICK_SHAPES, SHAPES, bench_case, contenders, copy_bandwidth
from crossent._bench_gpu_linear import QUICK_SHAPE, SHAPE, linear_case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape (smoke test)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per case")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--linear", action="store_true",
                        help="also linear CE vs the three bare GEMMs, torch, torch.compile, Liger")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"device copy bandwidth: {copy_bandwidth(2**30):.2f} TB/s (read + write)")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    fns = contenders(inplace=True)
    rows = []
    print(f"{'N':>6} {'V':>7} {'mode':8} {'impl':24} {'ms':>8} {'TB/s':>6} {'peak+GB':>8}")
    for n_rows, n_classes in shapes:
        for r in bench_case(n_rows, n_classes, fns, 1 if args.quick else args.rounds):
            rows.append(r)
            print(f"{r['N']:>6} {r['V']:>7} {r['mode']:8} {r['impl']:24} {r['ms']:8.3f} "
                  f"{r['tb_s']:6.2f} {r['peak_extra_gb']:8.2f}")
    linear_rows = []
    if args.linear:
        print(f"\n{'N':>6} {'H':>6} {'V':>7} {'impl':24} {'ms':>8} {'x GEMMs':>8} {'peak+GB':>8}")
        for r in linear_case(QUICK_SHAPE if args.quick else SHAPE, 1 if args.quick else args.rounds):
            linear_rows.append(r)
            print(f"{r['N']:>6} {r['H']:>6} {r['V']:>7} {r['impl']:24} {r['ms']:8.3f} "
                  f"{r['vs_gemms']:8.2f} {r['peak_extra_gb']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                           rows=rows, linear_rows=linear_rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
