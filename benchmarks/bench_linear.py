"""Fused linear + cross-entropy on CPU: crossent vs torch, fp32 forward + backward.

The contenders and the method (alternating timings, fresh-process memory probe) live in
crossent/_bench_linear.py, shared with ``crossent bench --linear``; this script prints the
markdown table of BENCHMARKS.md and runs the chunk-size sweep.

    python benchmarks/bench_linear.py                  # the three issue shapes
    python benchmarks/bench_linear.py --shapes 2048,512,32000 --rounds 5
    python benchmarks/bench_linear.py --shapes 1024,2048,128256 --no-memory --chunk-sizes 96,128,512
    python benchmarks/bench_linear.py --floor          # also time the three bare products
"""
from __future__ import annotations

import argparse
import os

import torch

from crossent.cli.bench_linear import SHAPES, contenders, gemm_floor, measure_memory, time_shape

MIB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=None, help="N,H,V triples")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--chunk-sizes", default="",
                        help="comma-separated rows: also time crossent with these chunk sizes "
                             "(ratios to torch unfused; no memory)")
    parser.add_argument("--floor", action="store_true",
                        help="also time the three bare fp32 products (logits, grad of input, grad "
                             "of weight) into ready buffers: the floor for any exact method")
    args = parser.parse_args()
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
            extra = {"gemms": gemm_floor()} if args.floor else None
            res = time_shape(shape, args.rounds, sweep, extra)
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
        if not args.no_memory:
            row += [f"{measure_memory(shape, n) / MIB:.0f}" for n in names]
        else:
            row += ["-"] * len(names)
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
