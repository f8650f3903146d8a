"""The whole call for K-dimensional logits ``(N, C, S)`` on the numba kernel of
``_numba_kdim``, and for rows of few classes read as the ``(1, C, R)`` view: target pass, misuse
probe, the blocks (on one thread in the same launch, or split over threads), the reduction."""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor

from .._core.params import CEParams
from . import TargetOutOfBounds
from ._numba_host import (
    EMPTY, FORMATS, SMALL, as_array, f32_scalar, new_grad_tensor, put_loss_bits, reduced_loss,
    target_pass,
)
from ._numba_kdim import block_width, kdim_kernel
from ._numba_probe import probe_positions
from ._numba_rows import FM, f32_bits
from ._numba_views import LIKE, cube, flat, rows
from ._numba_threads import _split_rows, parallel_min, team_threads
from ._omp_team import team_launch

_F32 = np.float32


# Rows of at most this many classes run through the K-dim kernel, side by side (``(1, C, R)``):
# 64 rows vectorise where a 10-class row cannot. Each block of rows is copied into that layout
# (``copied_rows_kernel``): reading the transposed view in place loads C apart, 2-3x slower.
# Measured against the row kernel (the host entry, the forward that makes the gradient, tiled
# copies included), on two threads (AVX2): (1024, 24) 41 against 64 us, (1024, 32) 49 against
# 58, (1024, 40) 58 against 71, (1024, 48) 70 against 65, (4096, 32) 154 against 205; on one
# thread (256, 32) 28 against 31, (1024, 32) 99 against 102, (256, 48) 37 against 35. On
# AVX-512 the row kernel is relatively faster (before the tiled copies (1024, 32) was 53
# against 54 us, with copies then 2.5x dearer).
FEW_CLASSES = 32
# Rows per block side by side: small enough that a call from PARALLEL_MIN logits of up to
# FEW_CLASSES classes has a block for each of two threads, and fixed, so that the loss's
# per-block sums (and its bits) do not depend on the thread count. Measured on two threads
# against 512: (512, 32) 47 -> 31 us (two blocks instead of one), (1024, 16) 33 us either way,
# (8192, 16) 176 -> 180 us; 128 was slower from 4K rows on.
ROWS_BLOCK = 256


def side_by_side(n_cls: int) -> bool:
    """Whether rows of ``n_cls`` classes take the K-dim kernel side by side: every path asks
    this, so that a call gives the same bits whichever entry it came through."""
    return n_cls <= FEW_CLASSES


def fits(logits: Tensor, target: Tensor, weight: Tensor | None, params: CEParams) -> bool:
    """Logits the in-place K-dim kernel takes (class indices, no softcap, 32/16-bit, finite
    class weights with smoothing; the caller checked that it is not tracing)."""
    return (params.softcap is None and logits.dtype in FORMATS and not target.is_floating_point()
            and logits.numel() > 0
            and (weight is None or not params.label_smoothing > 0 or bool(weight.isfinite().all())))


def cross_entropy(
    logits: Tensor, target: Tensor, weight: Tensor | None, want_grad: bool, params: CEParams,
    rows: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, float, bool | None]:
    """``(N, C, S)`` logits with class indices ``(N * S,)``: read and written in their layout.
    With ``rows``, ``(R, C)`` logits, block by block copied side by side (``(1, C, R)``).
    Written as few Python steps as it takes: at (8, 10) this function was half the call. The
    kernel sees the tensors through their addresses (``_numba_views``)."""
    if rows:
        n_in, n_cls = logits.shape
        n, launch = 1, _rows_call
    else:  # contiguous (the caller's to_rows keeps only those K-dimensional)
        n, n_cls, n_in = logits.shape
        launch = _kdim_call
    bw = min(block_width(n_cls), ROWS_BLOCK) if rows else block_width(n_cls)
    blocks = n * ((n_in + bw - 1) // bw)  # n_blocks
    opts = params.whole_call
    # Reduced calls keep one float64 sum per block, and a call that drops the lse keeps none:
    # per-pixel buffers would cost 8 bytes a pixel beside 4 C bytes of logits.
    loss = np.empty(blocks, np.float64) if opts[4] else np.empty(n * n_in, np.float32)
    lse = np.empty(n * n_in, np.float32) if params.want_lse else EMPTY  # (N * S,) or none
    dtype, xa = logits.dtype, logits.data_ptr()
    grad, ga = None, xa  # the gradient and its address (the logits' when none is written)
    work = n * n_cls * n_in
    if want_grad:
        if params.inplace_backward:
            grad = logits
        else:  # (the common small case without a call: a small call pays per Python step)
            grad = torch.empty_like(logits) if work < SMALL else new_grad_tensor(logits)
        ga = grad.data_ptr()
    if weight is None:
        w, w_total = EMPTY, float(n_cls)
    else:
        w = as_array(weight.float().contiguous())
        w_total = float(w.sum(dtype=np.float32))
    threads = team_threads(work, blocks)
    on_pool = threads == 1 and blocks > 1 and work >= parallel_min()  # no OpenMP team here
    if not target.is_contiguous():
        target = target.contiguous()
    total, scale, bad, probs, out16 = launch(
        xa, LIKE[dtype], n, n_cls, n_in, FORMATS[dtype], target.data_ptr(), LIKE[target.dtype],
        w, w_total, opts, want_grad, ga, loss, lse, bw, 0 if on_pool else blocks, threads,
    )
    if bad >= 0:
        raise TargetOutOfBounds(bad)
    if on_pool:  # the blocks on Python threads; the launch checked, probed and scaled
        x = as_array(logits)
        out = x if grad is None else as_array(grad)
        args = (x, FORMATS[logits.dtype], target.numpy(), w, _F32(w_total),
                np.int64(params.ignore_index), _F32(params.eps), _F32(params.z_loss),
                _F32(scale), scale != math.inf, want_grad, out, loss, lse, bw)
        _split_rows(copied_rows_kernel if rows else kdim_kernel, args, blocks,
                    min(torch.get_num_threads(), blocks))
        total = _kdim_total(loss, opts[4], scale if opts[3] else 1.0)
        out16 = f32_bits(f32_scalar(total)[()], FORMATS[logits.dtype])
    out_loss = reduced_loss(total, out16, dtype) if opts[4] else torch.from_numpy(loss)
    return (out_loss, torch.from_numpy(lse) if params.want_lse else None, grad, scale,
            None if params.probe_tol is None else probs)


_block_width = njit(cache=True)(block_width.__wrapped__)  # the same rule, inside a launch


@njit(nogil=True, fastmath=FM, error_model="numpy", cache=True)
def lane_rows_call(xa, like, n_in, n_cls, fmt, ta, tlike, opts, want_grad, ga, oa, threads):
    """The whole call of ``crossent._core.lane``'s few-class rows in one launch
    (``numba_cpu.lane_launch``): contiguous ``(R, C)`` logits at ``xa``, ``(R,)`` indices at
    ``ta``, reduced, unweighted, no softcap, lse or in-place gradient; the gradient at ``ga``
    (``xa`` when none is wanted), a 16-bit loss's bits at ``oa`` (0: none). The launch makes
    its own scratch (the rows copied side by side, see ``copied_rows_kernel``). Returns
    ``_run_rows``' tuple."""
    bw = min(_block_width(n_cls), ROWS_BLOCK)
    blocks = (n_in + bw - 1) // bw
    none = np.empty(0, np.float32)  # no weight, no lse (a global array would be read-only)
    out = _run_rows(rows(xa, like, n_in, n_cls), fmt, flat(ta, tlike, n_in), none, float(n_cls),
                    opts, want_grad, rows(ga, like, n_in, n_cls), np.empty(blocks, np.float64),
                    none, bw, blocks, min(threads, blocks))
    put_loss_bits(oa, out[4], out[2])  # a 16-bit loss at oa
    return out


@njit(nogil=True, fastmath=FM, error_model="numpy", cache=True)
def copied_rows_kernel(x, fmt, target, w, w_total, ignore_index, eps, z, gscale, finite_scale,
                       want_grad, grad, loss, lse, bw, lo, hi):
    """``kdim_kernel``'s blocks ``lo..hi`` of ``(R, C)`` rows ``x``: each block's ``bw`` rows
    copied side by side into a ``(1, C, bw)`` scratch (``_copy_tiles``; its runs of positions
    then contiguous) and its gradient copied back into ``grad`` (``x`` itself when in place: a
    block is read before it is written). ``loss`` holds one sum per block, or one loss per row
    (``R`` values); ``lse`` one per row, or none."""
    n_rows, n_cls = x.shape
    per_row = loss.size == n_rows
    xs = np.empty(n_cls * bw, x.dtype)
    gs = np.empty(n_cls * bw if want_grad else 0, x.dtype)
    for blk in range(lo, hi):
        r0 = blk * bw
        nb = min(bw, n_rows - r0)
        xt = xs[:n_cls * nb].reshape((1, n_cls, nb))
        _copy_tiles(x[r0:r0 + nb], xt[0], True)
        gt = gs[:n_cls * nb].reshape((1, n_cls, nb)) if want_grad else xt
        kdim_kernel(xt, fmt, target[r0:r0 + nb], w, w_total, ignore_index, eps, z, gscale,
                    finite_scale, want_grad, gt,
                    loss[r0:r0 + nb] if per_row else loss[blk:blk + 1],
                    lse[r0:r0 + nb] if lse.size > 0 else lse, bw, 0, 1)
        if want_grad:
            _copy_tiles(grad[r0:r0 + nb], gt[0], False)


# The copies move tiles of 16 rows: a loop of a constant 16 runs unrolled, and a tile's class
# runs stay in L1. Copied whole class by class, a block of 512 rows touched a line per row for
# every class, and a power-of-two row stride sent them all to the same cache sets (measured
# on AVX2, (512, C) blocks: 0.85-1.4 ns a value in, 0.6-2.4 back; tiled 0.35-0.45 both ways).
_TILE = 16


@njit(nogil=True, error_model="numpy", cache=True)
def _copy_tiles(rows, runs, to_runs):
    """``runs[c, r] = rows[r, c]`` (``to_runs``) or back, for ``(R, C)`` rows and their ``(C, R)``
    side-by-side copy, tile by tile (the branch is decided once: LLVM unswitches the loops)."""
    n_rows, n_cls = rows.shape
    whole = n_rows - n_rows % _TILE
    for t0 in range(0, whole, _TILE):
        tile = rows[t0:t0 + _TILE]
        for c in range(n_cls):
            run = runs[c, t0:t0 + _TILE]
            for r in range(_TILE):
                if to_runs:
                    run[r] = tile[r, c]
                else:
                    tile[r, c] = run[r]
    for r in range(whole, n_rows):
        for c in range(n_cls):
            if to_runs:
                runs[c, r] = rows[r, c]
            else:
                rows[r, c] = runs[c, r]


# The whole call's two entries, over arrays made from the tensors' addresses (``_numba_views``):
# contiguous ``(N, C, S)`` logits as a C-layout array (LLVM vectorises its class runs only when
# it knows them contiguous: a strided view made segmentation 3.5x slower), and ``(R, C)`` rows
# as the ``(1, C, R)`` transposed view. The gradient has the logits' layout.
@njit(nogil=True, fastmath=FM, error_model="numpy", cache=True)
def _kdim_call(xa, like, n, n_cls, n_in, fmt, ta, tlike, w, w_total, opts, want_grad, ga, loss,
               lse, bw, blocks, threads):
    return _run(cube(xa, like, n, n_cls, n_in), fmt, flat(ta, tlike, n * n_in), w, w_total,
                opts, want_grad, cube(ga, like, n, n_cls, n_in), loss, lse, bw, blocks, threads)


@njit(nogil=True, fastmath=FM, error_model="numpy", cache=True)
def _rows_call(xa, like, n, n_cls, n_in, fmt, ta, tlike, w, w_total, opts, want_grad, ga, loss,
               lse, bw, blocks, threads):
    return _run_rows(rows(xa, like, n_in, n_cls), fmt, flat(ta, tlike, n_in), w, w_total, opts,
                     want_grad, rows(ga, like, n_in, n_cls), loss, lse, bw, blocks, threads)


@njit(nogil=True, fastmath=FM, error_model="numpy", cache=True)
def _run(x, fmt, target, w, w_total, opts, want_grad, grad, loss, lse, bw, blocks, threads):
    """The K-dim whole call in one launch on ``x`` ``(N, C, S)`` and its gradient ``grad``,
    with the ``(N * S,)`` targets: the target pass, the probe (when ``probe_tol >= 0``), the
    gradient scale and, when ``blocks > 0``, all blocks (on ``threads`` threads of torch's
    OpenMP team, ``_omp_team``) and the reduced loss. ``opts`` is ``CEParams.whole_call``.
    Returns ``(reduced loss, scale, first bad position or -1, probs, the loss's 16-bit
    bits)``; nothing is written after a bad position. numpy's error model: x / 0 is inf or
    NaN, as torch."""
    bad, probs, scale = _begin(x, fmt, target, w, opts)
    if bad >= 0 or blocks == 0:
        return 0.0, scale, bad, probs, np.uint16(0)
    args = _kernel_args(x, fmt, target, w, w_total, opts, scale, want_grad, grad, loss, lse, bw)
    if threads > 1:
        team_launch(kdim_kernel, args, blocks, threads)
    else:
        kdim_kernel(*args, 0, blocks)
    return _end(loss, opts, scale, probs, fmt)


@njit(nogil=True, fastmath=FM, error_model="numpy", cache=True)
def _run_rows(x, fmt, target, w, w_total, opts, want_grad, grad, loss, lse, bw, blocks,
              threads):
    """``_run`` on ``(R, C)`` rows through ``copied_rows_kernel`` (the probe reads them as the
    ``(1, C, R)`` view). Its own function, not a kernel argument: a function passed as an
    argument keeps numba from caching the launch."""
    bad, probs, scale = _begin(x.T[np.newaxis], fmt, target, w, opts)
    if bad >= 0 or blocks == 0:
        return 0.0, scale, bad, probs, np.uint16(0)
    args = _kernel_args(x, fmt, target, w, w_total, opts, scale, want_grad, grad, loss, lse, bw)
    if threads > 1:
        team_launch(copied_rows_kernel, args, blocks, threads)
    else:
        copied_rows_kernel(*args, 0, blocks)
    return _end(loss, opts, scale, probs, fmt)


@njit(nogil=True, error_model="numpy", cache=True)
def _begin(view, fmt, target, w, opts):
    """The target pass, the probe on ``view`` ``(N, C, S)`` (before an in-place gradient) and
    the gradient scale: ``(first bad position or -1, probs, scale)``."""
    ignore_index, _, _, mean, _, probe_tol = opts
    den, bad = target_pass(target, w, ignore_index, view.shape[1])
    if bad >= 0:
        return bad, False, 1.0
    probs = probe_tol >= 0 and probe_positions(view, fmt, probe_tol)
    return -1, probs, (np.inf if den == 0.0 else 1.0 / den) if mean else 1.0


@njit(inline="always")
def _kernel_args(x, fmt, target, w, w_total, opts, scale, want_grad, grad, loss, lse, bw):
    ignore_index, eps, z, _, _, _ = opts
    return (x, fmt, target, w, _F32(w_total), np.int64(ignore_index), _F32(eps), _F32(z),
            _F32(scale), scale != np.inf, want_grad, grad, loss, lse, bw)


@njit(nogil=True, cache=True)
def _end(loss, opts, scale, probs, fmt):
    # ``reduced`` is passed, not read off the sizes: with one position a block (one row, or
    # S = 1) the block sums and the per-position losses have the same size.
    _, _, _, mean, reduced, _ = opts
    total = _kdim_total(loss, reduced, scale if mean else 1.0)
    return total, scale, -1, probs, f32_bits(_F32(total), fmt)


@njit(nogil=True, cache=True)
def _kdim_total(loss, reduced, scale):
    """The reduced loss from the kernel's per-block float64 sums: sum, or mean (``scale`` is
    1 / the denominator; 0 * inf when nothing counts gives torch's NaN)."""
    if not reduced:
        return 0.0
    total = 0.0
    for i in range(loss.size):
        total += loss[i]
    return total * scale
