"""Element functions for the numba CPU kernels: a vectorisable float32 exp and 16-bit conversions.

libm's ``expf`` is a scalar call, so a loop that uses it never vectorises (about 20x slower than
the polynomial below on AVX-512). Every function here is branch-free (selects only) so LLVM can
vectorise the loops that inline it. They are compiled without ``reassoc``: the Cody-Waite split
and the half-float bit tricks depend on the exact order of their float operations.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# No reassociation (see above) and no nnan/ninf: -inf logits and NaNs must keep their meaning.
EXACT_FM = {"nsz", "contract", "arcp", "afn"}

_F32 = np.float32
_U32 = np.uint32


@intrinsic
def f32_from_bits(typingctx, bits):
    """Reinterpret a uint32 as float32 (a register move; vectorises)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def bits_from_f32(typingctx, value):
    """Reinterpret a float32 as uint32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def max_f32(typingctx, a, b):
    """llvm.maxnum: a max that LLVM vectorises as a reduction without no-NaN fast-math (4x faster
    than a compare-select loop, measured). A NaN operand is skipped, so a NaN logit does not
    reach the max; it still makes the row's exp-sum, and so its loss, NaN."""
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.maxnum", [f32], ir.FunctionType(f32, [f32, f32]))
        return builder.call(fn, args)
    return types.float32(types.float32, types.float32), codegen


@njit(fastmath=EXACT_FM, cache=True)
def exp_f32(z):
    """exp(z) for any float32 ``z``, within 1.01 ulp of the float64 result for normal results
    (measured), correctly scaled into the subnormal range, 0 below -104, inf above 88.73,
    exp(-inf) = 0 and NaN stays NaN.

    Cody-Waite reduction z = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-5 minimax polynomial
    for exp(r), and 2^n applied as two exact powers of two 2^(n >> 1) * 2^(n - (n >> 1)), so
    that n from -150 (subnormal results) to 128 (the top of the range) never leaves the
    exponent field. ``n`` is computed from ``z`` clamped to [-104, 89], so huge or infinite
    arguments never reach the integer conversion; the result for them is chosen by selects.
    """
    zc = z if z > _F32(-104.0) else _F32(-104.0)  # NaN -> -104 too, so n below is always defined
    zc = zc if zc < _F32(89.0) else _F32(89.0)
    n = np.floor(zc * _F32(1.44269504088896341) + _F32(0.5))
    r = zc - n * _F32(0.693359375) - n * _F32(-2.12194440e-4)  # ln2 split: n * hi is exact
    p = _F32(1.9875691500e-4)
    p = p * r + _F32(1.3981999507e-3)
    p = p * r + _F32(8.3334519073e-3)
    p = p * r + _F32(4.1665795894e-2)
    p = p * r + _F32(1.6666665459e-1)
    p = p * r + _F32(5.0000001201e-1)
    p = p * (r * r) + r + _F32(1.0)
    ni = np.int32(n)
    half = ni >> np.int32(1)
    two_a = f32_from_bits(_U32(half + np.int32(127)) << _U32(23))
    two_b = f32_from_bits(_U32(ni - half + np.int32(127)) << _U32(23))
    e = (p * two_a) * two_b  # p * 2^a is exact; one rounding into the subnormals, if any
    e = _F32(0.0) if z < _F32(-104.0) else e
    e = _F32(np.inf) if z > _F32(89.0) else e
    return z if z != z else e  # NaN in, NaN out


@njit(fastmath=EXACT_FM, cache=True)
def log_f32(v):
    """log(v) for float32 ``v``: within 1 ulp (measured) for normal positive ``v``; log(0) =
    -inf, log(inf) = inf, NaN (and negative ``v``) gives NaN. Subnormal ``v`` is not handled
    (the sums of exps it is used for are >= 1). libm's logf is a scalar call: a loop using it
    never vectorises.

    Cephes' logf: ``v = 2^e * x`` with ``x`` in [sqrt(1/2), sqrt(2)), from the exponent bits,
    and a degree-9 polynomial for log(x) around 1; ``e ln2`` added in two parts (exact high).
    """
    bits = bits_from_f32(v)
    e = np.int32((bits >> _U32(23)) & _U32(0xFF)) - np.int32(126)
    x = f32_from_bits((bits & _U32(0x007FFFFF)) | _U32(0x3F000000))  # [0.5, 1)
    low = x < _F32(0.707106781186547524)
    e = e - np.int32(1) if low else e
    x = (x + x - _F32(1.0)) if low else (x - _F32(1.0))
    z = x * x
    y = _F32(7.0376836292e-2)
    y = y * x - _F32(1.1514610310e-1)
    y = y * x + _F32(1.1676998740e-1)
    y = y * x - _F32(1.2420140846e-1)
    y = y * x + _F32(1.4249322787e-1)
    y = y * x - _F32(1.6668057665e-1)
    y = y * x + _F32(2.0000714765e-1)
    y = y * x - _F32(2.4999993993e-1)
    y = y * x + _F32(3.3333331174e-1)
    y = y * x * z
    fe = _F32(e)
    y = y + _F32(-2.12194440e-4) * fe
    y = y - _F32(0.5) * z
    r = (x + y) + _F32(0.693359375) * fe
    r = _F32(-np.inf) if v == _F32(0.0) else r
    r = v if v == _F32(np.inf) else r
    return _F32(np.nan) if not v >= _F32(0.0) else r  # NaN and negatives


@njit(fastmath=EXACT_FM, cache=True)
def finite_f32(v):
    """Whether ``v`` is finite. ``math.isfinite`` inside the reassociating row kernels may be
    folded to True (``v - v`` becomes 0 there); here it keeps IEEE meaning."""
    return v - v == _F32(0.0)


# No contraction either: fused into an FMA, m * k - v * k at v = m is the rounding error of
# v * k, not 0 (and an inf class weight times that residue is inf, not torch's NaN).
_NO_FMA = {"nsz", "arcp", "afn"}


@njit(fastmath=EXACT_FM, cache=True)
def margin(m, v, log_s):
    """``(m - v) + log s`` in float64, in that order: the loss of a row whose max is ``m`` at
    class value ``v``. Reassociation (allowed in the row loops) may compute it as
    ``(m + log s) - v``, where ``log s`` vanishes next to a large ``m``: rows of equal logits
    near 1e20 lost ``log C`` entirely (a loss of 0 instead of 1.0986 for 3 classes)."""
    return (np.float64(m) - np.float64(v)) + np.float64(log_s)


@njit(fastmath=_NO_FMA, cache=True)
def scaled_gap(m, v, k):
    """``k * (m - v)`` (``0 <= k <= 1``, the smoothing's ``eps / C``), as precise as torch's
    ``k * log_softmax``: the difference first, rounded once. Only where it overflows (logits near
    +-3e38) ``m * k - v * k``, whose scaled terms do not; everywhere else that form cancels: at
    logits near 1e7 each term rounds to ``ulp(k m)``, and a row of 50 classes lost 0.03 of its
    loss. Non-finite ``m`` or ``v`` give the same inf or NaN either way."""
    d = m - v
    if d == np.inf:
        return m * k - v * k
    return d * k


@njit(fastmath=_NO_FMA, cache=True)
def scaled_difference(k, a, b):
    """``k * a - k * b`` as written: with ``k = inf`` that is torch's inf - inf = NaN, which
    reassociation (allowed in the row loops) would fold into ``k * (a - b)``."""
    return k * a - k * b


@njit(fastmath=EXACT_FM, error_model="numpy", cache=True)
def tanh_f32(v):
    """tanh for float32 within 4.4 ulp (measured): Eigen's [13/6] rational approximation on
    |v| <= 7.905, exactly +-1 beyond 9 (where float32 tanh rounds to 1), v itself below 4e-4.
    The numpy error model drops the division's zero check, which would block vectorisation.
    """
    x = _F32(7.90531110763549805) if v > _F32(7.90531110763549805) else v  # NaN passes through
    x = _F32(-7.90531110763549805) if x < _F32(-7.90531110763549805) else x
    x2 = x * x
    p = x2 * _F32(-2.76076847742355e-16) + _F32(2.00018790482477e-13)
    p = x2 * p + _F32(-8.60467152213735e-11)
    p = x2 * p + _F32(5.12229709037114e-08)
    p = x2 * p + _F32(1.48572235717979e-05)
    p = x2 * p + _F32(6.37261928875436e-04)
    p = x2 * p + _F32(4.89352455891786e-03)
    q = x2 * _F32(1.19825839466702e-06) + _F32(1.18534705686654e-04)
    q = x2 * q + _F32(2.26843463243900e-03)
    q = x2 * q + _F32(4.89352518554385e-03)
    t = x if abs(x) < _F32(0.0004) else x * p / q
    t = _F32(1.0) if v > _F32(9.0) else t
    return _F32(-1.0) if v < _F32(-9.0) else t


@njit(fastmath=EXACT_FM, cache=True)
def bf16_to_f32(h):
    """bfloat16 bits (uint16) -> float32: the upper half of the float32 bits, exact."""
    return f32_from_bits(_U32(h) << _U32(16))


@njit(fastmath=EXACT_FM, cache=True)
def f32_to_bf16(f):
    """float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16)."""
    w = bits_from_f32(f)
    rounded = _U32(w + _U32(0x7FFF) + ((w >> _U32(16)) & _U32(1))) >> _U32(16)
    return np.uint16(0x7FC0) if f != f else np.uint16(rounded)


@njit(fastmath=EXACT_FM, cache=True)
def f16_to_f32(h):
    """IEEE half bits (uint16) -> float32, exact incl. subnormals/inf/NaN (c10's fp16_ieee_to_fp32)."""
    w = _U32(h) << _U32(16)
    sign = w & _U32(0x80000000)
    two_w = _U32(w + w)  # numba widens integer sums; wrap to 32 bits as C does
    normal = f32_from_bits(_U32((two_w >> _U32(4)) + _U32(0xE0 << 23))) * _F32(2.0**-112)
    subnormal = f32_from_bits((two_w >> _U32(17)) | _U32(126 << 23)) - _F32(0.5)
    bits = bits_from_f32(subnormal) if two_w < _U32(1 << 27) else bits_from_f32(normal)
    return f32_from_bits(sign | bits)


@njit(fastmath=EXACT_FM, cache=True)
def f32_to_f16(f):
    """float32 -> IEEE half bits, round to nearest even (c10's fp16_ieee_from_fp32_value)."""
    base = (abs(f) * _F32(2.0**112)) * _F32(2.0**-110)
    w = bits_from_f32(f)
    shl1_w = _U32(w + w)
    sign = w & _U32(0x80000000)
    bias = shl1_w & _U32(0xFF000000)
    bias = bias if bias > _U32(0x71000000) else _U32(0x71000000)
    base = f32_from_bits(_U32((bias >> _U32(1)) + _U32(0x07800000))) + base
    bits = bits_from_f32(base)
    nonsign = _U32(((bits >> _U32(13)) & _U32(0x00007C00)) + (bits & _U32(0x00000FFF)))
    out = (sign >> _U32(16)) | (_U32(0x7E00) if shl1_w > _U32(0xFF000000) else nonsign)
    return np.uint16(out)
