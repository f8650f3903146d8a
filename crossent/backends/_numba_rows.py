"""Row passes of the numba CPU kernels: each loops over one contiguous float32 row from index 0.

Loops written this way (a 1-d row, ``range(n)``) are the ones LLVM vectorises; a loop indexed
from a computed start keeps numba's negative-index checks and runs scalar (measured 5x slower).
A row of 32000-128256 classes stays in L2 after its first read, so extra passes over it are
cheap; only the first read of the logits and the final write of the gradient touch memory.
"""
from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import overload

from ._numba_math import (
    bf16_to_f32, exp_f32, f16_to_f32, f32_to_bf16, f32_to_f16, margin, max_f32, scaled_gap,
    tanh_f32,
)

# Reassociation lets LLVM split the sums and the max into vector lanes; nnan/ninf are left out
# so that -inf logits and NaNs keep IEEE meaning (torch propagates them).
FM = {"nsz", "contract", "arcp", "afn", "reassoc"}
BF16, F16 = 1, 2  # storage formats of 16-bit logits, passed as uint16 bits

_F32 = np.float32


# LLVM vectorises these loops 16 lanes wide, four vectors an iteration, and runs what is left
# of a row, up to 63 values, one at a time: 36 of a 100-class row's exps were scalar. So the
# float32 passes run their loop twice, over the longest multiple of 64 and over the rest, whose
# count is masked below 64 so that LLVM vectorises that loop narrower (measured, 32 rows of 100
# classes: max, exp-sum and scale 4.1 -> 3.0 us; 50 classes 3.1 -> 1.8 us; 1000 classes
# unchanged). The loop bodies (``_``-prefixed, count ``n``) are inlined into both calls. The
# passes themselves are inlined into the kernels too (numba's ``inline="always"``): a call per
# pass and per row, each passing its arrays' fields, cost bfloat16 (32, 100) rows 1.2 us of a
# 6.2 us kernel (float32 and large rows unchanged; a cold compile takes ~1 s longer).
# Keep the mask at 63: llvmlite's LLVM 22 is built with assertions, and with 31 or 127 its loop
# vectoriser aborts the process compiling the max loop ("VPlan cost model and legacy cost model
# disagreed"). With 63 the numba tests pass compiled for the haswell and generic targets too
# (NUMBA_CPU_NAME), and the max loop compiles for znver2-4 and sapphirerapids.


@njit(inline="always")
def split(n):
    """``(head, tail)``: the head a multiple of 64, the tail's count below 64, as LLVM sees."""
    h = n & ~63
    return h, (n - h) & 63


@njit(fastmath=FM, inline="always")
def _max(x, n, m):
    for c in range(n):
        m = max_f32(m, x[c])
    return m


@njit(fastmath=FM, cache=True, inline="always")
def row_max(x):
    h, t = split(x.size)
    return _max(x[h:], t, _max(x, h, _F32(-np.inf)))


@njit(fastmath=FM, inline="always")
def _exp_sum(x, m, n):
    s = _F32(0.0)
    for c in range(n):
        s += exp_f32(x[c] - m)
    return s


@njit(fastmath=FM, cache=True, inline="always")
def exp_sum(x, m):
    h, t = split(x.size)
    return _exp_sum(x, m, h) + _exp_sum(x[h:], m, t)


@njit(fastmath=FM, inline="always")
def _exp_sum_store(x, m, out, n):
    s = _F32(0.0)
    for c in range(n):
        e = exp_f32(x[c] - m)
        out[c] = e
        s += e
    return s


@njit(fastmath=FM, cache=True, inline="always")
def exp_sum_store(x, m, out):
    """sum_c exp(x_c - m), also writing each exp into ``out`` (not overlapping ``x``)."""
    h, t = split(x.size)
    return _exp_sum_store(x, m, out, h) + _exp_sum_store(x[h:], m, out[h:], t)


@njit(fastmath=FM, inline="always")
def _exp_sum_inplace(x, m, n):
    s = _F32(0.0)
    for c in range(n):
        e = exp_f32(x[c] - m)
        x[c] = e
        s += e
    return s


@njit(fastmath=FM, cache=True, inline="always")
def exp_sum_inplace(x, m):
    """exp_sum_store with out = x. Its own loop, because LLVM guards a loop whose input and
    output may overlap with a runtime check and runs it scalar when they do."""
    h, t = split(x.size)
    return _exp_sum_inplace(x, m, h) + _exp_sum_inplace(x[h:], m, t)


@njit(fastmath=FM, inline="always")
def _gap_sum(x, m, k, n):
    d = _F32(0.0)
    for c in range(n):
        d += scaled_gap(m, x[c], k)
    return d


@njit(fastmath=FM, cache=True, inline="always")
def gap_sum(x, m, k):
    """sum_c k (m - x_c): with k C log(s) it is k sum_c (lse - x_c), without cancelling lse;
    each term scaled before the subtraction (logits near +-3e38 would overflow it)."""
    h, t = split(x.size)
    return _gap_sum(x, m, k, h) + _gap_sum(x[h:], m, k, t)


@njit(fastmath=FM, inline="always")
def _weighted_gap_sum(x, m, w, k, n):
    d = _F32(0.0)
    for c in range(n):
        d += w[c] * scaled_gap(m, x[c], k) if x[c] != m else _F32(0.0)
    return d


@njit(fastmath=FM, cache=True, inline="always")
def weighted_gap_sum(x, m, w, k):
    """sum_c w_c k (m - x_c); 0 * inf gives NaN for a -inf logit of weight 0, as torch.

    A term at the max is skipped, not w_c * 0: with an inf weight that is NaN, while torch's
    w_c * (lse - x_c) is inf (lse > m), which the caller's (sum_c w_c) log s term supplies."""
    h, t = split(x.size)
    return _weighted_gap_sum(x, m, w, k, h) + _weighted_gap_sum(x[h:], m, w[h:], k, t)


@njit(fastmath=FM, cache=True)
def weighted_smooth_terms(x, m, w, k, log_s):
    """sum_c w_c k (m - x_c + log s) class by class: torch's w_c (lse - x_c), for non-finite
    class weights, whose inf * 0 must fall exactly where torch's does."""
    d = _F32(0.0)
    for c in range(x.size):
        d += w[c] * (scaled_gap(m, x[c], k) + k * log_s)
    return d


@njit(fastmath=FM, cache=True)
def soft_target_sums(x, m, t, w, a, b):
    """For smoothed weighted targets u_c = (a t_c + b) w_c: (sum_c u_c, sum_c u_c (m - x_c)),
    the second in float64.

    A term of zero target mass at a finite logit is 0, not 0 * (m - x_c), which is NaN when
    m - x_c overflows float32 (logits near +-3e38); at a -inf logit it stays torch's
    0 * inf = NaN."""
    mass = _F32(0.0)
    d = 0.0  # float64: m - x_c overflows float32 near +-3e38, and the terms may cancel
    for c in range(x.size):
        u = (a * t[c] + b) * w[c]
        mass += u
        # 0 at the max (the mass * log s term supplies an inf weight's inf there, as torch's
        # u_c (lse - x_c)), and at zero mass unless the logit is -inf (torch's 0 * inf = NaN).
        if (u != 0 and x[c] != m) or x[c] == -np.inf:
            d += np.float64(u) * (np.float64(m) - np.float64(x[c]))
    return mass, d


@njit(fastmath=FM, cache=True)
def soft_target_terms(x, m, t, w, a, b, log_s):
    """sum_c u_c (m - x_c + log s) class by class in float64, torch's u_c (lse - x_c): for an
    inf class weight, whose inf * 0 must fall exactly where torch's does."""
    d = 0.0
    for c in range(x.size):
        u = np.float64((a * t[c] + b) * w[c])
        d += u * margin(m, x[c], log_s)
    return d


@njit(fastmath=FM, inline="always")
def _scale(g, k, n):
    for c in range(n):
        g[c] *= k


@njit(fastmath=FM, cache=True, inline="always")
def scale(g, k):
    h, t = split(g.size)
    _scale(g, k, h)
    _scale(g[h:], k, t)


@njit(fastmath=FM, inline="always")
def _scale_sub(g, k, b, n):
    for c in range(n):
        g[c] = g[c] * k - b


@njit(fastmath=FM, cache=True, inline="always")
def scale_sub(g, k, b):
    h, t = split(g.size)
    _scale_sub(g, k, b, h)
    _scale_sub(g[h:], k, b, t)


@njit(fastmath=FM, inline="always")
def _scale_sub_weighted(g, k, b, w, n):
    for c in range(n):
        g[c] = g[c] * k - b * w[c]


@njit(fastmath=FM, cache=True, inline="always")
def scale_sub_weighted(g, k, b, w):
    h, t = split(g.size)
    _scale_sub_weighted(g, k, b, w, h)
    _scale_sub_weighted(g[h:], k, b, w[h:], t)


@njit(fastmath=FM, inline="always")
def _scale_sub_targets(g, k, t, w, a, b, n):
    for c in range(n):
        g[c] = g[c] * k - (a * t[c] + b) * w[c]


@njit(fastmath=FM, cache=True, inline="always")
def scale_sub_targets(g, k, t, w, a, b):
    """g_c = g_c k - (a t_c + b) w_c: the probability-target gradient from exp values."""
    h, r = split(g.size)
    _scale_sub_targets(g, k, t, w, a, b, h)
    _scale_sub_targets(g[h:], k, t[h:], w[h:], a, b, r)


@njit(fastmath=FM, inline="always")
def _cap_factor(g, capped, inv_cap, n):
    for c in range(n):
        t = capped[c] * inv_cap
        g[c] *= _F32(1.0) - t * t


@njit(fastmath=FM, cache=True, inline="always")
def cap_factor(g, capped, inv_cap):
    """Chain rule of cap * tanh(x / cap): times 1 - tanh^2, tanh recovered from the capped row."""
    h, t = split(g.size)
    _cap_factor(g, capped, inv_cap, h)
    _cap_factor(g[h:], capped[h:], inv_cap, t)


@njit(fastmath=FM, inline="always")
def _softcap_into(x, cap, inv_cap, out, n):
    for c in range(n):
        out[c] = cap * tanh_f32(x[c] * inv_cap)  # libm's tanh is scalar: 8x slower


@njit(fastmath=FM, cache=True, inline="always")
def softcap_into(x, cap, inv_cap, out):
    h, t = split(x.size)
    _softcap_into(x, cap, inv_cap, out, h)
    _softcap_into(x[h:], cap, inv_cap, out[h:], t)


@njit(fastmath=FM, inline="always")
def _bits_to_f32(h, fmt, out, n):
    if fmt == BF16:
        for c in range(n):
            out[c] = bf16_to_f32(h[c])
    else:
        for c in range(n):
            out[c] = f16_to_f32(h[c])


@njit(fastmath=FM, cache=True, inline="always")
def bits_to_f32(h, fmt, out):
    k, t = split(h.size)
    _bits_to_f32(h, fmt, out, k)
    _bits_to_f32(h[k:], fmt, out[k:], t)


@njit(fastmath=FM, inline="always")
def _f32_to_bits(g, fmt, out, n):
    if fmt == BF16:
        for c in range(n):
            out[c] = f32_to_bf16(g[c])
    else:
        for c in range(n):
            out[c] = f32_to_f16(g[c])


@njit(fastmath=FM, cache=True, inline="always")
def f32_to_bits(g, fmt, out):
    h, t = split(g.size)
    _f32_to_bits(g, fmt, out, h)
    _f32_to_bits(g[h:], fmt, out[h:], t)


@njit(fastmath=FM, cache=True)
def f32_bits(v, fmt):
    """One float32 value's bits in 16-bit storage format ``fmt``, rounded as torch; 0 for
    float32 storage (``fmt == 0``, whose callers keep the value itself)."""
    if fmt == BF16:
        return f32_to_bf16(v)
    return f32_to_f16(v) if fmt == F16 else np.uint16(0)


@njit(cache=True)
def scratch(n):
    """A ``(n,)`` float32 scratch row starting on a 64-byte boundary. The vectorised sums over a
    row split it at its first aligned element, so an allocator-dependent start made the same
    row sum (and the loss's last bit) differ from call to call."""
    raw = np.empty(n + 16, np.float32)
    skip = (16 - (raw.ctypes.data // 4) % 16) % 16
    return raw[skip:skip + n]


# The kernels are written once for float32 rows; these three helpers adapt the storage, chosen
# at compile time by the row's dtype (float32 storage is used directly, 16-bit via scratch rows).


def load_row(row, fmt, cap, inv_cap, buf):
    """Return the row as float32, soft-capped when ``cap > 0`` (``buf`` is scratch)."""


def grad_dest(grow, gbuf):
    """Where the gradient of a row is computed: the output row itself, or float32 scratch."""


def store_row(gbuf, fmt, grow):
    """Write the float32 gradient scratch into a 16-bit output row (float32: nothing to do)."""


def _is_f32(row) -> bool:
    return row.dtype == np.float32 or str(row.dtype) == "float32"


@overload(load_row, jit_options={"fastmath": FM})
def _load_row(row, fmt, cap, inv_cap, buf):
    if _is_f32(row):
        def impl(row, fmt, cap, inv_cap, buf):
            if cap > 0:
                softcap_into(row, cap, inv_cap, buf)
                return buf
            return row
        return impl

    def impl16(row, fmt, cap, inv_cap, buf):
        bits_to_f32(row, fmt, buf)
        if cap > 0:
            softcap_into(buf, cap, inv_cap, buf)
        return buf
    return impl16


@overload(grad_dest)
def _grad_dest(grow, gbuf):
    if _is_f32(grow):
        return lambda grow, gbuf: grow
    return lambda grow, gbuf: gbuf


@overload(store_row)
def _store_row(gbuf, fmt, grow):
    if _is_f32(grow):
        return lambda gbuf, fmt, grow: None
    return lambda gbuf, fmt, grow: f32_to_bits(gbuf, fmt, grow)


# Token statistics (crossent.stats), used only when a caller asks for them.


@njit(fastmath=FM, cache=True)
def exp_moment_sum(x, m, out, store):
    """(sum_c e_c, sum_c e_c (x_c - m)) with e_c = exp(x_c - m), writing e_c into ``out`` when
    ``store`` (``out`` may be ``x``: each element is read before it is written). The second sum
    gives the entropy, log s - moment / s; a -inf logit adds 0 there, not 0 * -inf."""
    s = _F32(0.0)
    t = _F32(0.0)
    for c in range(x.size):
        d = x[c] - m
        e = exp_f32(d)
        if store:
            out[c] = e
        s += e
        t += e * d if e > _F32(0.0) else _F32(0.0)
    return s, t


@njit(fastmath=FM, cache=True)
def equal_before(x, v, n):
    """Whether any of ``x[:n]`` equals ``v``: an earlier maximum wins torch.argmax's ties."""
    found = False
    for c in range(n):
        found |= x[c] == v
    return found
