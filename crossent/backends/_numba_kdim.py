"""Numba kernel for K-dimensional logits ``(N, C, S)`` (``S = d1 * ... * dk``) read in place.

Segmentation logits keep the class dim in the middle: a "row" of one pixel is ``C`` values at
stride ``S``. Moving the class dim last costs a full copy of the logits and another of the
gradient; instead this kernel walks ``W`` neighbouring positions side by side, so every
load and store is a contiguous run along ``S`` and the loops vectorise:

  1. per position: target, validity, ``x_y`` (read before any store, for in-place gradients);
  2. ``m = max_c x_c`` over the block, one pass over ``C`` runs of ``W`` values;
  3. ``e_c = exp(x_c - m)`` into a float32 ``(C, W)`` scratch (L2-sized), their sums,
     and the smoothing gaps;
  4. per position: lse, loss, the gradient coefficients;
  5. the gradient, written once in the logits' own layout and dtype.

Same maths, options (weights, ``ignore_index``, smoothing, ``z_loss``) and conventions as the
row kernel in ``numba_cpu`` (softcap and probability targets take the row path).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit
from numba.extending import overload

from ._numba_math import (
    bf16_to_f32, exp_f32, f16_to_f32, f32_to_bf16, f32_to_f16, log_f32, margin, max_f32,
    scaled_difference, scaled_gap,
)
from ._numba_rows import BF16, FM

_F32 = np.float32
_SLAB = 1 << 15  # values of the (C, W) exp scratch: 128 KiB, in L2 with the block's runs


@functools.lru_cache(maxsize=None)
def block_width(n_cls: int) -> int:
    """Positions per block ``W``: as many as keep the ``(C, W)`` scratch at ``_SLAB`` values, a
    multiple of 64 (four AVX-512 vectors per class run) in [64, 2048]. Every class run costs a
    slice and a loop start, so few classes want wide blocks (measured (16, 10, 32, 32): 64
    positions per block spent more on those than on the maths)."""
    return max(64, min(2048, _SLAB // max(n_cls, 1) // 64 * 64))


def to_f32(v, fmt):
    """One stored logit as float32 (16-bit storage arrives as its uint16 bits)."""


def from_f32(g, fmt, like):
    """A float32 gradient value in the storage type of ``like`` (an array element)."""


def _is_f32(t) -> bool:
    return str(t) == "float32"


@overload(to_f32, jit_options={"fastmath": FM})
def _to_f32(v, fmt):
    if _is_f32(v):
        return lambda v, fmt: v
    return lambda v, fmt: bf16_to_f32(v) if fmt == BF16 else f16_to_f32(v)


@overload(from_f32, jit_options={"fastmath": FM})
def _from_f32(g, fmt, like):
    if _is_f32(like):
        return lambda g, fmt, like: g
    return lambda g, fmt, like: f32_to_bf16(g) if fmt == BF16 else f32_to_f16(g)


@njit(nogil=True, fastmath=FM, cache=True)
def kdim_kernel(x, fmt, target, w, w_total, ignore_index, eps, z, gscale, finite_scale,
                want_grad, grad, loss, lse, bw, lo, hi):
    """Blocks ``lo..hi`` of ``x`` ``(N, C, S)``; ``target`` is ``(N * S,)`` in ``(n, s)`` order;
    ``loss`` is ``(N * S,)`` per position, or one float64 sum per block (``n_blocks``) when the
    caller reduces anyway; ``lse`` is ``(N * S,)``, or empty when nobody reads it (both save
    memory the size of the labels: 8 bytes a pixel beside ``4 C`` of logits); ``grad`` is ``x``'s
    shape and dtype (``x`` itself when in place); ``w`` has size 0 when unweighted;
    ``finite_scale`` as in the row kernel."""
    n_cls, n_in = x.shape[1], x.shape[2]
    per_n = (n_in + bw - 1) // bw  # blocks of bw = block_width(C) positions
    has_w = w.size > 0
    # block sums (mean / sum) or per position; where the sizes agree every block is one
    # position, so both are the same values (the caller knows which it asked for)
    per_block = loss.size != x.shape[0] * n_in
    want_lse = lse.size > 0
    keep = _F32(1.0) - eps
    eps_c = eps / _F32(n_cls)
    wide = min(bw, n_in)  # the widest block: a few rows need a few columns of scratch
    e = np.empty((n_cls, wide), np.float32)  # (C, B) exp scratch
    m = np.empty(wide, np.float32)
    ssum = np.empty(wide, np.float32)
    gap = np.empty(wide, np.float32)
    logs = np.empty(wide, np.float32)
    x_y = np.empty(wide, np.float32)
    k = np.empty(wide, np.float32)  # gradient factor of e_c
    g_y = np.empty(wide, np.float32)
    ys = np.empty(wide, np.int64)
    ok = np.empty(wide, np.bool_)
    for blk in range(lo, hi):
        i = blk // per_n
        s0 = (blk - i * per_n) * bw
        width = min(bw, n_in - s0)
        base = i * n_in + s0  # flat (n, s) index of the block's first position
        block_loss = 0.0
        for j in range(width):  # 1. before any store: in place, x is the gradient buffer
            y = np.int64(target[base + j])
            valid = y != ignore_index and 0 <= y < n_cls  # out of range: never read
            ok[j] = valid
            ys[j] = y if valid else 0
            x_y[j] = to_f32(x[i, ys[j], s0 + j], fmt) if valid else _F32(0.0)
        for j in range(width):  # 2. the max of each position
            m[j] = -np.inf
        for c in range(n_cls):
            run = x[i, c, s0:s0 + width]
            for j in range(width):
                m[j] = max_f32(m[j], to_f32(run[j], fmt))
        for j in range(width):  # 3. exp, sums, smoothing gaps
            ssum[j] = _F32(0.0)
            gap[j] = _F32(0.0)
        for c in range(n_cls):
            run = x[i, c, s0:s0 + width]
            er = e[c]
            w_c = w[c] if has_w else _F32(1.0)
            for j in range(width):
                v = to_f32(run[j], fmt)
                ev = exp_f32(v - m[j])
                er[j] = ev
                ssum[j] += ev
                if eps > 0:  # a term at the max is 0, never inf * 0 (see weighted_gap_sum)
                    gap[j] += w_c * scaled_gap(m[j], v, eps_c) if v != m[j] else _F32(0.0)
        for j in range(width):  # vectorised: libm's log would cost more than the block's exps
            logs[j] = log_f32(ssum[j])
        for j in range(width):  # 4. per position
            r = base + j
            s = ssum[j]
            log_s = logs[j]
            lse_r = m[j] + log_s
            if want_lse:
                lse[r] = lse_r
            if not ok[j]:
                if not per_block:
                    loss[r] = 0.0
                k[j] = _F32(0.0) / s  # 0 * p: NaN for an all -inf position, as torch
                continue
            w_y = w[ys[j]] if has_w else _F32(1.0)
            coef = keep * w_y
            # In float64, as the row kernel: m - x_y and lse**2 overflow float32 near 3e38.
            row_loss = np.float64(coef) * margin(m[j], x_y[j], log_s)
            if eps > 0:
                row_loss += np.float64(gap[j]) + np.float64(eps_c * w_total) * log_s
                coef += eps_c * w_total
            if z > 0:
                lse64 = np.float64(m[j]) + log_s
                row_loss += np.float64(z) * lse64 * lse64
                coef += _F32(2.0) * z * lse_r
            if per_block:
                block_loss += row_loss
            else:
                loss[r] = row_loss
            p_y = e[ys[j], j] / s
            if finite_scale:
                g_y[j] = gscale * (coef * p_y - eps_c * w_y - keep * w_y)
            else:
                g_y[j] = scaled_difference(gscale, coef * p_y, eps_c * w_y + keep * w_y)
            k[j] = gscale * coef / s
        if per_block:
            loss[blk] = block_loss
        if not want_grad:
            continue
        for c in range(n_cls):  # 5. the gradient, in the logits' layout
            out = grad[i, c, s0:s0 + width]
            er = e[c]
            b = gscale * eps_c * (w[c] if has_w else _F32(1.0))
            for j in range(width):
                sub = b if (eps > 0 and ok[j]) else _F32(0.0)
                out[j] = from_f32(er[j] * k[j] - sub, fmt, out[j])
        for j in range(width):
            if ok[j]:
                grad[i, ys[j], s0 + j] = from_f32(g_y[j], fmt, grad[i, ys[j], s0 + j])


def n_blocks(n: int, n_in: int, bw: int) -> int:
    """Blocks of ``(N, C, S)`` logits, the unit the kernel's ``lo..hi`` range counts."""
    return n * ((n_in + bw - 1) // bw)
