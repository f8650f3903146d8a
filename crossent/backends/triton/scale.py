"""Scale a gradient in place by a 0-d device tensor, free when the factor is 1.

Backward multiplies the gradient made in forward by the upstream gradient, which is 1 for the
usual ``loss.backward()``. Checking that on the host would sync; multiplying anyway is one more
pass over ``(R, C)`` and, out of place, a second ``(R, C)`` buffer. This kernel reads the factor
on the device: at 1 every program returns after one scalar load (a few microseconds in all);
otherwise it multiplies in place, in the accumulation dtype, rounding once.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import _round_to_bf16

_BLOCK = 4096  # elements per program and step: 8 KiB of bf16, 16 B per thread at 4 warps
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _scale_kernel(
    ptr, factor_ptr, n_tiles, n_cols, stride_row, n_col_blocks,
    ACC: tl.constexpr, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """``x[r, c] *= factor`` over ``n_tiles / n_col_blocks`` rows of ``n_cols`` at row stride
    ``stride_row`` (unit column stride), tile ``t`` = (row ``t // n_col_blocks``, column block
    ``t % n_col_blocks``); the programs stride over the tiles. ``n_tiles`` comes from the host:
    an argument equal to 1 reaches a compiled kernel as a constexpr, with no ``.to``."""
    factor = tl.load(factor_ptr).to(ACC)
    if factor != 1.0:
        cols = tl.arange(0, BLOCK)
        for t in range(tl.program_id(0).to(tl.int64), n_tiles, tl.num_programs(0)):
            row = t // n_col_blocks
            start = (t - row * n_col_blocks) * BLOCK
            mask = start + cols < n_cols
            p = ptr + row * stride_row + start + cols  # int64 offsets
            g = tl.load(p, mask=mask, eviction_policy="evict_first").to(ACC) * factor
            if ROUND_BF16:  # the interpreter truncates float32 -> bfloat16; GPUs round
                g = _round_to_bf16(g)
            tl.store(p, g.to(ptr.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@lru_cache(maxsize=None)
def _n_programs(device_index: int) -> int:
    """Enough programs to keep every SM streaming, few enough that at factor 1 they all retire
    at once."""
    return 8 * torch.cuda.get_device_properties(device_index).multi_processor_count


def scale_inplace(grad: Tensor, factor: Tensor) -> bool:
    """``grad *= factor`` (0-d tensor on ``grad``'s device) without a host sync, skipping all
    memory traffic when the factor is 1. ``grad``: contiguous, or 2-D with unit column stride.
    Returns False (and does nothing) for any other layout. Does not bump ``grad``'s version."""
    if grad.is_contiguous():
        n_rows, n_cols, stride = 1, grad.numel(), grad.numel()
    elif grad.dim() == 2 and grad.stride(1) == 1:
        (n_rows, n_cols), stride = grad.shape, grad.stride(0)
    else:
        return False
    if grad.numel() == 0:
        return True
    n_col_blocks = triton.cdiv(n_cols, _BLOCK)
    n_tiles = n_rows * n_col_blocks
    programs = min(n_tiles, _n_programs(grad.device.index or 0) if grad.is_cuda else 4)
    with torch.cuda.device(grad.device) if grad.is_cuda else nullcontext():
        _scale_kernel[(programs,)](
            grad, factor, n_tiles, n_cols, stride, n_col_blocks,
            ACC=tl.float64 if grad.dtype == torch.float64 else tl.float32,
            BLOCK=_BLOCK,
            ROUND_BF16=_INTERPRET and grad.dtype == torch.bfloat16,
            num_warps=4,
        )
    return True
