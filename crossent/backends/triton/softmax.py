"""Triton softmax / log_softmax, forward and backward, over any dim.

A contiguous tensor is viewed as ``(O, C, I)`` about ``dim`` (``I`` the stride of ``dim``). A
program owns one outer index and ``BLOCK_I`` inner positions, and walks ``C`` in tiles of
``(BLOCK_C, BLOCK_I)``: loads are contiguous along ``C`` when ``I == 1`` and along the inner
positions otherwise, so the dim is never moved in memory. Forward keeps an online max / sum-exp;
when the whole ``C`` fits one tile (``SINGLE``) the row is read from memory once and stays in
registers for the write. Backward first sums ``g`` (log_softmax) or ``g * out`` (softmax).
Computed in float32 (float64 for float64), rounded once on store; int64 offsets throughout.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import _round_to_bf16

# Elements per tile: 4096 float32 registers per program (8 warps, 16 per thread).
TILE = {torch.float64: 2048}
_TILE_DEFAULT = 4096
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read at import, like Triton


@triton.jit
def _tile_offsets(pid, n_cls, n_in, n_iblocks, c0, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """Offsets ``(BLOCK_C, BLOCK_I)`` of the tile starting at class ``c0`` and its mask."""
    o = (pid // n_iblocks).to(tl.int64)
    inner = (pid % n_iblocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    c = c0 + tl.arange(0, BLOCK_C)
    mask = (c[:, None] < n_cls) & (inner[None, :] < n_in)
    offs = (o * n_cls + c[:, None].to(tl.int64)) * n_in + inner[None, :]
    return offs, mask


@triton.jit
def _finite(m):
    # Reference point: the max, or 0 where every value is -inf (exp(-inf - 0) = 0, not NaN).
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _store(ptr, offs, mask, v, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        v = _round_to_bf16(v)  # the interpreter's bf16 cast truncates; GPUs round to nearest
    tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_fwd_kernel(
    x_ptr, out_ptr, n_cls, n_in, n_iblocks,
    LOG: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    SINGLE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, mask = _tile_offsets(pid, n_cls, n_in, n_iblocks, 0, BLOCK_C, BLOCK_I)
    x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
    m = tl.max(x, 0)  # (BLOCK_I,)
    s = tl.sum(tl.exp(x - _finite(m)[None, :]), 0)
    if not SINGLE:
        for c0 in range(BLOCK_C, n_cls, BLOCK_C):
            offs, mask = _tile_offsets(pid, n_cls, n_in, n_iblocks, c0, BLOCK_C, BLOCK_I)
            xb = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
            m_new = tl.maximum(m, tl.max(xb, 0))
            r = _finite(m_new)
            # NaN and +inf values make s NaN here, so the whole row is NaN, as torch's.
            s = s * tl.exp(m - r) + tl.sum(tl.exp(xb - r[None, :]), 0)
            m = m_new
    r = _finite(m)[None, :]
    inv = (1.0 / s)[None, :]
    if SINGLE:
        if LOG:
            _store(out_ptr, offs, mask, (x - r) - tl.log(s)[None, :], ROUND_BF16)
        else:
            _store(out_ptr, offs, mask, tl.exp(x - r) * inv, ROUND_BF16)
    else:
        for c0 in range(0, n_cls, BLOCK_C):
            offs, mask = _tile_offsets(pid, n_cls, n_in, n_iblocks, c0, BLOCK_C, BLOCK_I)
            xb = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
            if LOG:
                _store(out_ptr, offs, mask, (xb - r) - tl.log(s)[None, :], ROUND_BF16)
            else:
                _store(out_ptr, offs, mask, tl.exp(xb - r) * inv, ROUND_BF16)


@triton.jit
def softmax_bwd_kernel(
    g_ptr, out_ptr, grad_ptr, n_cls, n_in, n_iblocks,
    LOG: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    SINGLE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    if SINGLE:  # one tile: read once, kept in registers for the write
        offs, mask = _tile_offsets(pid, n_cls, n_in, n_iblocks, 0, BLOCK_C, BLOCK_I)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        p = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC)
        t = tl.sum(g if LOG else g * p, 0)[None, :]
        _store(grad_ptr, offs, mask, g - tl.exp(p) * t if LOG else p * (g - t), ROUND_BF16)
    else:
        t = tl.zeros([BLOCK_I], dtype=ACC)
        for c0 in range(0, n_cls, BLOCK_C):
            offs, mask = _tile_offsets(pid, n_cls, n_in, n_iblocks, c0, BLOCK_C, BLOCK_I)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
            p = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC)
            t += tl.sum(g if LOG else g * p, 0)
        for c0 in range(0, n_cls, BLOCK_C):
            offs, mask = _tile_offsets(pid, n_cls, n_in, n_iblocks, c0, BLOCK_C, BLOCK_I)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
            p = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC)
            _store(grad_ptr, offs, mask, g - tl.exp(p) * t[None, :] if LOG else p * (g - t[None, :]),
                   ROUND_BF16)


def block_config(n_cls: int, n_in: int, dtype: torch.dtype) -> tuple[int, int, bool, int]:
    """``(BLOCK_C, BLOCK_I, SINGLE, num_warps)``: inner positions side by side (up to 64, a
    coalesced run) when ``dim`` is not last, and the rest of the tile along ``C``."""
    tile = TILE.get(dtype, _TILE_DEFAULT)
    block_i = 1 if n_in == 1 else min(triton.next_power_of_2(n_in), 64, tile)
    block_c = min(triton.next_power_of_2(max(n_cls, 1)), tile // block_i)
    num_warps = max(1, min(8, block_c * block_i // 512))
    return block_c, block_i, n_cls <= block_c, num_warps


def _launch(kernel, tensors: tuple[Tensor, ...], dim: int, log: bool) -> None:
    shape = tensors[0].shape
    n_cls, n_in = shape[dim], math.prod(shape[dim + 1:])
    n_out = math.prod(shape[:dim])
    if n_out * n_cls * n_in == 0:
        return
    dtype = tensors[0].dtype
    block_c, block_i, single, num_warps = block_config(n_cls, n_in, dtype)
    n_iblocks = triton.cdiv(n_in, block_i)
    device = tensors[0].device
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        kernel[(n_out * n_iblocks,)](
            *tensors, n_cls, n_in, n_iblocks,
            LOG=log, ACC=tl.float64 if dtype == torch.float64 else tl.float32,
            BLOCK_C=block_c, BLOCK_I=block_i, SINGLE=single,
            ROUND_BF16=_INTERPRET and dtype == torch.bfloat16, num_warps=num_warps,
        )


def forward(x: Tensor, dim: int, log: bool) -> Tensor:
    """log_softmax (``log``) or softmax of a contiguous ``x`` along ``dim``."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(softmax_fwd_kernel, (x, out), dim, log)
    return out


def backward(g: Tensor, out: Tensor, dim: int, log: bool) -> Tensor:
    """Gradient of log_softmax / softmax from a contiguous upstream ``g`` and the output."""
    grad = torch.empty_like(out, memory_format=torch.contiguous_format)
    _launch(softmax_bwd_kernel, (g, out, grad), dim, log)
    return grad
