"""The cross-entropy Triton kernel: one program per row, loss + lse + gradient in one launch.

A row of ``C`` logits is read in ``BLOCK``-wide chunks. Pass 1 keeps an online max / sum-exp
(plus the weighted sums that label smoothing and probability targets need); pass 2, only when
a gradient is wanted, re-reads the row and writes the gradient. When the row fits one block
(``SINGLE_BLOCK``) it is read from memory exactly once and pass 2 reuses the registers. For
long rows pass 2 walks the blocks backwards: the last blocks read are the likeliest still in L2,
and pass 1's loads ask L2 to keep the row (``evict_last``) while pass 2's loads and stores
stream (``evict_first``). An ignored row skips pass 2's reads: its gradient is a constant.

In place (the gradient overwrites the logits row) every value the loss needs from the row —
the target's logit ``x_y`` — is loaded *before* pass 1: pass 1's block reductions synchronise
the program's warps, so no warp can have stored a gradient over ``x_y`` before another one
read it. A barrier between the passes makes that explicit for in-place launches.

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
    HAS_SOFTCAP: tl.constexpr, EVICT: tl.constexpr,
):
    """One block of a row: capped logits ``x`` (-inf on padding lanes), ``tanh(x / cap)``,
    the per-class mass ``wt`` (0 on padding lanes) and the lane mask.

    ``wt`` is ``w_c * t_c`` (smoothed) for probability targets and ``w_c`` (or 1) for class
    indices, where label smoothing spreads mass over the classes by the weights. Plain class-index
    rows (no smoothing) never use it: then it is a constant and no weight is loaded.
    """
    mask = cols < n_cols
    raw = tl.load(logits_row + cols, mask=mask, other=0.0, eviction_policy=EVICT).to(ACC)
    x = raw
    tanh_x = raw
    if HAS_SOFTCAP:
        tanh_x = _tanh(raw / softcap)
        x = tanh_x * softcap
    # Mask *after* the cap: tanh(-inf) = -1 would give padding lanes the mass of exp(-cap).
    x = tl.where(mask, x, float("-inf"))
    if HAS_WEIGHT and (PROB_TARGET or HAS_SMOOTHING):
        wt = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
    else:
        wt = tl.where(mask, 1.0, 0.0).to(ACC)
    if PROB_TARGET:
        t = tl.load(target_row + cols, mask=mask, other=0.0, eviction_policy=EVICT).to(ACC)
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
def _moved(mass, delta):
    """``mass * delta``, the change of ``sum wt * (r - x)`` when ``r`` moves by ``delta``; 0 when
    it does not move, also for an infinite mass (inf * 0 is a NaN the sum does not have)."""
    return tl.where(delta == 0, 0.0, mass * delta)


@triton.jit
def _block_stats(x, wt, mask, NEED_WT: tl.constexpr):
    """Block max ``m`` and, about ``r = _finite(m)``: ``s = sum exp(x - r)`` and, with
    ``NEED_WT`` (probability targets, smoothing), ``mass = sum wt`` and ``d = sum wt * (r - x)``
    (0 otherwise: plain class-index rows need neither, so they cost no reduction).

    Differences to the max are exact for the logits that matter, so the loss keeps torch's
    accuracy (``x - max - log s``) even for logits of magnitude 1e4, where ``lse - x`` would not.
    """
    m = tl.max(x, 0)
    r = _finite(m)
    s = tl.sum(tl.exp(x - r), 0)
    mass = tl.zeros_like(s)
    d = tl.zeros_like(s).to(tl.float64)
    if NEED_WT:
        # wt * inf is NaN for a -inf logit of zero mass, exactly as torch's -(logp * t).sum().
        # A term at the max is skipped, not wt * 0: with an inf weight that is NaN, where
        # torch's wt * (lse - x) is inf, which mass * log s supplies.
        # A zero-mass term at a finite logit is 0, not 0 * an overflowed r - x (logits near
        # +-3e38); at a -inf logit it stays torch's 0 * inf = NaN.
        keep = mask & (x != r) & ((wt != 0) | (x == float("-inf")))
        # float64: r - x overflows float32 for logits near +-3e38 (a few lanes' worth of work
        # on a memory-bound pass, and only with smoothing or probability targets)
        d = tl.sum(tl.where(keep, wt.to(tl.float64) * (r.to(tl.float64) - x.to(tl.float64)),
                            0.0), 0)
        mass = tl.sum(wt, 0)
    return m, s, mass, d


@triton.jit
def _block_grad(
    x, tanh_x, wt, cols, r, log_s, coef, y, w_target, smooth_coef, scale,
    PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """grad_scale * d loss / d x for one block, in the accumulation dtype.

    Probability targets: ``(p * coef - wt) * scale``. Class indices come with ``scale`` already
    in each coefficient (``coef``, ``w_target``, ``smooth_coef``), as torch's backward applies
    it per term: a mean over a zero weight sum (scale inf) gives torch's inf * p - inf = NaN,
    and ignored rows (scale 0) give 0 * p.
    """
    p = tl.exp((x - r) - log_s)
    g = p * coef
    if PROB_TARGET:
        g = (g - wt) * scale
    else:
        g = g - tl.where(cols == y, w_target, 0.0)
        if HAS_SMOOTHING:  # an ignored row's 0 never meets an inf class weight: 0, not NaN
            g = g - tl.where(smooth_coef == 0, 0.0, smooth_coef * wt)
    if HAS_SOFTCAP:
        # d(cap * tanh(x / cap)) / dx = 1 - tanh^2
        g = g * (1 - tanh_x * tanh_x)
    return g


@triton.jit
def _store_grad(grad_row, cols, g, mask, ROUND_BF16: tl.constexpr, EVICT: tl.constexpr):
    if ROUND_BF16:
        g = _round_to_bf16(g)
    tl.store(grad_row + cols, g.to(grad_row.dtype.element_ty), mask=mask, eviction_policy=EVICT)


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
    INPLACE: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr, stats_ptr=None, STATS: tl.constexpr = False,
):
    """Row ``program_id(0)``: write ``loss[row]``, ``lse[row]`` and, with ``WANT_GRAD``,
    ``grad[row, :]`` (``INPLACE``: the logits row itself; every element is read before it is
    written, and ``x_y`` before any element is).

    Class indices (torch's formula, eps = smoothing, w = class weights):
        loss = (1 - eps) w_y (lse - x_y) + eps / C * sum_c w_c (lse - x_c) + z lse^2
    Probabilities t (smoothed towards 1/C):
        loss = sum_c w_c t_c (lse - x_c) + z lse^2
    """
    NEED_WT: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    # Loads that pass 2 reads again should stay in L2; a single block is read once.
    EVICT_1: tl.constexpr = "evict_last" if WANT_GRAD and not SINGLE_BLOCK else ""
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

    # The target's logit, read first (see the module docstring: in place, pass 2 overwrites it).
    valid = True
    y = 0
    w_y = tl.full((), 1.0, ACC)
    x_y = tl.zeros((), dtype=ACC)
    if not PROB_TARGET:
        y = tl.load(target_row)
        # Out-of-range indices (validation raised before) count as ignored, and are never read.
        valid = (y != ignore_index) & (y >= 0) & (y < n_cols)
        y = tl.where(valid, y, 0)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y).to(ACC)
        w_y = tl.where(valid, w_y, 0.0)
        x_y = tl.load(logits_row + y).to(ACC)
        if HAS_SOFTCAP:
            x_y = _tanh(x_y / softcap) * softcap

    # Pass 1: the first block, then online merging of the rest.
    x, tanh_x, wt, mask = _load_block(
        logits_row, target_row, weight_ptr, cols, n_cols, smoothing, smooth_per_class, softcap,
        ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, EVICT_1,
    )
    m, s, mass, d = _block_stats(x, wt, mask, NEED_WT)
    if STATS:
        moment, first = _block_moment(x, cols, m)
    if not SINGLE_BLOCK:
        for start in range(BLOCK, n_cols, BLOCK):
            xb, _, wtb, maskb = _load_block(
                logits_row, target_row, weight_ptr, start + cols, n_cols, smoothing,
                smooth_per_class, softcap, ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
                EVICT_1,
            )
            mb, sb, massb, db = _block_stats(xb, wtb, maskb, NEED_WT)
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
            if NEED_WT:
                d = d + _moved(mass, r_new - _finite(m)) + db + _moved(massb, r_new - _finite(mb))
                mass += massb
            m = m_new
    r = _finite(m)
    log_s = tl.log(s)
    # All -inf: lse = -inf (torch.logsumexp's value); the loss is then NaN, as torch's.
    lse = r + log_s
    # sum_c wt_c * (lse - x_c): mass = sum wt (C for plain index targets)
    wt_nll = d + mass.to(tl.float64) * log_s.to(tl.float64)  # float64, as d

    # Per-row loss and the factors of the gradient  g = p * coef - (target terms).
    w_target = tl.zeros((), dtype=ACC)  # (1 - eps) * w_y: subtracted at the target class
    smooth_coef = tl.zeros((), dtype=ACC)  # eps / C: times w_c, subtracted everywhere
    # The row's loss in float64 (a few scalars): with logits near +-3e38, r - x_y and lse**2
    # overflow float32, and 0 * inf would be a NaN the maths does not have.
    lse64 = r.to(tl.float64) + log_s.to(tl.float64)
    if PROB_TARGET:
        loss = wt_nll.to(tl.float64)
        coef = mass
        if HAS_Z_LOSS:
            loss += z_loss * lse64 * lse64
            coef += 2 * z_loss * lse
    else:
        w_target = (1 - smoothing) * w_y if HAS_SMOOTHING else w_y
        loss = w_target.to(tl.float64) * ((r.to(tl.float64) - x_y.to(tl.float64))
                                          + log_s.to(tl.float64))
        coef = w_target
        if HAS_SMOOTHING:
            smooth_coef = tl.where(valid, smooth_per_class, 0.0)
            # eps / C * sum_c w_c (lse - x_c), with mass = sum_c w_c (C without weights)
            loss += smooth_coef.to(tl.float64) * wt_nll.to(tl.float64)
            coef += tl.where(valid, smooth_coef * mass, 0.0)  # ignored: never 0 * inf
        if HAS_Z_LOSS:
            loss += z_loss * lse64 * lse64
            coef += tl.where(valid, 2 * z_loss * lse, 0.0)
        # Ignored rows contribute exactly 0, even with non-finite logits.
        loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, lse)
    if STATS and not PROB_TARGET:
        tl.store(stats_ptr + 2 * row, tl.where(valid & (first == y), 1.0, 0.0).to(ACC))
        tl.store(stats_ptr + 2 * row + 1, log_s - moment / s)

    if WANT_GRAD:
        scale = tl.load(grad_scale_ptr).to(ACC)  # read on the device: no host sync
        if not PROB_TARGET:  # per term (see _block_grad); 0 for ignored rows
            scale = tl.where(valid, scale, 0.0)
            coef = coef * scale
            w_target = w_target * scale
            smooth_coef = smooth_coef * scale
        grad_row = grad_ptr + row * stride_grad
        if INPLACE:
            tl.debug_barrier()  # all of pass 1's reads of this row before any store to it
        if SINGLE_BLOCK:
            g = _block_grad(x, tanh_x, wt, cols, r, log_s, coef, y, w_target, smooth_coef, scale,
                            PROB_TARGET, HAS_SMOOTHING, HAS_SOFTCAP)
            _store_grad(grad_row, cols, g, mask, ROUND_BF16, "")
        else:
            n_blocks = tl.cdiv(n_cols, BLOCK)
            # Loop bounds, not a branch, skip the reads of an ignored row: it runs the second
            # loop instead (an index row is ignored iff ``valid`` is false).
            n_read = tl.where(valid, n_blocks, 0)
            for i in range(0, n_read):
                start = (n_blocks - 1 - i) * BLOCK  # backwards: the row's tail is freshest in L2
                xb, tb, wtb, maskb = _load_block(
                    logits_row, target_row, weight_ptr, start + cols, n_cols, smoothing,
                    smooth_per_class, softcap, ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING,
                    HAS_SOFTCAP, "evict_first",
                )
                g = _block_grad(xb, tb, wtb, start + cols, r, log_s, coef, y, w_target,
                                smooth_coef, scale, PROB_TARGET, HAS_SMOOTHING, HAS_SOFTCAP)
                _store_grad(grad_row, start + cols, g, maskb, ROUND_BF16, "evict_first")
            # An ignored row's gradient is p * 0: 0 where p is finite, i.e. when the lse is, and
            # NaN everywhere when it is not (an all -inf or NaN row), as torch's. (With softcap
            # the capped logits' derivative is finite: it does not change that.)
            fill = tl.zeros((BLOCK,), dtype=ACC) + tl.where(tl.abs(lse) < float("inf"), 0.0,
                                                             float("nan"))
            for k in range(0, n_blocks - n_read):
                col0 = k * BLOCK
                _store_grad(grad_row, col0 + cols, fill, col0 + cols < n_cols, ROUND_BF16,
                            "evict_first")
