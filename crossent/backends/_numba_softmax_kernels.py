"""Numba CPU kernels for softmax / log_softmax, forward and backward, over any dim.

A tensor is viewed, without copying, as ``(O, C, I)``: ``O`` outer positions, ``C`` values along
``dim`` and ``I`` inner positions (``I = prod(shape[dim+1:])``, the stride of ``dim``).
  * ``I == 1`` (``dim`` last): each row of ``C`` contiguous values is a vectorised loop; a row of
    up to ~64K classes stays in L2 between its passes, so memory sees one read and one write.
  * ``I > 1``: a row's values are ``I`` apart, so rows are processed ``W`` at a time, side by
    side: for each ``c`` a contiguous run of ``W`` inner positions is loaded and folded into
    ``W``-wide accumulators. The ``(C, W)`` slab stays in L1/L2 between passes.
Forward per row: ``m = max x``; ``s = sum exp(x - m)``; then ``x - m - log s`` or ``exp(x - m) / s``.
Backward: log_softmax ``g - exp(out) * sum g``; softmax ``out * (g - sum(g * out))``.

16-bit floats arrive as their bits (bfloat16 as uint16, float16 as int16, so the storage format
is known at compile time) and are computed in float32, rounded once on store.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from ._numba_math import (
    EXACT_FM, bf16_to_f32, exp_f32, f16_to_f32, f32_to_bf16, f32_to_f16, log_f32, max_f32,
)
from ._numba_rows import FM, split
from ._numba_views import cube, rows
from ._omp_team import team_launch

_F32 = np.float32
_SLAB = 1 << 16  # values of the (C, W) slab of inner positions processed side by side


@njit(cache=True)
def width(n_cls: int) -> int:
    """Inner positions side by side: as many as keep the ``(C, W)`` float32 slab at 256 KiB (in
    L2 between its passes), a multiple of 64 in [64, 4096]. Wide runs matter: every class's
    run of ``W`` costs a slice and a loop start (measured (8, 21, 128, 128): 4096 positions
    made forward 12 % and backward 27 % faster than 256)."""
    return max(64, min(4096, _SLAB // max(n_cls, 1) // 64 * 64))


def f32(v):
    """A stored element (float32, or bfloat16/float16 bits) as float32; float64 stays float64."""


def put(a, j, v):
    """Store float32 ``v`` into ``a[j]``, rounding to ``a``'s format (to nearest even)."""


# EXACT_FM: the 16-bit conversions depend on the exact order of their float operations.
@overload(f32, jit_options={"fastmath": EXACT_FM})
def _f32(v):
    if v == types.uint16:
        return lambda v: bf16_to_f32(v)
    if v == types.int16:
        return lambda v: f16_to_f32(np.uint16(v))
    return lambda v: v


@overload(put, jit_options={"fastmath": EXACT_FM})
def _put(a, j, v):
    if a.dtype == types.uint16:
        def impl_bf16(a, j, v):
            a[j] = f32_to_bf16(_F32(v))
        return impl_bf16
    if a.dtype == types.int16:
        def impl_f16(a, j, v):
            a[j] = np.int16(f32_to_f16(_F32(v)))
        return impl_f16

    def impl(a, j, v):
        a[j] = v
    return impl


# ---- element-wise writes, shared by both layouts ------------------------------------------
# Compiled without reassociation: (x - m) - log s must not become x - (m + log s), which loses
# log s against a large m (1e4, 3e38). ``k`` is a scalar (rows) or a (W,) array (columns), and
# ``at`` picks its element either way.


def at(k, j):
    """``k[j]`` for an array, ``k`` for a scalar."""


@overload(at, jit_options={"fastmath": EXACT_FM})
def _at(k, j):
    if isinstance(k, types.Array):
        return lambda k, j: k[j]
    return lambda k, j: k


# log_softmax's forward writes are one loop, written twice: over a short row (``_short``) its
# count is masked below 16, which LLVM runs as one masked vector instead of one value at a time
# (rows of 10 classes: the forward kernel at (64, 10) 1.8 -> 1.1 us). The loop bodies are
# inlined into functions of the same fastmath flags only. Loops with exp inside measured slower
# masked ((64, 10) backward 1.8 -> 2.5 us; softmax's forward, two of them, 2.5 -> 7.5 us): short
# softmax rows take ``_softmax_short``.


@njit(inline="always")
def _short(n):
    """A row of 5-15 values (below 5 the masked loop's set-up costs more than it saves)."""
    return 5 <= n < 16


@njit(fastmath=EXACT_FM, inline="always")
def _log_into(x, out, m, log_s, n):
    for j in range(n):
        put(out, j, (f32(x[j]) - at(m, j)) - at(log_s, j))


@njit(fastmath=EXACT_FM, cache=True)
def _put_log(x, out, m, log_s):
    _log_into(x, out, m, log_s, x.size)


@njit(fastmath=EXACT_FM, cache=True)
def _put_log_short(x, out, m, log_s):
    _log_into(x, out, m, log_s, x.size & 15)


@njit(fastmath=EXACT_FM, cache=True)
def _put_exp(x, out, m, inv_s):
    for j in range(x.size):
        put(out, j, exp_f32(f32(x[j]) - at(m, j)) * at(inv_s, j))


@njit(fastmath=EXACT_FM, cache=True)
def _put_log_grad(g, out, dest, t):
    for j in range(g.size):
        put(dest, j, f32(g[j]) - exp_f32(f32(out[j])) * at(t, j))


@njit(fastmath=EXACT_FM, cache=True)
def _put_grad(g, out, dest, t):
    for j in range(g.size):
        put(dest, j, f32(out[j]) * (f32(g[j]) - at(t, j)))


# ---- rows (I == 1): one contiguous row at a time -------------------------------------------


@njit(fastmath=FM, inline="always")
def _max(x, n, m):
    for c in range(n):
        m = max_f32(m, f32(x[c]))
    return m


@njit(fastmath=FM, inline="always")
def _exp_sum(x, m, n):
    s = _F32(0.0)
    for c in range(n):
        s += exp_f32(f32(x[c]) - m)
    return s


@njit(fastmath=FM, cache=True, inline="always")
def _row_max_sum(x):
    """(max, sum of exp(x - max)): each loop over the head and the tail of ``split`` (see
    ``_numba_rows``)."""
    h, n = split(x.size)
    m = _max(x[h:], n, _max(x, h, _F32(-np.inf)))
    return m, _exp_sum(x, m, h) + _exp_sum(x[h:], m, n)


@njit(fastmath=FM, cache=True, inline="always")
def _short_max_sum(x):
    """``_row_max_sum`` of a short row: each loop once, its count masked below 16."""
    n = x.size & 15
    m = _max(x, n, _F32(-np.inf))
    return m, _exp_sum(x, m, n)


@njit(fastmath=EXACT_FM, cache=True)
def _exps(z, e, n):
    for i in range(n):
        e[i] = exp_f32(z[i])


@njit(nogil=True, fastmath=EXACT_FM, cache=True)
def _softmax_short(x, out, lo, hi):
    """softmax of rows ``lo:hi`` of fewer than 16 values: each chunk's ``x - max`` gathered into
    one flat run whose exps are one vectorised loop, each computed once. Row by row, the masked
    exp loops cost (64, 10) 7.5 us where this takes 2.5 (measured through numba's dispatch)."""
    n_cls = x.shape[1]
    k = 1024 // n_cls
    z, e = np.empty(k * n_cls, np.float32), np.empty(k * n_cls, np.float32)
    for r0 in range(lo, hi, k):
        n = min(k, hi - r0)
        for i in range(n):
            row, m = x[r0 + i], _F32(-np.inf)
            for j in range(n_cls):
                m = max_f32(m, f32(row[j]))
            for j in range(n_cls):
                z[i * n_cls + j] = f32(row[j]) - m
        _exps(z, e, n * n_cls)
        for i in range(n):
            s = _F32(0.0)
            for j in range(n_cls):
                s += e[i * n_cls + j]
            inv_s, dest = _F32(1.0) / s, out[r0 + i]
            for j in range(n_cls):
                put(dest, j, e[i * n_cls + j] * inv_s)


@njit(nogil=True, fastmath=FM, cache=True)
def fwd_rows(x, out, log, lo, hi):
    # Rows in chunks of up to 64 that stay in L1 between the passes (one row at a time from
    # 16K classes): the chunk's logs (or reciprocals) in one vectorised loop, where a libm log
    # per row is a scalar call. With ``_row_max_sum``'s split, measured through the call's entry
    # (``forward_call``): (64, 50) 6.5 -> 3.8 us, (64, 100) 8.9 -> 6.5 us, (64, 10) unchanged.
    k = max(1, min(64, 16384 // max(x.shape[1], 1)))
    m, s = np.empty(k, np.float32), np.empty(k, np.float32)
    short = _short(x.shape[1])  # the same for every row: LLVM takes the test out of the loops
    if short and not log:
        _softmax_short(x, out, lo, hi)
        return
    for r0 in range(lo, hi, k):
        n = min(k, hi - r0)
        for i in range(n):
            m[i], s[i] = _short_max_sum(x[r0 + i]) if short else _row_max_sum(x[r0 + i])
        for i in range(n):
            s[i] = log_f32(s[i]) if log else _F32(1.0) / s[i]
        for i in range(n):
            if log and short:
                _put_log_short(x[r0 + i], out[r0 + i], m[i], s[i])
            elif log:
                _put_log(x[r0 + i], out[r0 + i], m[i], s[i])
            else:
                _put_exp(x[r0 + i], out[r0 + i], m[i], s[i])


@njit(nogil=True, fastmath=FM, cache=True)
def bwd_rows(g, out, grad, log, lo, hi):
    for r in range(lo, hi):
        gr, orow, dest = g[r], out[r], grad[r]
        t = _F32(0.0)
        if log:
            for c in range(gr.size):
                t += f32(gr[c])
            _put_log_grad(gr, orow, dest, t)
        else:
            for c in range(gr.size):
                t += f32(gr[c]) * f32(orow[c])
            _put_grad(gr, orow, dest, t)


# ---- columns (I > 1): W inner positions side by side --------------------------------------


@njit(fastmath=FM, cache=True)
def _fold_max(m, xs):
    for j in range(m.size):
        m[j] = max_f32(m[j], f32(xs[j]))


@njit(fastmath=FM, cache=True)
def _foldexp_f32(s, xs, m):
    for j in range(s.size):
        s[j] += exp_f32(f32(xs[j]) - m[j])


@njit(fastmath=FM, cache=True)
def _fold_sum(t, gs):
    for j in range(t.size):
        t[j] += f32(gs[j])


@njit(fastmath=FM, cache=True)
def _fold_dot(t, gs, os):
    for j in range(t.size):
        t[j] += f32(gs[j]) * f32(os[j])


def is_f32(a):
    """Whether array ``a`` stores float32 (known when compiling)."""


@overload(is_f32)
def _is_f32(a):
    value = a.dtype == types.float32
    return lambda a: value


@njit(fastmath=FM, cache=True)
def _foldexp_keep(s, xs, m, es):
    """``_foldexp_f32``, also writing each exp into ``es`` (float32): softmax's forward then
    scales them instead of computing them again (a third of its exps)."""
    for j in range(s.size):
        e = exp_f32(f32(xs[j]) - m[j])
        es[j] = e
        s[j] += e


@njit(fastmath=EXACT_FM, cache=True)
def _scale_kept(es, inv_s):
    for j in range(es.size):
        es[j] *= inv_s[j]


@njit(nogil=True, fastmath=FM, cache=True)
def fwd_cols(x, out, log, lo, hi):
    n_cls, n_in = x.shape[1], x.shape[2]
    w = width(n_cls)
    chunks = (n_in + w - 1) // w
    m_buf = np.empty(w, np.float32)  # (W,) running max
    s_buf = np.empty(w, np.float32)  # (W,) sum of exps, then log(s) or 1/s
    for u in range(lo, hi):
        o, j0 = u // chunks, (u % chunks) * w
        j1 = min(j0 + w, n_in)
        m, s = m_buf[: j1 - j0], s_buf[: j1 - j0]
        m[:] = -np.inf
        s[:] = 0.0
        for c in range(n_cls):
            _fold_max(m, x[o, c, j0:j1])
        keep = not log and is_f32(out)  # softmax into float32: each exp once, kept in out
        for c in range(n_cls):
            if keep:
                _foldexp_keep(s, x[o, c, j0:j1], m, out[o, c, j0:j1])
            else:
                _foldexp_f32(s, x[o, c, j0:j1], m)
        for j in range(s.size):
            # vectorised (log_f32): a libm log per position was a scalar call each
            s[j] = log_f32(s[j]) if log else _F32(1.0) / s[j]
        for c in range(n_cls):
            if log:
                _put_log(x[o, c, j0:j1], out[o, c, j0:j1], m, s)
            elif keep:
                _scale_kept(out[o, c, j0:j1], s)
            else:
                _put_exp(x[o, c, j0:j1], out[o, c, j0:j1], m, s)


@njit(nogil=True, fastmath=FM, cache=True)
def bwd_cols(g, out, grad, log, lo, hi):
    n_cls, n_in = g.shape[1], g.shape[2]
    w = width(n_cls)
    chunks = (n_in + w - 1) // w
    t_buf = np.empty(w, np.float32)  # (W,) sum g, or sum g * out
    for u in range(lo, hi):
        o, j0 = u // chunks, (u % chunks) * w
        j1 = min(j0 + w, n_in)
        t = t_buf[: j1 - j0]
        t[:] = 0.0
        for c in range(n_cls):
            if log:
                _fold_sum(t, g[o, c, j0:j1])
            else:
                _fold_dot(t, g[o, c, j0:j1], out[o, c, j0:j1])
        for c in range(n_cls):
            if log:
                _put_log_grad(g[o, c, j0:j1], out[o, c, j0:j1], grad[o, c, j0:j1], t)
            else:
                _put_grad(g[o, c, j0:j1], out[o, c, j0:j1], grad[o, c, j0:j1], t)


# One launch per call: the kernel for the layout, on ``threads`` threads of torch's OpenMP team
# (``_omp_team``) when more than one, over arrays made from the tensors' addresses
# (``_numba_views``; contiguous, ``(O, C, I)`` about ``dim``).
@njit(nogil=True, cache=True)
def forward_call(xa, oa, like, n_out, n_cls, n_in, log, threads):
    if n_in == 1:
        x, out = rows(xa, like, n_out, n_cls), rows(oa, like, n_out, n_cls)
        if threads > 1:
            team_launch(fwd_rows, (x, out, log), n_out, min(threads, n_out))
        else:
            fwd_rows(x, out, log, 0, n_out)
        return
    x, out = cube(xa, like, n_out, n_cls, n_in), cube(oa, like, n_out, n_cls, n_in)
    units = n_out * -(-n_in // width(n_cls))
    if threads > 1:
        team_launch(fwd_cols, (x, out, log), units, min(threads, units))
    else:
        fwd_cols(x, out, log, 0, units)


@njit(nogil=True, cache=True)
def backward_call(ga, oa, da, like, n_out, n_cls, n_in, log, threads):
    if n_in == 1:
        g, out = rows(ga, like, n_out, n_cls), rows(oa, like, n_out, n_cls)
        grad = rows(da, like, n_out, n_cls)
        if threads > 1:
            team_launch(bwd_rows, (g, out, grad, log), n_out, min(threads, n_out))
        else:
            bwd_rows(g, out, grad, log, 0, n_out)
        return
    g, out = cube(ga, like, n_out, n_cls, n_in), cube(oa, like, n_out, n_cls, n_in)
    grad = cube(da, like, n_out, n_cls, n_in)
    units = n_out * -(-n_in // width(n_cls))
    if threads > 1:
        team_launch(bwd_cols, (g, out, grad, log), units, min(threads, units))
    else:
        bwd_cols(g, out, grad, log, 0, units)


# The pool's share of a launch (``numba_softmax``: no OpenMP team): work units ``lo..hi`` on the
# calling thread, over the same views as ``forward_call`` / ``backward_call``, so that the
# kernels run the same machine code as on the team and give the same bits (over numpy views,
# a differently typed specialisation, log_softmax rows differed by an ulp).
@njit(nogil=True, cache=True)
def forward_units(xa, oa, like, n_out, n_cls, n_in, log, lo, hi):
    if n_in == 1:
        fwd_rows(rows(xa, like, n_out, n_cls), rows(oa, like, n_out, n_cls), log, lo, hi)
    else:
        fwd_cols(cube(xa, like, n_out, n_cls, n_in), cube(oa, like, n_out, n_cls, n_in), log,
                 lo, hi)


@njit(nogil=True, cache=True)
def backward_units(ga, oa, da, like, n_out, n_cls, n_in, log, lo, hi):
    if n_in == 1:
        bwd_rows(rows(ga, like, n_out, n_cls), rows(oa, like, n_out, n_cls),
                 rows(da, like, n_out, n_cls), log, lo, hi)
    else:
        bwd_cols(cube(ga, like, n_out, n_cls, n_in), cube(oa, like, n_out, n_cls, n_in),
                 cube(da, like, n_out, n_cls, n_in), log, lo, hi)

