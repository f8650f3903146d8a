"""Host side of the Triton cross-entropy: allocation, grid, block size and warps, in one place."""
from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import ce_fwd_kernel

# The one place block sizes and warps are chosen. From ptxas register reports for sm_90 (Triton
# 3.6 and 3.9): a row of up to SINGLE_MAX classes is held in registers and read from memory once;
# longer rows loop over LOOP_BLOCK-wide blocks and are read twice (the second pass mostly from
# L2). Wider blocks spill once weights, smoothing and softcap keep more per-lane values live, and
# float64 needs half the width. Warps: ELEMS_PER_THREAD elements per thread, 1 to MAX_WARPS.
# Speed is to be set from the GPU benchmark's block sweep on a GPU (benchmarks/gpu_check.sh
# measures it; BENCHMARKS.md): these are the register-derived starting values.
SINGLE_MAX = {torch.float32: 16384, torch.float64: 4096}
LOOP_BLOCK = {torch.float32: 8192, torch.float64: 4096}
ELEMS_PER_THREAD = 16
MAX_WARPS = 16  # 512 threads, which keeps 128 registers each
# Test hook (a power of 2): caps every block, so small rows run the multi-block path.
MAX_BLOCK = 1 << 30
# Read when this module is imported, like Triton reads it when it is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def block_config(n_cols: int, acc: torch.dtype, probs: bool) -> tuple[int, int, bool]:
    """``(BLOCK, num_warps, single_block)`` for rows of ``n_cols`` classes accumulated in ``acc``
    (``probs``: probability targets, whose per-lane target values halve the single-block width)."""
    if n_cols <= min(SINGLE_MAX[acc] // (2 if probs else 1), MAX_BLOCK):
        block = triton.next_power_of_2(max(n_cols, 1))
    else:
        block = min(LOOP_BLOCK[acc], MAX_BLOCK)
    num_warps = max(1, min(MAX_WARPS, block // (32 * ELEMS_PER_THREAD)))
    return block, num_warps, n_cols <= block


def _f32_pair(value: float) -> tuple[float, float]:
    """Split a float64 into float32 ``hi + lo`` (Triton passes float arguments as float32)."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def launch_ce_forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    grad_scale: Tensor | None,
    grad: Tensor | None,
    loss: Tensor,
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    stats: Tensor | None = None,
) -> None:
    """Launch one program per row over ``logits (R, C)`` (unit column stride, any row stride
    ``>= C``); fills ``loss``, ``lse``, when ``grad`` is given ``grad (R, C)`` (unit column
    stride; may be ``logits`` itself, then written at the logits' row stride), and when
    ``stats`` is given ``stats (R, 2)`` (contiguous; ``crossent.stats``)."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    probs = target.is_floating_point()
    eps = label_smoothing if label_smoothing > 0 else 0.0  # torch ignores <= 0 (and NaN)
    block, num_warps, single = block_config(n_cols, lse.dtype, probs)
    want_grad = grad is not None
    dummy = lse  # stands in for absent tensors; the constexpr flags keep it unread
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        ce_fwd_kernel[(n_rows,)](
            logits, grad if want_grad else dummy, target,
            dummy if weight is None else weight,
            grad_scale if want_grad else dummy, loss, lse,
            n_cols, logits.stride(0), grad.stride(0) if want_grad else 0,
            target.stride(0), ignore_index,
            *_f32_pair(eps), *_f32_pair(eps / n_cols), *_f32_pair(z_loss),
            *_f32_pair(1.0 if softcap is None else softcap),
            ACC=tl.float64 if lse.dtype == torch.float64 else tl.float32,
            PROB_TARGET=probs,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=eps > 0,
            HAS_Z_LOSS=z_loss > 0,  # never 0 * inf when lse**2 overflows
            HAS_SOFTCAP=softcap is not None,
            WANT_GRAD=want_grad,
            INPLACE=want_grad and grad.data_ptr() == logits.data_ptr(),
            BLOCK=block,
            SINGLE_BLOCK=single,
            # The interpreter truncates float32 -> bfloat16; GPUs round to nearest even.
            ROUND_BF16=_INTERPRET and grad is not None and grad.dtype == torch.bfloat16,
            stats_ptr=dummy if stats is None else stats,
            STATS=stats is not None,
            num_warps=num_warps,
        )

