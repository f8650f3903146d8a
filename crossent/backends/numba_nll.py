"""Numba CPU kernels of nll_loss: a gather of ``-w_y * input[y]`` and its sparse gradient.

The input is read in place as ``(N, C, I)`` (``I`` the product of the extra dims, any strides):
only the ``N * I`` picked log-probabilities are touched. The gradient is the scatter of
``-w_y * g`` into a zeroed buffer, torch's layout. The kernels check every index themselves, so
they cannot read or write outside a row whatever validation ran before.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

from ._numba_threads import _split_rows, threads
from ._omp_team import team_launch
from .numba_softmax import as_array, empty, f32, put


# error_model="numpy": a zero weight sum divides to inf/NaN as in torch, instead of raising.
@njit(nogil=True, cache=True, error_model="numpy")
def _nll_forward(x, t, w, ignore_index, loss):
    """Per-position loss into ``loss (N, I)`` (size 0: not stored, for a reduced loss); returns
    (sum of losses, sum of picked weights, their quotient). Products and sums are float64, so
    float32 terms are exact before the final rounding."""
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
                raise IndexError("nll_loss: a target class index is out of range [0, C)")
            w_y = w[y] if has_w else 1.0
            value = -(w_y * f32(x[a, y, b]))  # -0 * inf is NaN, as torch's
            if store:
                loss[a, b] = value
            total += value
            w_sum += w_y
    return total, w_sum, total / w_sum


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


@njit(nogil=True, cache=True)
def _nll_backward_team(n_rows, threads, *args):
    """``_nll_backward`` on torch's OpenMP team (``_omp_team``)."""
    team_launch(_nll_backward, args, n_rows, threads)


def _views(input: Tensor, target: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``input`` as an ``(N, C, I)`` array (a view whenever strides allow) and ``target`` as
    ``(N, I)``; numpy reshapes, which cost a fraction of torch's on small calls."""
    x, t = as_array(input), as_array(target)
    if x.ndim == 1:
        return x.reshape(1, -1, 1), t.reshape(1, 1)
    return x.reshape(x.shape[0], x.shape[1], -1), t.reshape(x.shape[0], -1)


# Stand-ins for "unweighted" and "not stored" (size 0, never written), made once: per-call
# allocations are a visible share of a small call's time.
_NONE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}
_NO_LOSS = {acc: a.reshape(0, 0) for acc, a in _NONE.items()}


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
        x3, t2 = _views(input, target)  # (N, C, I), (N, I)
        w = _weights(weight, acc)
        loss = torch.empty(t2.shape, dtype=acc) if reduction == "none" else None  # (N, I)
        total, w_sum, mean = _nll_forward(x3, t2, w, ignore_index,
                                          _NO_LOSS[acc] if loss is None else loss.numpy())
        ctx.save_for_backward(target)
        ctx.w, ctx.w_sum, ctx.ignore_index, ctx.reduction = w, w_sum, ignore_index, reduction
        ctx.shape, ctx.dtype = input.shape, input.dtype
        if reduction == "none":
            return loss.reshape(target.shape).to(input.dtype)
        value = total if reduction == "sum" else mean
        if input.dtype == torch.float32:  # numpy-made 0-d: a third of torch.full's cost
            return torch.from_numpy(np.array(value, np.float32))
        return torch.full((), value, dtype=input.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        (target,) = ctx.saved_tensors
        # torch's layout: dense, zeros off-target, zeroed by the kernel (large buffers huge-page
        # backed: cheaper page faults)
        grad = empty(ctx.shape, ctx.dtype)
        g3, t2 = _views(grad, target)  # (N, C, I), (N, I)
        if ctx.reduction == "none":
            per, g_total = as_array(g).reshape(t2.shape), 0.0
        else:
            per, g_total = _NO_LOSS[torch.float32], float(g)
        n_rows = g3.shape[0]
        args = (t2, ctx.w, ctx.ignore_index, per, g_total, ctx.w_sum, ctx.reduction == "mean", g3)
        _split_rows(_nll_backward, args, n_rows, threads(grad.numel(), n_rows), _nll_backward_team)
        return grad, None, None, None, None

