"""Portable PyTorch backend: fused cross-entropy forward that also produces the gradient.

Rows are processed in chunks so the temporaries stay a bounded size (``_CHUNK_ELEMENTS``
per buffer) whatever N is; no (N, C) log-probabilities are ever kept. Runs on any device.
See ``crossent.backends`` for the kernel contract.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._core.params import CEParams

# About 4 MiB of fp32 per temporary on CPU: large enough that per-op overhead is amortised,
# small enough to stay in cache-friendly territory. Accelerators prefer bigger launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_DEFAULT_CHUNK_ELEMENTS = 1 << 26


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(n_rows: int, n_classes: int, device: torch.device) -> int:
    budget = _CHUNK_ELEMENTS.get(device.type, _DEFAULT_CHUNK_ELEMENTS)
    return max(1, min(n_rows, budget // max(1, n_classes)))


def _capped(x: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """Soft-cap logits; also return tanh(x / cap), whose square gives the chain-rule factor."""
    if softcap is None:
        return x, None
    t = torch.tanh(x / softcap)
    return t * softcap, t


def ce_forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    grad_scale: Tensor | None,
    params: CEParams,
    stats: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row loss ``(R,)``, lse ``(R,)`` and, if ``grad_scale`` is given, the gradient ``(R, C)``;
    ``stats`` ``(R, 2)``, when given, is filled as the backend contract says."""
    n_rows, n_classes = logits.shape
    acc = acc_dtype(logits.dtype)
    # float64 rows: a row's loss can exceed float32 (z_loss * lse**2 near |lse| = 1e19) where
    # the reduced loss does not, and rows rounded to +-inf would sum to NaN.
    loss = torch.empty(n_rows, dtype=torch.float64, device=logits.device)  # (R,)
    lse = torch.empty(n_rows, dtype=acc, device=logits.device)  # (R,)
    grad = None
    if grad_scale is not None:
        grad = logits if params.inplace_backward else torch.empty_like(logits)  # (R, C)
    probs_target = target.is_floating_point()
    step = _rows_per_chunk(n_rows, n_classes, logits.device)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        x, tanh_x = _capped(logits[rows].to(acc), params.softcap)  # (r, C) acc
        if probs_target:
            out = _prob_rows(x, target[rows], weight, grad_scale, params)
        else:
            row_stats = None if stats is None else stats[rows]
            out = _index_rows(x, target[rows], weight, grad_scale, params, row_stats)
        loss[rows], lse[rows], g = out
        if grad is not None:
            if tanh_x is not None:
                # d(cap * tanh(x / cap))/dx = 1 - tanh^2
                g.mul_(1 - tanh_x * tanh_x)
            grad[rows] = g
    return loss, lse, grad


def index_target_sums(
    target: Tensor, weight: Tensor | None, ignore_index: int, n_classes: int, dtype: torch.dtype
) -> tuple[Tensor, int]:
    """The weight sum of the counted rows of ``(R,)`` class indices (0-d ``dtype``, the count
    when unweighted) and the first row whose index is neither in ``[0, C)`` nor
    ``ignore_index``, or -1.

    Compared in int64, the type the kernels index with. On accelerators (and while compiling)
    the range is checked by a device-side assert instead, so that it costs no host sync: the
    row returned is then always -1.
    """
    t = target.reshape(-1).long()  # (R,)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= n_classes))
    if weight is None:
        den = valid.sum(dtype=dtype)
    else:
        den = torch.where(valid, weight[torch.where(valid & ~bad, t, 0)], 0).sum(dtype=dtype)
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "crossent: target holds a class index out of range")
        return den, -1
    if not bad.any():
        return den, -1
    return den, int(bad.nonzero()[0, 0])


def _softmax_lse(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Softmax of each row, its logsumexp, and the two parts of it: the max ``m`` and
    ``log s``, max-subtracted so any finite logits are safe. Losses use ``(m - x_y) + log s``:
    for logits near 3e38, ``lse`` rounded to float32 has lost ``log s``."""
    m = x.amax(1, keepdim=True)  # (r, 1)
    # A row of all -inf gives m = -inf and NaNs below, exactly as torch's log_softmax does.
    p = (x - m).exp_()  # (r, C)
    s = p.sum(1, keepdim=True)  # (r, 1)
    p.div_(s)
    log_s = s.log()
    return p, (m + log_s).squeeze(1), m.squeeze(1), log_s.squeeze(1)


def _scaled_gaps(m: Tensor, x: Tensor, k: float) -> Tensor:
    """``k * (m - x)``, the difference rounded once as torch's log_softmax rounds it, as
    ``(m / 2 - x / 2) * 2k``: halving is exact, so this is bit for bit ``(m - x) * k``, and it
    cannot overflow for logits near +-3e38 (``m k - x k`` cannot either, but it cancels: each
    term rounds to ``ulp(k m)``, 0.03 of a 50-class row's loss at logits near 1e7)."""
    return (m * 0.5 - x * 0.5).mul_(2 * k)


def _index_rows(
    x: Tensor, t: Tensor, weight: Tensor | None, grad_scale: Tensor | None, params: CEParams,
    stats: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Class-index rows. With smoothing eps and class weights w (torch's formula):

    loss = (1 - eps) * w_y * (lse - x_y) + eps / C * sum_c w_c * (lse - x_c) [+ z * lse^2]

    The gradient is ``grad_scale`` times d loss / d x. Terms whose coefficient is 0 are never
    formed: 0 * inf (an inf class weight, lse**2 overflowing) is a NaN the maths does not have.
    """
    n_classes = x.shape[1]
    eps = params.eps
    p, lse, m, log_s = _softmax_lse(x)
    t = t.long()  # compared with ignore_index in int64, never in uint8
    if stats is not None:  # before p becomes the gradient; entr(0) = 0 for -inf logits
        stats[:, 0] = x.argmax(1) == t
        stats[:, 1] = torch.special.entr(p).sum(1)
    # Out-of-range indices (validation raised before) are treated as ignored, never read.
    valid = (t != params.ignore_index) & (t >= 0) & (t < n_classes)  # (r,)
    t_safe = torch.where(valid, t, 0).unsqueeze(1)  # (r, 1)
    counted = valid.to(x.dtype)  # (r,) 1 for counted rows; a bool mask would compute in float32
    w_y = counted
    if weight is not None:  # where, not counted * w: an ignored row of an inf class weight is 0
        w_y = torch.where(valid, weight[t_safe.squeeze(1)], 0)
    x_y = x.gather(1, t_safe).squeeze(1)
    coef = (1 - eps) * w_y  # multiplies p in the gradient
    # The per-row loss in float64 (r values): with logits near +-3e38, lse - x_y and lse**2
    # overflow float32, and 0 * inf would be a NaN the maths does not have.
    m64, log_s64 = m.double(), log_s.double()
    loss = coef.double() * ((m64 - x_y.double()) + log_s64)
    if eps > 0:
        # eps / C * sum_c w_c (lse - x_c), each term scaled before the subtraction and the sum:
        # with logits near +-3e38, lse - x_c alone (and C * lse - sum_c x_c) would overflow.
        k = eps / n_classes
        gaps = _scaled_gaps(m.unsqueeze(1), x, k)  # (r, C)
        if weight is None:
            w_total = float(n_classes)
            smooth = gaps.sum(1) + (k * w_total) * log_s  # w_total finite: C
        else:
            # Class by class, w_c (m - x_c + log s) as torch's w_c (lse - x_c): a -inf logit of
            # weight 0 and an inf weight at the max give NaN exactly where torch's do.
            w_total = weight.sum()
            smooth = ((gaps + (k * log_s).unsqueeze(1)) * weight).sum(1)
        loss = loss + torch.where(valid, smooth, 0)
        k_w = k * w_total  # a tensor when weighted: where() keeps an inf total off ignored rows
        coef = coef + (torch.where(valid, k_w, 0) if torch.is_tensor(k_w) else counted * k_w)
    if params.z_loss > 0:
        loss = loss + params.z_loss * (m64 + log_s64) ** 2
        coef = coef + 2 * params.z_loss * counted * lse
    # Ignored rows contribute exactly 0, even when their logits are not finite.
    loss = torch.where(valid, loss, 0)  # float64: see ce_forward
    if grad_scale is None:
        return loss, lse, None
    # The scale goes in per term, as torch's backward applies it: a mean over a zero weight
    # sum (scale inf) then gives torch's inf * p - inf = NaN, and ignored rows 0 * p.
    scale = torch.where(valid, grad_scale, 0)  # (r,)
    g = p.mul_((coef * scale).unsqueeze(1))  # (r, C), reuses the softmax buffer
    # The true-class term is subtracted in the accumulation dtype (p_y - 1 must not round away).
    g.scatter_add_(1, t_safe, (-(1 - eps) * w_y * scale).unsqueeze(1))
    if eps > 0:
        w_row = 1.0 if weight is None else weight
        g.sub_(torch.where(valid.unsqueeze(1), (eps / n_classes) * scale.unsqueeze(1) * w_row, 0))
    return loss, lse, g


def _prob_rows(
    x: Tensor, t: Tensor, weight: Tensor | None, grad_scale: Tensor | None, params: CEParams
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Probability rows: loss = -sum_c w_c * t_c * log p_c, with t smoothed towards 1/C."""
    eps = params.label_smoothing
    p, lse, m, log_s = _softmax_lse(x)
    t = t.to(x.dtype)
    if eps > 0:
        t = t * (1 - eps) + eps / x.shape[1]
    wt = t if weight is None else t * weight  # (r, C)
    # sum_c wt_c (lse - x_c) as sum_c wt_c ((m - x_c) + log s), summed in float64: near 3e38,
    # lse has lost log s in float32 and the terms overflow; a zero-mass term at a finite logit
    # is 0, not 0 * (an overflowed m - x_c); at a -inf logit it stays torch's 0 * inf = NaN.
    x64 = x.double()  # (r, C): a chunk of this portable path, bounded
    terms = wt.double() * ((m.double().unsqueeze(1) - x64) + log_s.double().unsqueeze(1))
    terms = torch.where((wt == 0) & (x > float("-inf")), 0.0, terms)
    loss = terms.sum(1)
    mass = wt.sum(1)  # (r,): total weighted target mass, 1 for plain distributions
    if params.z_loss > 0:  # never 0 * inf when lse**2 overflows
        loss = loss + params.z_loss * (m.double() + log_s.double()) ** 2
        mass = mass + 2 * params.z_loss * lse
    if grad_scale is None:
        return loss, lse, None
    g = p.mul_(mass.unsqueeze(1)).sub_(wt).mul_(grad_scale)
    return loss, lse, g


def prob_target_grad(
    logits: Tensor, weight: Tensor | None, params: CEParams,
    lse_parts: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """d loss[r] / d target[r, c] = -(1 - eps) * w_c * log p[r, c]  (probability targets), ``(R, C)``.

    ``log p = (x - m) - log s`` with ``lse = m + log s`` split as ``lse_parts`` ``((R,), (R,))``
    (the vocab-parallel loss passes its global ones), else from the logits' own rows. Never
    ``x - lse``: ``lse`` rounded to the logits' precision loses ``log s`` at large logits (an
    error of 0.4 in each gradient at logits near 1e7, all of it near 1e15)."""
    x, _ = _capped(logits.to(acc_dtype(logits.dtype)), params.softcap)
    if lse_parts is None:
        m = x.amax(1, keepdim=True)  # (R, 1); a row of all -inf gives NaN, as torch's
        z = x - m
        g = z.sub_(z.exp().sum(1, keepdim=True).log_())
    else:
        m, log_s = lse_parts
        g = (x - m.unsqueeze(1)).sub_(log_s.unsqueeze(1))
    g.mul_(-(1 - params.eps))
    if weight is not None:
        g.mul_(weight)
    return g


# The whole-call contract; imported last, as the composer itself uses acc_dtype from here.
def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
              reduction: str) -> Tensor:
    """Any device: ``gather`` along the class dim, differentiable (its backward is the scatter)."""
    acc = acc_dtype(input.dtype)
    class_dim = 0 if input.dim() == 1 else 1
    t = (target.reshape(()) if class_dim == 0 else target).long()
    # In int64: a uint8 compare would wrap ignore_index (-100 == 156 as uint8) and drop class 156
    valid = t != ignore_index
    safe = torch.where(valid, t, 0)
    picked = input.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)  # target's shape
    w_y = valid.to(acc) if weight is None else torch.where(
        valid, weight.detach().to(acc).gather(0, safe.reshape(-1)).reshape(safe.shape), 0)
    loss = torch.where(valid, -(w_y * picked.to(acc)), 0)  # 0, not NaN, at ignored positions
    if reduction == "none":
        return loss.to(input.dtype)
    total = loss.sum()
    # torch divides by the weight sum as it is: 0 gives NaN (or +-inf), negative flips the sign.
    return (total if reduction == "sum" else total / w_y.sum()).to(input.dtype)


from ._reduced import reduced  # noqa: E402

cross_entropy = reduced(ce_forward, index_target_sums)
