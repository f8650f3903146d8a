"""The cross-entropy Triton kernel: one program per row, loss + lse + gradient in one launch.

A row of ``C`` logits is read in ``BLOCK``-wide chunks. Pass 1 keeps an online max / sum-exp
(plus the weighted sums that label smoothing and probability targets need); pass 2, only when
a gradient is wanted, re-reads the row and writes the gradient. When the row fits one block
(``SINGLE_BLOCK``) it is read from memory exactly once and pass 2 reuses the registers. For
long rows pass 2 walks the blocks backwards: the last blocks read are the likeliest still in L2.

Everything is computed in the accumulation dtype (the dtype of ``lse``: float32, or float64 for
float64 logits) and only the stored gradient is rounded to the logits' dtype, so ``p_y - 1`` is
never formed in bf16/fp16. Row offsets are int64 (tensors over 2^31 elements).

Only ``tl`` primitives present in Triton 3.0+ that the interpreter (``TRITON_INTERPRET=1``) also
implements are used: that is why ``tanh`` is written out below instead of taken from libdevice.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(z):
    """tanh in the dtype of ``z`` to a few ulp (float32 and float64).

    libdevice's tanh does not run in the interpreter. For |z| < 0.5 a [7/6] Pade approximant
    (its truncation error is below float64 rounding there); above, (1 - e) / (1 + e) with
    e = exp(-2|z|), which has no cancellation once |z| >= 0.5 and saturates to 1 at inf.
    """
    a = tl.abs(z)
    z2 = z * z
    small = a * (135135 + z2 * (17325 + z2 * (378 + z2))) / (
        135135 + z2 * (62370 + z2 * (3150 + z2 * 28))
    )
    e = tl.exp(-2 * a)
    big = (1 - e) / (1 + e)
    t = tl.where(a < 0.5, small, big)
    return tl.where(z < 0, -t, t)


@triton.jit
def _round_to_bf16(x):
    """float32 -> nearest bfloat16 value (ties to even), still as float32.

    Only for the interpreter, whose float32 -> bfloat16 cast truncates where GPUs round: with the
    value pre-rounded, any cast is exact. Inf and NaN keep their class.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _load_block(
    logits_row, target_row, weight_ptr, cols, n_cols, smoothing, smooth_per_class, softcap,
    ACC: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """One block of a row: capped logits ``x`` (-inf on padding lanes), ``tanh(x / cap)``,
    the per-class mass ``wt`` (0 on padding lanes) and the lane mask.

    ``wt`` is ``w_c * t_c`` (smoothed) for probability targets and ``w_c`` (or 1) for class
    indices, where label smoothing spreads mass over the classes by the weights.
    """
    mask = cols < n_cols
    raw = tl.load(logits_row + cols, mask=mask, other=0.0).to(ACC)
    x = raw
    tanh_x = raw
    if HAS_SOFTCAP:
        tanh_x = _tanh(raw / softcap)
        x = tanh_x * softcap
    # Mask *after* the cap: tanh(-inf) = -1 would give padding lanes the mass of exp(-cap).
    x = tl.where(mask, x, float("-inf"))
    if HAS_WEIGHT:
        wt = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
    else:
        wt = tl.where(mask, 1.0, 0.0).to(ACC)
    if PROB_TARGET:
        t = tl.load(target_row + cols, mask=mask, other=0.0).to(ACC)
        if HAS_SMOOTHING:
            t = t * (1 - smoothing) + smooth_per_class
        wt = tl.where(mask, wt * t, 0.0)
    return x, tanh_x, wt, mask


@triton.jit
def _finite(m):
    """The reference point for a block of max ``m``: ``m`` itself, or 0 when all are -inf
    (subtracting 0 gives exp(-inf) = 0 rather than exp(-inf + inf) = NaN)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _block_stats(x, wt, mask):
    """Block max ``m`` and, about ``r = _finite(m)``: ``s = sum exp(x - r)``, ``mass = sum wt``
    and ``d = sum wt * (r - x)``.

    Differences to the max are exact for the logits that matter, so the loss keeps torch's
    accuracy (``x - max - log s``) even for logits of magnitude 1e4, where ``lse - x`` would not.
    """
    m = tl.max(x, 0)
    r = _finite(m)
    s = tl.sum(tl.exp(x - r), 0)
    # wt * inf is NaN for a -inf logit of zero mass, exactly as torch's -(logp * t).sum().
    d = tl.sum(wt * tl.where(mask, r - x, 0.0), 0)
    return m, s, tl.sum(wt, 0), d


@triton.jit
def _block_grad(
    x, tanh_x, wt, cols, r, log_s, coef, y, w_target, smooth_coef, scale,
    PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """grad_scale * d loss / d x for one block, in the accumulation dtype."""
    p = tl.exp((x - r) - log_s)
    g = p * coef
    if PROB_TARGET:
        g = g - wt
    else:
        g = g - tl.where(cols == y, w_target, 0.0)
        if HAS_SMOOTHING:
            g = g - smooth_coef * wt
    g = g * scale
    if HAS_SOFTCAP:
        # d(cap * tanh(x / cap)) / dx = 1 - tanh^2
        g = g * (1 - tanh_x * tanh_x)
    return g


@triton.jit
def _block_moment(x, cols, m):
    """Token statistics of a block of max ``m``, about ``r = _finite(m)``: the moment
    ``sum exp(x - r) (x - r)`` (entropy = log s - moment / s; -inf lanes add 0, not 0 * -inf)
    and the first column holding the max (torch.argmax's tie rule)."""
    z = x - _finite(m)
    t = tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp(z) * z), 0)
    first = tl.min(tl.where(x == m, cols, 2147483647), 0)
    return t, first


@triton.jit
def ce_fwd_kernel(
    logits_ptr, grad_ptr, target_ptr, weight_ptr, grad_scale_ptr, loss_ptr, lse_ptr,
    n_cols, stride_logits, stride_grad, stride_target, ignore_index,
    eps_hi, eps_lo, eps_c_hi, eps_c_lo, z_hi, z_lo, cap_hi, cap_lo,
    ACC: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr,
    stats_ptr=None, STATS: tl.constexpr = False,
):
    """Row ``program_id(0)``: write ``loss[row]``, ``lse[row]`` and, with ``WANT_GRAD``,
    ``grad[row, :]`` (which may alias the logits row: every element is read before it is
    written, by the same program).

    Class indices (torch's formula, eps = smoothing, w = class weights):
        loss = (1 - eps) w_y (lse - x_y) + eps / C * sum_c w_c (lse - x_c) + z lse^2
    Probabilities t (smoothed towards 1/C):
        loss = sum_c w_c t_c (lse - x_c) + z lse^2
    """
    row = tl.program_id(0).to(tl.int64)  # int64 before any multiply: row * stride > 2^31
    logits_row = logits_ptr + row * stride_logits
    target_row = target_ptr + row * stride_target
    cols = tl.arange(0, BLOCK)
    # Float arguments reach a kernel as float32: each option comes as a float32 pair whose sum
    # carries ~48 bits, so float64 rows see eps, eps / C, z and the cap at float64 accuracy.
    smoothing = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    smooth_per_class = tl.cast(eps_c_hi, ACC) + tl.cast(eps_c_lo, ACC)
    z_loss = tl.cast(z_hi, ACC) + tl.cast(z_lo, ACC)
    softcap = tl.cast(cap_hi, ACC) + tl.cast(cap_lo, ACC)

    # Pass 1: the first block, then online merging of the rest.
    x, tanh_x, wt, mask = _load_block(
        logits_row, target_row, weight_ptr, cols, n_cols, smoothing, smooth_per_class, softcap,
        ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
    )
    m, s, mass, d = _block_stats(x, wt, mask)
    if STATS:
        moment, first = _block_moment(x, cols, m)
    if not SINGLE_BLOCK:
        for start in range(BLOCK, n_cols, BLOCK):
            xb, _, wtb, maskb = _load_block(
                logits_row, target_row, weight_ptr, start + cols, n_cols, smoothing,
                smooth_per_class, softcap, ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
            )
            mb, sb, massb, db = _block_stats(xb, wtb, maskb)
            # Move both partial results to the new reference point. It is finite, and at least
            # each finite max, so neither exp below overflows (and exp(-inf - r) = 0).
            m_new = tl.maximum(m, mb)
            r_new = _finite(m_new)
            if STATS:  # sum e^(x - r')(x - r') = e^(r - r') (moment + (r - r') s), per part
                tb, fb = _block_moment(xb, start + cols, mb)
                ra, rb = _finite(m), _finite(mb)
                # exp(m - r'), not exp(ra - r'): an all -inf part weighs 0, never inf * 0
                moment = (tl.exp(m - r_new) * (moment + (ra - r_new) * s)
                          + tl.exp(mb - r_new) * (tb + (rb - r_new) * sb))
                first = tl.where(mb > m, fb, first)
            s = s * tl.exp(m - r_new) + sb * tl.exp(mb - r_new)
            d = d + mass * (r_new - _finite(m)) + db + massb * (r_new - _finite(mb))
            mass += massb
            m = m_new
    r = _finite(m)
    log_s = tl.log(s)
    # All -inf: lse = -inf (torch.logsumexp's value); the loss is then NaN, as torch's.
    lse = r + log_s
    # sum_c wt_c * (lse - x_c): mass = sum wt (C for plain index targets)
    wt_nll = d + mass * log_s

    # Per-row loss and the factors of the gradient  g = p * coef - (target terms).
    y = 0
    w_target = tl.zeros((), dtype=ACC)  # (1 - eps) * w_y: subtracted at the target class
    smooth_coef = tl.zeros((), dtype=ACC)  # eps / C: times w_c, subtracted everywhere
    if PROB_TARGET:
        loss = wt_nll
        coef = mass
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse
            coef += 2 * z_loss * lse
    else:
        y = tl.load(target_row)
        valid = y != ignore_index
        y = tl.where(valid, y, 0)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y).to(ACC)
        else:
            w_y = tl.full((), 1.0, ACC)
        w_y = tl.where(valid, w_y, 0.0)
        x_y = tl.load(logits_row + y).to(ACC)
        if HAS_SOFTCAP:
            x_y = _tanh(x_y / softcap) * softcap
        w_target = (1 - smoothing) * w_y if HAS_SMOOTHING else w_y
        loss = w_target * ((r - x_y) + log_s)
        coef = w_target
        if HAS_SMOOTHING:
            smooth_coef = tl.where(valid, smooth_per_class, 0.0)
            # eps / C * sum_c w_c (lse - x_c), with mass = sum_c w_c (C without weights)
            loss += smooth_coef * wt_nll
            coef += smooth_coef * mass
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse
            coef += tl.where(valid, 2 * z_loss * lse, 0.0)
        # Ignored rows contribute exactly 0, even with non-finite logits.
        loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if STATS and not PROB_TARGET:
        tl.store(stats_ptr + 2 * row, tl.where(valid & (first == y), 1.0, 0.0).to(ACC))
        tl.store(stats_ptr + 2 * row + 1, log_s - moment / s)

    if WANT_GRAD:
        scale = tl.load(grad_scale_ptr).to(ACC)  # read on the device: no host sync
        grad_row = grad_ptr + row * stride_grad
        out = grad_ptr.dtype.element_ty
        if SINGLE_BLOCK:
            g = _block_grad(x, tanh_x, wt, cols, r, log_s, coef, y, w_target, smooth_coef, scale,
                            PROB_TARGET, HAS_SMOOTHING, HAS_SOFTCAP)
            if ROUND_BF16:
                g = _round_to_bf16(g)
            tl.store(grad_row + cols, g.to(out), mask=mask)
        else:
            n_blocks = tl.cdiv(n_cols, BLOCK)
            for i in range(0, n_blocks):
                start = (n_blocks - 1 - i) * BLOCK  # backwards: the row's tail is freshest in L2
                xb, tb, wtb, maskb = _load_block(
                    logits_row, target_row, weight_ptr, start + cols, n_cols, smoothing,
                    smooth_per_class, softcap, ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
                )
                g = _block_grad(xb, tb, wtb, start + cols, r, log_s, coef, y, w_target, smooth_coef,
                                scale, PROB_TARGET, HAS_SMOOTHING, HAS_SOFTCAP)
                if ROUND_BF16:
                    g = _round_to_bf16(g)
                tl.store(grad_row + start + cols, g.to(out), mask=maskb)
