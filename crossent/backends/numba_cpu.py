"""Numba CPU backend: a GIL-free row kernel per target kind, run on row blocks in parallel threads.

Per row (rows split into ``torch.get_num_threads()`` contiguous blocks, one per thread):
  1. ``m = max_c x_c``                         the only read of the logits from memory
  2. ``s = sum_c exp(x_c - m)``, storing each exp into the gradient row (when one is wanted)
  3. the gradient row is rescaled in place: ``grad_c = scale * (coef * exp_c / s - ...)``
so the logits are read once, the gradient written once, and exp evaluated once per element by
a vectorised polynomial (``_numba_math.exp_f32``). The loss uses ``m - x_y + log s`` rather than
``lse - x_y`` so that large logits (1e4) keep their small differences exact.

float32 is computed in place in the rows; bfloat16/float16 logits are passed as their uint16 bits
and converted per row into float32 scratch (exact both ways, rounding as torch). float64 logits
are rare on CPU (gradcheck, references) and go to the PyTorch backend, which keeps float64
accumulation. Without ``grad_scale`` (no_grad, ``requires_grad=False``) no gradient is made.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from numba import njit
from torch import Tensor

from .._core.params import CEParams
from . import TargetOutOfBounds, torch_fused
from ._reduced import reduced
from . import _numba_kdim_call as _kdim
from ._cpu_alloc import empty_huge
from ._opaque import opaque_kernel
from ._numba_host import (
    EMPTY, FORMATS, SMALL, as_array, f32_scalar, loss_slot, new_grad_tensor, put_loss_bits,
    reduced_loss, target_pass,
)
from ._numba_views import LIKE, flat, rows
from ._numba_math import finite_f32, margin, scaled_difference
from ._numba_probe import probe_rows
from . import _numba_threads
from ._numba_threads import _split_rows, parallel_min, team_threads, threads
from . import _omp_team
from ._omp_team import team_launch
from ._numba_rows import (
    FM, cap_factor, equal_before, exp_moment_sum, exp_sum, exp_sum_inplace,
    exp_sum_store, f32_bits, gap_sum, grad_dest, load_row, row_max, scale, scale_sub, scale_sub_targets,
    scale_sub_weighted, scratch, soft_target_sums, soft_target_terms, store_row, weighted_gap_sum,
    weighted_smooth_terms,
)

_F32 = np.float32
_NO_STATS = np.empty((0, 2), np.float32)  # the kernels' stats argument when none are wanted
_NO_LOSS = np.empty(0, np.float64)  # _index_call's losses when the caller does not read them


@njit(fastmath=FM, cache=True)
def _exp_sum(xr, m, dest, want_grad, aliased):
    """Step 2: sum_c exp(x_c - m), storing the exps into ``dest`` when a gradient is wanted."""
    if not want_grad:
        return exp_sum(xr, m)
    return exp_sum_inplace(dest, m) if aliased else exp_sum_store(xr, m, dest)


@njit(nogil=True, fastmath=FM, cache=True)
def _index_kernel(x, fmt, target, w, w_total, ignore_index, eps, z, cap, gscale, finite_scale,
                  want_grad, inplace, grad, loss, lse, stats, lo, hi):
    """Class-index targets. ``w`` has size 0 when unweighted; ``eps`` is label smoothing;
    ``finite_scale`` tells whether ``gscale`` is finite (decided by the caller: fast-math code
    may not test for inf itself); ``stats`` ``(R, 2)`` is filled when it has rows
    (``crossent.stats``), else has none."""
    want_stats = stats.shape[0] > 0
    n_rows, n_cls = x.shape
    has_w = w.size > 0
    keep = _F32(1.0) - eps
    eps_c = eps / _F32(n_cls)
    inv_cap = _F32(1.0) / cap if cap > 0 else _F32(0.0)
    aliased = inplace and fmt == 0 and cap == 0  # the gradient row is the logits row itself
    # Non-finite class weights: the smoothing term class by class, w_c (m - x_c + log s), as
    # torch's w_c (lse - x_c): inf * 0 only where torch has it (an inf weight at the max).
    exact_smooth = has_w and not finite_f32(_F32(w_total))
    buf = scratch(n_cls if (fmt != 0 or cap > 0) else 0)  # (C,)
    gbuf = scratch(n_cls if fmt != 0 else 0)  # (C,)
    for r in range(lo, hi):
        xr = load_row(x[r], fmt, cap, inv_cap, buf)
        y = np.int64(target[r])  # uint8 targets compare with ignore_index in int64
        # An index outside [0, C) is never read, whatever validation did (it raised before).
        valid = y != ignore_index and 0 <= y < n_cls
        m = row_max(xr)
        gaps = _F32(0.0)
        if eps > 0 and valid:  # before step 2, which may overwrite xr (in place)
            if exact_smooth:  # rare: an inf class weight; log s first, one more pass
                gaps = weighted_smooth_terms(xr, m, w, eps_c, _F32(math.log(exp_sum(xr, m))))
            else:
                gaps = weighted_gap_sum(xr, m, w, eps_c) if has_w else gap_sum(xr, m, eps_c)
        x_y = xr[y] if valid else _F32(0.0)
        dest = grad_dest(grad[r], gbuf)
        if want_stats:  # before step 2 may overwrite xr
            hit = valid and x_y == m and not equal_before(xr, m, y)
            stats[r, 0] = _F32(1.0) if hit else _F32(0.0)
            s, moment = exp_moment_sum(xr, m, dest, want_grad)
            stats[r, 1] = _F32(math.log(s)) - moment / s
        else:
            s = _exp_sum(xr, m, dest, want_grad, aliased)
        log_s = _F32(math.log(s))
        lse[r] = m + log_s
        if not valid:
            loss[r] = 0.0
            if want_grad:
                # 0 * p, not 0: a row whose softmax is NaN (all -inf) keeps NaN, as in torch.
                scale(dest, _F32(0.0) / s)
                store_row(dest, fmt, grad[r])
            continue
        w_y = w[y] if has_w else _F32(1.0)
        # The row's loss in float64 (a few scalars): with logits near +-3e38, m - x_y and
        # lse**2 overflow float32, and 0 * inf would be a NaN the maths does not have. Terms
        # whose coefficient is 0 are not computed (an inf class weight absent from the row).
        coef = keep * w_y
        row_loss = np.float64(coef) * margin(m, x_y, log_s)
        if eps > 0:
            if exact_smooth:  # gaps already holds sum_c w_c eps_c (m - x_c + log s)
                row_loss += np.float64(gaps)
            else:
                row_loss += np.float64(gaps) + np.float64(eps_c * w_total) * log_s
            coef += eps_c * w_total
        if z > 0:
            lse64 = np.float64(m) + log_s
            row_loss += np.float64(z) * lse64 * lse64
            coef += _F32(2.0) * z * lse[r]
        loss[r] = row_loss
        if not want_grad:
            continue
        # p_y - 1 (and the smoothing term) in float32, never rounded through a 16-bit grad.
        if finite_scale:
            g_y = gscale * (coef * (dest[y] / s) - eps_c * w_y - keep * w_y)
        else:  # mean over a zero weight sum: inf * p_y - inf = NaN at y, as torch
            g_y = scaled_difference(gscale, coef * (dest[y] / s), eps_c * w_y + keep * w_y)
        k = gscale * coef / s
        if eps > 0:
            if has_w:
                scale_sub_weighted(dest, k, gscale * eps_c, w)
            else:
                scale_sub(dest, k, gscale * eps_c)
        else:
            scale(dest, k)
        if cap > 0:
            cap_factor(dest, xr, inv_cap)
            t_y = x_y * inv_cap
            g_y *= _F32(1.0) - t_y * t_y
        dest[y] = g_y
        store_row(dest, fmt, grad[r])


@njit(nogil=True, fastmath=FM, cache=True)
def _prob_kernel(x, fmt, target, w, eps, z, cap, gscale, want_grad, inplace, grad, loss, lse,
                 lo, hi):
    """Probability targets ``(R, C)`` float32; ``w`` is ``(C,)`` (ones when unweighted)."""
    n_rows, n_cls = x.shape
    a = _F32(1.0) - eps if eps > 0 else _F32(1.0)
    b = eps / _F32(n_cls) if eps > 0 else _F32(0.0)
    inv_cap = _F32(1.0) / cap if cap > 0 else _F32(0.0)
    aliased = inplace and fmt == 0 and cap == 0  # the gradient row is the logits row itself
    buf = scratch(n_cls if (fmt != 0 or cap > 0) else 0)  # (C,)
    gbuf = scratch(n_cls if fmt != 0 else 0)  # (C,)
    for r in range(lo, hi):
        xr = load_row(x[r], fmt, cap, inv_cap, buf)
        m = row_max(xr)
        # loss = sum_c u_c (lse - x_c) = sum_c u_c (m - x_c) + (sum_c u_c) log s
        mass, gaps = soft_target_sums(xr, m, target[r], w, a, b)
        exact = not finite_f32(mass)  # rare: an inf weight; class by class, as torch
        if exact:
            gaps = soft_target_terms(xr, m, target[r], w, a, b, _F32(math.log(exp_sum(xr, m))))
        dest = grad_dest(grad[r], gbuf)
        s = _exp_sum(xr, m, dest, want_grad, aliased)
        log_s = _F32(math.log(s))
        lse_r = m + log_s
        lse[r] = lse_r
        # In float64, as the index kernel (lse**2 overflows float32 near 3e38).
        row_loss = np.float64(gaps) if exact else np.float64(gaps) + np.float64(mass) * log_s
        coef = mass
        if z > 0:  # never 0 * inf when lse**2 overflows
            lse64 = np.float64(m) + log_s
            row_loss += np.float64(z) * lse64 * lse64
            coef += _F32(2.0) * z * lse_r
        loss[r] = row_loss
        if want_grad:
            scale_sub_targets(dest, gscale * coef / s, target[r], w, gscale * a, gscale * b)
            if cap > 0:
                cap_factor(dest, xr, inv_cap)
            store_row(dest, fmt, grad[r])


@njit(nogil=True, fastmath=FM, error_model="numpy", cache=True)
def _index_call(xa, like, n_rows, n_cls, fmt, ta, tlike, w, w_total, opts, cap, want_grad,
                inplace, ga, loss, lse, threads):
    """A whole call in one launch, on the ``(R, C)`` contiguous logits at address ``xa``
    (element type ``like``'s), the ``(R,)`` contiguous targets at ``ta`` and the gradient at
    ``ga`` (``_numba_views``): the target pass, the rows with the gradient scaled for the
    reduction (on ``threads`` threads of torch's OpenMP team, ``_omp_team``), and the summed
    loss. Returns ``(loss sum, or its mean for "mean"; the gradient scale; first bad row or
    -1; whether the logits look like probabilities, when ``probe_tol >= 0``; the loss's 16-bit
    bits)``; with a bad row nothing else is written. ``opts`` is ``CEParams.whole_call``;
    ``loss`` (R,) float64 and ``lse`` (R,) are written, or have size 0 when unread. numpy's
    error model: x / 0 is inf or NaN (a mean over nothing, or over a zero weight sum),
    as torch."""
    return _whole_rows(rows(xa, like, n_rows, n_cls), fmt, flat(ta, tlike, n_rows), w, w_total,
                       opts, cap, want_grad, inplace, rows(ga, like, n_rows, n_cls), loss, lse,
                       threads)


@njit(nogil=True, fastmath=FM, error_model="numpy", cache=True)
def _plain_call(xa, like, n_rows, n_cls, fmt, ta, opts, cap, want_grad, ga, oa, threads):
    """``_index_call`` for ``lane_launch``'s calls (unweighted int64 targets, no in-place
    gradient, losses and lse unread): six arguments fewer to pass; a 16-bit loss also written
    at ``oa`` (``put_loss_bits``)."""
    none = np.empty(0, np.float32)  # no weight, no lse (a global array would be read-only)
    out = _whole_rows(rows(xa, like, n_rows, n_cls), fmt, flat(ta, np.empty(0, np.int64), n_rows),
                      none, float(n_cls), opts, cap, want_grad, False,
                      rows(ga, like, n_rows, n_cls), np.empty(0, np.float64), none, threads)
    put_loss_bits(oa, out[4], out[2])
    return out


@njit(nogil=True, fastmath=FM, error_model="numpy", cache=True)
def _whole_rows(x, fmt, target, w, w_total, opts, cap, want_grad, inplace, grad, loss, lse,
                threads):
    """The body of ``_index_call`` on the arrays (``grad`` may be ``x`` when no gradient is
    made)."""
    ignore_index, eps, z, mean, _, probe_tol = opts
    n_rows, n_cls = x.shape
    if loss.size == 0:  # per-row losses and lse the caller does not read: scratch
        loss = np.empty(n_rows, np.float64)
    if lse.size == 0:
        lse = np.empty(n_rows, np.float32)
    den, bad = target_pass(target, w, ignore_index, n_cls)
    if bad >= 0:
        return 0.0, 1.0, bad, False, np.uint16(0)
    probs = probe_tol >= 0 and probe_rows(x, fmt, probe_tol)  # before an in-place gradient
    scale = 1.0 / den if mean else 1.0
    # float32 options, as the composed path passes them: float64 ones would make the
    # gradient's coefficients float64 here and the two paths differ in the last bit
    args = (x, fmt, target, w, _F32(w_total), np.int64(ignore_index), _F32(eps), _F32(z),
            _F32(cap), _F32(scale), not mean or den != 0.0, want_grad, inplace, grad, loss, lse,
            np.empty((0, 2), np.float32))  # no stats (a global is read-only)
    if threads > 1:
        team_launch(_index_kernel, args, n_rows, threads)
    else:
        _index_kernel(*args, 0, n_rows)
    total = 0.0
    for r in range(n_rows):
        total += loss[r]
    total = total / den if mean else total
    return total, scale, -1, probs, f32_bits(_F32(total), fmt)


# Launchers for torch's OpenMP team (``_omp_team``): ``(n_rows, threads, *args)``.
@njit(nogil=True, cache=True)
def _index_team(n_rows, threads, *args):
    team_launch(_index_kernel, args, n_rows, threads)


@njit(nogil=True, cache=True)
def _prob_team(n_rows, threads, *args):
    team_launch(_prob_kernel, args, n_rows, threads)


def index_target_sums(
    target: Tensor, weight: Tensor | None, ignore_index: int, n_classes: int, dtype: torch.dtype
) -> tuple[Tensor, int]:
    """One pass over ``(R,)`` class indices: the weight sum of counted rows (0-d ``dtype``,
    summed in float64) and the first row out of range, or -1. See ``crossent.backends``."""
    if torch.compiler.is_compiling() or target.dtype not in (torch.int64, torch.uint8):
        return torch_fused.index_target_sums(target, weight, ignore_index, n_classes, dtype)
    w = EMPTY if weight is None else as_array(weight.contiguous())
    den, bad = target_pass(as_array(target), w, np.int64(ignore_index), n_classes)
    return torch.tensor(den, dtype=dtype), bad


def _ce_forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    grad_scale: Tensor | None,
    params: CEParams,
    stats: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row loss ``(R,)``, lse ``(R,)`` and, if ``grad_scale`` is given, the gradient ``(R, C)``;
    ``stats`` ``(R, 2)`` float32, when given, is filled as the backend contract says."""
    if logits.dtype not in FORMATS:  # float64
        return torch_fused.ce_forward(logits, target, weight, grad_scale, params, stats=stats)
    n_rows, n_cls = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float64)  # (R,) float64: see torch_fused.ce_forward
    lse = torch.empty(n_rows, dtype=torch.float32)  # (R,)
    want_grad = grad_scale is not None
    grad = None
    if want_grad:
        # A fresh (R, C) buffer is advised for huge pages: filling it costs 4x less in page faults.
        grad = logits if params.inplace_backward else empty_huge(logits.shape, logits.dtype)
    if n_rows == 0:
        return loss, lse, grad
    x = as_array(logits)
    out = as_array(grad) if want_grad else x  # never written without want_grad
    fmt = FORMATS[logits.dtype]
    eps = _F32(params.eps)
    cap = _F32(params.softcap if params.softcap is not None else 0.0)
    gscale = _F32(grad_scale.item() if want_grad else 0.0)
    if target.is_floating_point():
        w = np.ones(n_cls, np.float32) if weight is None else as_array(weight.float().contiguous())
        args = (x, fmt, as_array(target.float().contiguous()), w, eps, _F32(params.z_loss), cap,
                gscale, want_grad, params.inplace_backward, out, loss.numpy(), lse.numpy())
        _split_rows(_prob_kernel, args, n_rows, threads(n_rows * n_cls, n_rows), _prob_team)
    else:
        w = EMPTY if weight is None else as_array(weight.float().contiguous())
        w_total = _F32(w.sum(dtype=np.float32)) if weight is not None else _F32(n_cls)
        args = (x, fmt, as_array(target), w, w_total,
                np.int64(params.ignore_index), eps, _F32(params.z_loss), cap, gscale,
                bool(np.isfinite(gscale)), want_grad,
                params.inplace_backward, out, loss.numpy(), lse.numpy(),
                _NO_STATS if stats is None else stats.numpy())
        _split_rows(_index_kernel, args, n_rows, threads(n_rows * n_cls, n_rows), _index_team)
    return loss, lse, grad


ce_forward = opaque_kernel("numba", _ce_forward, torch.float64)  # a custom op under compile
_composed = reduced(ce_forward, index_target_sums)


def cross_entropy(
    logits: Tensor, target: Tensor, weight: Tensor | None, want_grad: bool, params: CEParams
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | float, bool | None]:
    """The whole call (``crossent.backends``' contract) in one kernel launch (class indices,
    float32/16-bit, eager; large ones split over torch's OpenMP team inside the launch): small
    calls pay for few Python steps, large ones for no Python thread hand-off.
    K-dimensional logits, and rows of few classes (``_numba_kdim_call.side_by_side``), take the
    K-dim kernel (positions side by side). Probability-target, float64 and compiled calls, and
    large ones where torch has no OpenMP team, take the composed path (which does not probe)."""
    if torch.compiler.is_compiling():
        return _composed(logits, target, weight, want_grad, params)
    kdim = logits.dim() == 3
    if not kdim and not logits.is_contiguous():
        logits = logits.contiguous()  # rows at a stride: the row kernels read contiguous rows
    if (kdim or _kdim.side_by_side(logits.shape[1])) and _kdim.fits(logits, target, weight, params):
        return _kdim.cross_entropy(logits, target, weight, want_grad, params, not kdim)
    if (kdim or target.is_floating_point() or logits.dtype not in FORMATS or logits.shape[0] == 0
            or (logits.numel() >= parallel_min() and not _omp_team.usable())):  # no team: Python threads
        return _composed(logits, target, weight, want_grad, params)
    n_rows, n_cls = logits.shape
    work = n_rows * n_cls
    grad = None
    if want_grad:
        if params.inplace_backward:
            grad = logits
        else:
            grad = torch.empty_like(logits) if work < SMALL else new_grad_tensor(logits)
    w = EMPTY if weight is None else as_array(weight.float().contiguous())
    w_total = float(w.sum(dtype=np.float32)) if weight is not None else float(n_cls)
    if not target.is_contiguous():
        target = target.contiguous()
    per_row = params.reduction == "none"
    # (R,) float64 losses (see torch_fused.ce_forward) and (R,) lse: made here only when the
    # caller reads them, else inside the launch (a small call pays per Python step)
    loss = np.empty(n_rows, np.float64) if per_row else _NO_LOSS
    lse = np.empty(n_rows, np.float32) if params.want_lse else EMPTY
    xa, dtype = logits.data_ptr(), logits.dtype
    value, scale, bad, probs, bits = _index_call(
        xa, LIKE[dtype], n_rows, n_cls, FORMATS[dtype], target.data_ptr(), LIKE[target.dtype], w,
        w_total, params.whole_call, params.softcap or 0.0, want_grad, params.inplace_backward,
        xa if grad is None else grad.data_ptr(), loss, lse, team_threads(work, n_rows),
    )
    if bad >= 0:
        raise TargetOutOfBounds(bad)
    if per_row:
        with np.errstate(over="ignore"):  # (rows beyond float32 are inf: no numpy warning)
            out = torch.from_numpy(loss.astype(np.float32))  # the contract's accumulation dtype
    else:
        out = reduced_loss(value, bits, dtype)
    return (out, torch.from_numpy(lse) if params.want_lse else None, grad, scale,
            None if params.probe_tol is None else probs)


def lane_launch(dtype: torch.dtype, n_cls: int, params: CEParams) -> Callable | None:
    """The launch of ``crossent._core.lane``'s calls with these options: contiguous ``(R, C)``
    logits of ``dtype`` whose rows have ``n_cls`` classes, ``(R,)`` int64 indices, no weight,
    reduced, no lse or in-place gradient (``None`` for calls it does not take). What a launch
    needs besides the rows is looked up here, once per plan: a small call pays per Python
    step, and more per torch call (measured (64, 10) fwd+bwd: a torch attribute read costs
    ~0.4 us alone and 1-2 us inside the call, in a training loop's cold caches).

    ``launch(logits, target, xa, ta, n_rows, want_grad) -> (0-d loss, gradient or None,
    probs)``, with ``xa`` and ``ta`` the tensors' addresses: the same kernels and bits as
    ``cross_entropy``, which it hands empty calls and, without torch's OpenMP team, large ones
    (those split over Python threads)."""
    if (dtype not in FORMATS or params.inplace_backward or params.want_lse
            or params.reduction == "none"):
        return None
    few = _kdim.side_by_side(n_cls)
    if few and params.softcap is not None:
        return None
    like, fmt, tlike, opts = LIKE[dtype], FORMATS[dtype], LIKE[torch.int64], params.whole_call
    cap = params.softcap or 0.0
    kernel = _kdim.lane_rows_call if few else _plain_call
    slot16 = dtype != torch.float32  # the 16-bit loss is written by the launch (``loss_slot``)

    def launch(logits: Tensor, target: Tensor, xa: int, ta: int, n_rows: int, want_grad: bool
               ) -> tuple[Tensor, Tensor | None, bool]:
        work = n_rows * n_cls
        split = work >= _numba_threads.PARALLEL_MIN  # (read here: tests lower it)
        if work == 0 or (split and not _omp_team.usable()):
            loss, _, grad, _, probs = cross_entropy(logits, target, None, want_grad, params)
            return loss.to(dtype), grad, probs  # (in the accumulation dtype)
        grad, ga = None, xa
        if want_grad:
            grad = torch.empty_like(logits) if work < SMALL else new_grad_tensor(logits)
            ga = grad.data_ptr()
        slot = loss_slot(dtype) if slot16 else None
        threads = min(torch.get_num_threads(), n_rows) if split else 1
        if few:
            total, _, bad, probs, _ = kernel(xa, like, n_rows, n_cls, fmt, ta, tlike, opts,
                                             want_grad, ga, 0 if slot is None else slot.data_ptr(),
                                             threads)
        else:
            total, _, bad, probs, _ = kernel(xa, like, n_rows, n_cls, fmt, ta, opts, cap,
                                             want_grad, ga, 0 if slot is None else slot.data_ptr(),
                                             threads)
        if bad >= 0:
            raise TargetOutOfBounds(bad)
        return (torch.from_numpy(f32_scalar(total)) if slot is None else slot), grad, probs

    return launch


def warm_up() -> None:
    """Load the machine code of the common calls' kernels (numba's cache, or a compile): float32
    and bfloat16 rows, few-class rows, K-dim logits, the composed path's row kernel. Run on a
    background thread by ``impl="auto"`` (``crossent._core.dispatch.ready``)."""
    params = CEParams(reduction="mean", want_lse=False)
    for dtype in (torch.float32, torch.bfloat16):
        target = torch.zeros(2, dtype=torch.int64)
        cross_entropy(torch.zeros(2, 40, dtype=dtype), target, None, True, params)  # one launch
        cross_entropy(torch.zeros(2, 3, dtype=dtype), target, None, True, params)  # few classes
        for n_cls in (3, 40):  # the lane's two launches
            x = torch.zeros(2, n_cls, dtype=dtype)
            lane_launch(dtype, n_cls, params)(x, target, x.data_ptr(), target.data_ptr(), 2, True)
        cross_entropy(torch.zeros(1, 3, 2, dtype=dtype), target, None, True, params)  # K-dim
        _ce_forward(torch.zeros(2, 40, dtype=dtype), target, None, torch.ones(()), params)
    index_target_sums(target, None, -100, 40, torch.float32)


