"""Numba CPU kernels of nll_loss: a gather of ``-w_y * input[y]`` and its sparse gradient.

The input is read in place as ``(N, C, I)`` (``I`` the product of the extra dims, any strides):
only the ``N * I`` picked log-probabilities are touched. The gradient is the scatter of
``-w_y * g`` into a zeroed buffer, torch's layout. The kernels check every index themselves, so
they cannot read or write outside a row whatever validation ran before.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor

from . import _omp_team
from . import _numba_threads
from ._numba_threads import _split_rows, parallel_min
from ._numba_views import cube, flat, rows, strided3
from ._omp_team import team_launch
from ._numba_softmax_kernels import f32, put
from ._numba_host import f32_scalar
from .numba_softmax import LIKE, as_array, empty
from .torch_fused import nll_loss


# error_model="numpy": a zero weight sum divides to inf/NaN as in torch, instead of raising.
@njit(nogil=True, cache=True, error_model="numpy")
def _nll_forward(x, t, w, ignore_index, loss):
    """Per-position loss into ``loss (N, I)`` (size 0: not stored, for a reduced loss); returns
    (sum of losses, sum of picked weights, their quotient, the first out-of-range target's flat
    position or -1: the kernel stops there, and the caller raises). Products and sums are
    float64, so float32 terms are exact before the final rounding."""
    n_cls = x.shape[1]
    has_w = w.size > 0
    store = loss.size > 0
    total = 0.0
    w_sum = 0.0
    for a in range(t.shape[0]):
        for b in range(t.shape[1]):
            y = np.int64(t[a, b])  # int64 compare: a uint8 target never equals a negative index
            if y == ignore_index:
                if store:
                    loss[a, b] = 0.0
                continue
            if y < 0 or y >= n_cls:
                return total, w_sum, np.nan, a * t.shape[1] + b
            w_y = w[y] if has_w else 1.0
            value = -(w_y * f32(x[a, y, b]))  # -0 * inf is NaN, as torch's
            if store:
                loss[a, b] = value
            total += value
            w_sum += w_y
    return total, w_sum, total / w_sum, -1


@njit(nogil=True, cache=True, error_model="numpy")
def _nll_backward(t, w, ignore_index, g, g_total, w_sum, mean, grad, lo, hi):
    """Rows ``lo:hi`` of the gradient ``(N, C, I)``: zeros, then ``grad[a, y, b] = -w_y * g[a, b]``
    at every kept position ("none"); for a reduced loss ``-w_y * g_total`` ("sum") or
    ``-w_y * (g_total / w_sum)`` ("mean", torch's order: a zero weight sum gives NaN for zero
    weights and +-inf otherwise)."""
    k = g_total / w_sum if mean else g_total
    n_cls, n_in = grad.shape[1], grad.shape[2]
    has_w = w.size > 0
    per_position = g.size > 0
    for a in range(lo, hi):
        flat = grad[a].reshape(n_cls * n_in)  # (C * I,) view: zero bits are 0.0 in every format
        for j in range(flat.size):
            flat[j] = 0
        for b in range(n_in):
            y = np.int64(t[a, b])
            if y == ignore_index or y < 0 or y >= n_cls:
                continue
            w_y = w[y] if has_w else 1.0
            scale = f32(g[a, b]) if per_position else k
            put(grad[a, :, b], y, -(w_y * scale))


# One launch per call over arrays made from the tensors' addresses (``_numba_views``): the
# input ``(N, C, I)`` at its own strides, the target ``(N, I)`` and the outputs contiguous.
@njit(nogil=True, cache=True, error_model="numpy")
def _forward_call(xa, like, dims, strides, ta, tlike, w, ignore_index, la, lacc, store):
    x = strided3(xa, like, dims, strides)
    t = rows(ta, tlike, dims[0], dims[2])
    loss = rows(la, lacc, dims[0] if store else 0, dims[2] if store else 0)
    return _nll_forward(x, t, w, ignore_index, loss)


@njit(nogil=True, cache=True, error_model="numpy")
def _backward_call(ta, tlike, w, ignore_index, pa, plike, per_position, g_total, w_sum, mean, da,
                   like, dims, threads):
    n, n_cls, n_in = dims
    t = rows(ta, tlike, n, n_in)
    per = rows(pa, plike, n if per_position else 0, n_in if per_position else 0)
    args = (t, w, ignore_index, per, g_total, w_sum, mean, cube(da, like, n, n_cls, n_in))
    if threads > 1:
        team_launch(_nll_backward, args, n, min(threads, n))
    else:
        _nll_backward(*args, 0, n)


# The compiled node's launches (``native.kernels``; C entries cannot raise): the reduced loss
# of ``(N, C)`` input at element strides ``(s0, s1)`` and ``(N,)`` int64 targets, unweighted,
# stored at ``oa`` in the input's format; the first bad target's position (-1: none) and the
# count of kept rows into the float64 pair at ``ra``. Backward: the ``(N, C)`` gradient of the
# upstream ``g`` at ``da``.
_I64S, _F64S = np.empty(0, np.int64), np.empty(0, np.float64)
_UNWEIGHTED, _F32S = np.empty(0, np.float32), np.empty(0, np.float32)


@njit(nogil=True, cache=True, error_model="numpy")
def node_forward(xa, like, n, n_cls, s0, s1, ta, ignore_index, mean, oa, ra):
    total, w_sum, quotient, bad = _forward_call(xa, like, (n, n_cls, 1), (s0, s1, 0), ta, _I64S,
                                                _UNWEIGHTED, ignore_index, 0, _F32S, False)
    result = flat(ra, _F64S, 2)
    result[0], result[1] = bad, w_sum
    if bad < 0:
        put(flat(oa, like, 1), 0, quotient if mean else total)


@njit(nogil=True, cache=True, error_model="numpy")
def node_backward(ta, ignore_index, g, w_sum, mean, da, like, n, n_cls, threads):
    _backward_call(ta, _I64S, _UNWEIGHTED, ignore_index, 0, _F32S, False, g, w_sum, mean, da,
                   like, (n, n_cls, 1), threads)


def _layout(t: Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """``t`` ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` as ``(N, C, I)`` with element
    strides, without a copy; ``None`` when the extra dims do not merge into one stride (then
    the caller copies)."""
    shape, st = t.shape, t.stride()
    if len(shape) == 1:
        return (1, shape[0], 1), (0, st[0], 0)
    if len(shape) == 2:
        return (shape[0], shape[1], 1), (st[0], st[1], 0)
    if t.numel() == 0:  # nothing is read (and an empty tensor's strides need not merge)
        return (shape[0], shape[1], math.prod(shape[2:])), (0, 0, 0)
    n_in, step = 1, 0
    for d, s in zip(reversed(shape[2:]), reversed(st[2:])):  # innermost first
        if d == 1:
            continue  # a size-1 dim is never stepped over
        if n_in == 1:
            n_in, step = d, s
        elif s == n_in * step:
            n_in *= d
        else:
            return None
    return (shape[0], shape[1], n_in), (st[0], st[1], step)


# Stand-ins for "unweighted" (size 0, never read), made once: per-call allocations are a
# visible share of a small call's time.
_NONE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def _weights(weight: Tensor | None, acc: torch.dtype) -> np.ndarray:
    """The class weights as an ``acc`` array; size 0 means unweighted."""
    if weight is None:
        return _NONE[acc]
    return weight.detach().to(acc).contiguous().numpy()


class NLLLoss(torch.autograd.Function):
    """nll_loss with the numba kernels: forward gathers, backward scatters into zeros."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                reduction: str) -> Tensor:
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        layout = _layout(input)
        if layout is None:  # extra dims that no single stride walks: read a dense copy
            input = input.contiguous()
            layout = _layout(input)
        dims, strides = layout
        if not target.is_contiguous():
            target = target.contiguous()
        w = _weights(weight, acc)
        loss = torch.empty(target.shape, dtype=acc) if reduction == "none" else None  # (N, ...)
        total, w_sum, mean, bad = _forward_call(
            input.data_ptr(), LIKE[input.dtype], dims, strides, target.data_ptr(),
            LIKE[target.dtype], w, ignore_index, 0 if loss is None else loss.data_ptr(),
            LIKE[acc], loss is not None)
        _check(bad)
        ctx.save_for_backward(target, input)  # (input: see ``_in_graph``; torch saves it too)
        # one attribute, not seven: each costs a small call a tenth of a microsecond
        ctx.state = (w, w_sum, ignore_index, reduction, input.shape, input.dtype, dims)
        if reduction == "none":
            return loss.to(input.dtype)
        return _scalar(total if reduction == "sum" else mean, input.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        target, input = ctx.saved_tensors
        w, w_sum, ignore_index, reduction, shape, dtype, dims = ctx.state
        grad = _grad(target, w, ignore_index, reduction, g, w_sum, shape, dtype, dims)
        return _in_graph(grad, input), None, None, None, None


class NLLLossLane(torch.autograd.Function):
    """``(log-probabilities (N, C), target (N,), plan, their addresses, dims, strides) -> 0-d
    loss``: ``NLLLoss`` for ``crossent._core.nll.lane``'s calls (CPU, eager, unweighted,
    "mean"/"sum"), which pass what they read of the tensors: each torch call costs a small
    call more than the kernel. ``plan`` is ``(storage type, target type, ignore_index,
    reduction, dtype)``."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, plan: tuple, xa: int, ta: int,
                dims: tuple[int, int, int], strides: tuple[int, int, int]) -> Tensor:
        like, tlike, ignore_index, reduction, dtype = plan
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        total, w_sum, mean, bad = _forward_call(xa, like, dims, strides, ta, tlike, _NONE[acc],
                                                ignore_index, 0, LIKE[acc], False)
        _check(bad)
        # (the target's address is kept too: the version check guards it; input: _in_graph)
        ctx.save_for_backward(target, input)
        ctx.state = (plan, ta, w_sum, dims)
        return _scalar(total if reduction == "sum" else mean, dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        target, input = ctx.saved_tensors
        (like, tlike, ignore_index, reduction, dtype), ta, w_sum, dims = ctx.state
        w = _NONE[torch.float64 if dtype == torch.float64 else torch.float32]
        if dims[0] * dims[1] >= _numba_threads.PARALLEL_MIN or g.requires_grad:  # (_grad)
            grad = _grad(target, w, ignore_index, reduction, g, w_sum, dims[:2], dtype, dims)
        else:  # one thread, the addresses known: a (64, 10) call pays per torch call
            grad = torch.empty(dims[0], dims[1], dtype=dtype)
            _backward_call(ta, tlike, w, ignore_index, 0, like, False, float(g), w_sum,
                           reduction == "mean", grad.data_ptr(), like, dims, 1)
        return _in_graph(grad, input), None, None, None, None, None, None


def _check(bad: int) -> None:
    """The kernel's verdict on the targets (callers name the offender, ``_core.nll``)."""
    if bad >= 0:
        raise IndexError("nll_loss: a target class index is out of range [0, C)")


_FALSE = torch.zeros((), dtype=torch.bool)


def _in_graph(grad: Tensor, input: Tensor) -> Tensor:
    """Under ``create_graph=True``: the gradient also as a function of ``input``, whose
    derivative there is 0 (nll_loss is linear in it), as torch's (its gradient requires grad
    and a second derivative gives zeros; without this one raised "does not require grad").
    ``where`` rather than ``+ 0 * input``: log-probabilities of -inf would make NaN."""
    if torch.is_grad_enabled() and input.requires_grad:
        return torch.where(_FALSE, input, grad)
    return grad


def _scalar(value: float, dtype: torch.dtype) -> Tensor:
    """A 0-d loss of ``dtype``."""
    if dtype == torch.float32:  # numpy-made 0-d: a third of torch.full's cost
        return torch.from_numpy(f32_scalar(value))
    return torch.full((), value, dtype=dtype)


def _grad(target: Tensor, w: np.ndarray, ignore_index: int, reduction: str, g: Tensor,
          w_sum: float, shape: tuple[int, ...], dtype: torch.dtype, dims: tuple[int, int, int]
          ) -> Tensor:
    """The input's gradient for the upstream ``g``: ``-w_y * g`` at each target, zeros
    elsewhere."""
    if g.requires_grad and torch.is_grad_enabled():
        return _differentiable_grad(target, w, ignore_index, reduction, g, shape, dtype)
    # torch's layout: dense, zeros off-target, zeroed by the kernel (large buffers huge-page
    # backed: cheaper page faults)
    grad = empty(shape, dtype)
    per_position = reduction == "none"
    if per_position:
        g = g.contiguous()
        g_total = 0.0
    else:
        g_total = float(g)
    numel = dims[0] * dims[1] * dims[2]
    threads = 1 if numel < parallel_min() else (
        torch.get_num_threads() if _omp_team.usable() else 0)
    mean = reduction == "mean"
    if threads:
        _backward_call(target.data_ptr(), LIKE[target.dtype], w, ignore_index, g.data_ptr(),
                       LIKE[g.dtype], per_position, g_total, w_sum, mean, grad.data_ptr(),
                       LIKE[dtype], dims, threads)
    else:  # no OpenMP team (no libgomp, a forked child): the Python pool, numpy views
        n, n_cls, n_in = dims
        per = (as_array(g).reshape(n, n_in) if per_position
               else _NONE[torch.float32].reshape(0, 0))
        args = (as_array(target).reshape(n, n_in), w, ignore_index, per, g_total, w_sum, mean,
                as_array(grad).reshape(n, n_cls, n_in))
        _split_rows(_nll_backward, args, n, min(torch.get_num_threads(), n))
    return grad


def _differentiable_grad(target: Tensor, w: np.ndarray, ignore_index: int, reduction: str,
                         g: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``_grad`` as a function of ``g`` that autograd can differentiate, for a backward under
    ``create_graph=True`` whose upstream gradient itself requires grad (a double-backward
    Jacobian-vector product): nll_loss is linear in its input, so its gradient is the torch
    gather's gradient at any input, here zeros; the kernels' result would carry no graph."""
    weight = torch.from_numpy(w) if w.size else None
    point = torch.zeros(shape, dtype=dtype, requires_grad=True)
    loss = nll_loss(point, target, weight, ignore_index, reduction)
    return torch.autograd.grad(loss, point, g, create_graph=True)[0]
