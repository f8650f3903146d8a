"""Sum float32 partials into a 16-bit ``(hi, lo)`` pair: a float32-free weight-gradient accumulator.

Linear CE over several row chunks sums one ``(V, H)`` weight-gradient partial per chunk. Summing
in bf16/fp16 loses the small contributions; a float32 ``(V, H)`` buffer costs 4 bytes per weight
(2 GB for a 128256 x 4096 head) on top of the returned 16-bit gradient. Here the running sum is
kept as ``hi + lo``, two 16-bit numbers (``hi`` = the sum rounded to 16 bits, ``lo`` = the
remainder rounded): about 16 significant bits, so ``k`` chunks add ~``k * 2^-17`` relative error
to the final rounding of ``hi`` (~``2^-9``). ``hi`` *is* the returned gradient: no final copy,
and the only extra buffer is ``lo`` (2 bytes per weight).
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import _round_to_bf16

_BLOCK = 2048
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _pair_add_kernel(hi_ptr, lo_ptr, part_ptr, n, FIRST: tl.constexpr, BLOCK: tl.constexpr,
                     ROUND_BF16: tl.constexpr):
    """``(hi, lo) <- round2(hi + lo + part)``; with ``FIRST``, ``(hi, lo) <- round2(part)``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(part_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
    if not FIRST:
        hi = tl.load(hi_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lo = tl.load(lo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = (hi + lo) + s  # float32 sums: their rounding (2^-24) is far below the pair's 2^-17
    if ROUND_BF16:  # the interpreter truncates float32 -> bfloat16; GPUs round
        s_hi = _round_to_bf16(s)
    else:
        s_hi = s.to(hi_ptr.dtype.element_ty).to(tl.float32)
    rest = s - s_hi  # exact: s_hi is s rounded, their difference fits float32
    if ROUND_BF16:
        rest = _round_to_bf16(rest)
    tl.store(hi_ptr + offs, s_hi.to(hi_ptr.dtype.element_ty), mask=mask)
    tl.store(lo_ptr + offs, rest.to(lo_ptr.dtype.element_ty), mask=mask)


def pair_add_(hi: Tensor, lo: Tensor, part: Tensor, first: bool) -> None:
    """``hi + lo += part`` elementwise. ``hi``, ``lo``: contiguous 16-bit, same shape as the
    contiguous float32 ``part``; ``first`` starts the sum (``hi``, ``lo`` are not read)."""
    n = part.numel()
    if n == 0:
        return
    with torch.cuda.device(part.device) if part.is_cuda else nullcontext():
        _pair_add_kernel[(triton.cdiv(n, _BLOCK),)](
            hi, lo, part, n, FIRST=first, BLOCK=_BLOCK,
            ROUND_BF16=_INTERPRET and hi.dtype == torch.bfloat16, num_warps=4,
        )
