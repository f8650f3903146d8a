"""crossent.hf.patch on a tiny Llama with a 32000-token vocabulary: peak memory and step time of
one training step (forward + backward), patched vs unpatched, on CPU.

Memory: a fresh subprocess per case (MALLOC_MMAP_THRESHOLD_=131072, see DESIGN.md), one
warm-up step, then ``5 > /proc/self/clear_refs`` and one more step; the peak is
``VmHWM - VmRSS(before)``. Time: both models (same weights) in one process, stepped
alternately after a warm-up; the median of the per-pair ratios is quoted.

    PYTHONPATH=. python benchmarks/bench_hf.py          # B*T = 4 x 512 = 2048, 7 rounds
    PYTHONPATH=. python benchmarks/bench_hf.py --rounds 11 --batch 8 --seq 256

(PYTHONPATH=. makes the script, and its memory subprocesses, import this checkout's crossent.)
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
import transformers

import crossent.hf

MIB = 1 << 20


def _model(args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.seq, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


def _batch(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _step(model, batch) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _memory_child(args: argparse.Namespace) -> None:
    model, batch = _model(args), _batch(args)
    if args.child == "patched":
        crossent.hf.patch(model)
    _step(model, batch)  # warm-up: allocator pools, numba compilation, .grad buffers
    model(**batch).loss.backward()  # .grad exists from here on, as in a training loop
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    model(**batch).loss.backward()  # accumulates into the existing .grad
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def _memory(args: argparse.Namespace, case: str) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--child", case, *sys.argv[1:]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--child", choices=["patched", "unpatched"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _memory_child(args)
        return
    n_tokens = args.batch * args.seq
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; Llama 2 layers, H={args.hidden}, V={args.vocab}, "
          f"B*T={args.batch}x{args.seq}={n_tokens}, fp32, one fwd+bwd step")
    peaks = {case: _memory(args, case) for case in ("unpatched", "patched")}
    batch = _batch(args)
    plain, patched = _model(args), crossent.hf.patch(_model(args))
    _step(plain, batch), _step(patched, batch)  # warm-up
    times: dict[str, list[float]] = {"unpatched": [], "patched": []}
    for _ in range(args.rounds):  # A B A B: both see the same drift of the shared machine
        times["unpatched"].append(_step(plain, batch))
        times["patched"].append(_step(patched, batch))
    ratios = [p / u for p, u in zip(times["patched"], times["unpatched"])]
    print("| model | peak extra memory (MiB) | step time, median (s) |")
    print("|---|---:|---:|")
    for case in ("unpatched", "patched"):
        print(f"| {case} | {peaks[case]:.0f} | {statistics.median(times[case]):.3f} |")
    print(f"memory ratio patched/unpatched: {peaks['patched'] / peaks['unpatched']:.3f}; "
          f"time ratio, median of {args.rounds} paired rounds: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
