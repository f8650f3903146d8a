"""The kernels of the compiled nodes as C entry points (numba ``cfunc``).

Softmax: one forward and one backward per storage dtype, each ``(addresses..., O, C, I, log,
threads)`` over the contiguous ``(O, C, I)`` view about ``dim``: the launches of
``numba_softmax.forward_at`` / ``backward_at`` (``_numba_softmax_kernels.forward_call`` /
``backward_call``). Cross-entropy: the launches of ``numba_cpu.lane_launch`` (few-class rows
side by side, or the row kernel), one thread, with the loss written at an address and the
target check's and misuse probe's verdicts in a two-value result buffer; ``threads`` as the
launch's. nll_loss: ``numba_nll.node_forward`` / ``node_backward`` (reduced, unweighted, int64
targets, input at any strides).

The storage type is a module global (a compile-time constant) instead of an array argument.
Written out per dtype, not made in a closure: numba's cache keys a function by its name and
signature, which they would share.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import cfunc, njit, types

from .._numba_host import _F32_OVERFLOW, BF16, F16
from .._numba_kdim_call import lane_rows_call
from .._numba_softmax_kernels import backward_call, forward_call
from .._numba_views import flat
from ..numba_cpu import _plain_call
from ..numba_nll import node_backward, node_forward

_I64, _B = types.int64, types.boolean
_FWD = types.void(_I64, _I64, _I64, _I64, _I64, _B, _I64)  # xa, oa, O, C, I, log, threads
_BWD = types.void(_I64, _I64, _I64, _I64, _I64, _I64, _B, _I64)  # ga, oa, da, O, C, I, ...
_I64S = np.empty(0, np.int64)
_F32 = np.empty(0, np.float32)
_BF16 = np.empty(0, np.uint16)  # bfloat16 bits
_F16 = np.empty(0, np.int16)  # float16 bits


@cfunc(_FWD, nopython=True, nogil=True, cache=True)
def _fwd_f32(xa, oa, n_out, n_cls, n_in, log, threads):
    forward_call(xa, oa, _F32, n_out, n_cls, n_in, log, threads)


@cfunc(_BWD, nopython=True, nogil=True, cache=True)
def _bwd_f32(ga, oa, da, n_out, n_cls, n_in, log, threads):
    backward_call(ga, oa, da, _F32, n_out, n_cls, n_in, log, threads)


@cfunc(_FWD, nopython=True, nogil=True, cache=True)
def _fwd_bf16(xa, oa, n_out, n_cls, n_in, log, threads):
    forward_call(xa, oa, _BF16, n_out, n_cls, n_in, log, threads)


@cfunc(_BWD, nopython=True, nogil=True, cache=True)
def _bwd_bf16(ga, oa, da, n_out, n_cls, n_in, log, threads):
    backward_call(ga, oa, da, _BF16, n_out, n_cls, n_in, log, threads)


@cfunc(_FWD, nopython=True, nogil=True, cache=True)
def _fwd_f16(xa, oa, n_out, n_cls, n_in, log, threads):
    forward_call(xa, oa, _F16, n_out, n_cls, n_in, log, threads)


@cfunc(_BWD, nopython=True, nogil=True, cache=True)
def _bwd_f16(ga, oa, da, n_out, n_cls, n_in, log, threads):
    backward_call(ga, oa, da, _F16, n_out, n_cls, n_in, log, threads)


def entries() -> dict[torch.dtype, tuple[int, int]]:
    """dtype -> (forward, backward) C addresses, for the dtypes the softmax lane runs."""
    return {torch.float32: (_fwd_f32.address, _bwd_f32.address),
            torch.bfloat16: (_fwd_bf16.address, _bwd_bf16.address),
            torch.float16: (_fwd_f16.address, _bwd_f16.address)}


# xa, n_rows, n_cls, ta, ignore_index, eps, z_loss, mean, probe_tol, want_grad, ga, oa, ra,
# threads (of torch's OpenMP team)
_CE = types.void(_I64, _I64, _I64, _I64, _I64, types.float64, types.float64, _B, types.float64,
                 _B, _I64, _I64, _I64, _I64)


@njit(nogil=True, cache=True)
def _finish(out, oa, ra, f32):
    """The verdicts at ``ra`` (first bad row or -1, probe), and a float32 loss at ``oa`` rounded
    as ``_numba_host.f32_scalar`` rounds it (16-bit losses the launch wrote itself)."""
    total, bad, probs = out[0], out[2], out[3]
    result = flat(ra, _I64S, 2)
    result[0], result[1] = bad, 1 if probs else 0
    if f32 and bad < 0:
        if abs(total) >= _F32_OVERFLOW:  # (False for NaN)
            total = np.inf if total > 0 else -np.inf
        flat(oa, _F32, 1)[0] = np.float32(total)


@cfunc(_CE, nopython=True, nogil=True, cache=True)
def _ce_rows_f32(xa, n_rows, n_cls, ta, ignore, eps, z, mean, tol, want_grad, ga, oa, ra, threads):
    out = _plain_call(xa, _F32, n_rows, n_cls, 0, ta, (ignore, eps, z, mean, True, tol), 0.0,
                      want_grad, ga, 0, threads)
    _finish(out, oa, ra, True)


@cfunc(_CE, nopython=True, nogil=True, cache=True)
def _ce_rows_bf16(xa, n_rows, n_cls, ta, ignore, eps, z, mean, tol, want_grad, ga, oa, ra, threads):
    out = _plain_call(xa, _BF16, n_rows, n_cls, BF16, ta, (ignore, eps, z, mean, True, tol), 0.0,
                      want_grad, ga, oa, threads)
    _finish(out, oa, ra, False)


@cfunc(_CE, nopython=True, nogil=True, cache=True)
def _ce_rows_f16(xa, n_rows, n_cls, ta, ignore, eps, z, mean, tol, want_grad, ga, oa, ra, threads):
    out = _plain_call(xa, _F16, n_rows, n_cls, F16, ta, (ignore, eps, z, mean, True, tol), 0.0,
                      want_grad, ga, oa, threads)
    _finish(out, oa, ra, False)


@cfunc(_CE, nopython=True, nogil=True, cache=True)
def _ce_few_f32(xa, n_rows, n_cls, ta, ignore, eps, z, mean, tol, want_grad, ga, oa, ra, threads):
    out = lane_rows_call(xa, _F32, n_rows, n_cls, 0, ta, _I64S,
                         (ignore, eps, z, mean, True, tol), want_grad, ga, 0, threads)
    _finish(out, oa, ra, True)


@cfunc(_CE, nopython=True, nogil=True, cache=True)
def _ce_few_bf16(xa, n_rows, n_cls, ta, ignore, eps, z, mean, tol, want_grad, ga, oa, ra, threads):
    out = lane_rows_call(xa, _BF16, n_rows, n_cls, BF16, ta, _I64S,
                         (ignore, eps, z, mean, True, tol), want_grad, ga, oa, threads)
    _finish(out, oa, ra, False)


@cfunc(_CE, nopython=True, nogil=True, cache=True)
def _ce_few_f16(xa, n_rows, n_cls, ta, ignore, eps, z, mean, tol, want_grad, ga, oa, ra, threads):
    out = lane_rows_call(xa, _F16, n_rows, n_cls, F16, ta, _I64S,
                         (ignore, eps, z, mean, True, tol), want_grad, ga, oa, threads)
    _finish(out, oa, ra, False)


def ce_entries() -> dict[tuple[torch.dtype, bool], int]:
    """(dtype, few classes) -> the cross-entropy launch's C address (no softcap)."""
    return {(torch.float32, False): _ce_rows_f32.address,
            (torch.bfloat16, False): _ce_rows_bf16.address,
            (torch.float16, False): _ce_rows_f16.address,
            (torch.float32, True): _ce_few_f32.address,
            (torch.bfloat16, True): _ce_few_bf16.address,
            (torch.float16, True): _ce_few_f16.address}


# xa, n_rows, n_cls, s0, s1 (element strides), ta, ignore_index, mean, oa (loss), ra (verdicts)
_NLL_FWD = types.void(_I64, _I64, _I64, _I64, _I64, _I64, _I64, _B, _I64, _I64)
# ta, ignore_index, upstream, kept-row weight, mean, da (gradient), n_rows, n_cls, threads
_NLL_BWD = types.void(_I64, _I64, types.float64, types.float64, _B, _I64, _I64, _I64, _I64)


@cfunc(_NLL_FWD, nopython=True, nogil=True, cache=True)
def _nll_fwd_f32(xa, n_rows, n_cls, s0, s1, ta, ignore, mean, oa, ra):
    node_forward(xa, _F32, n_rows, n_cls, s0, s1, ta, ignore, mean, oa, ra)


@cfunc(_NLL_BWD, nopython=True, nogil=True, cache=True)
def _nll_bwd_f32(ta, ignore, g, w_sum, mean, da, n_rows, n_cls, threads):
    node_backward(ta, ignore, g, w_sum, mean, da, _F32, n_rows, n_cls, threads)


@cfunc(_NLL_FWD, nopython=True, nogil=True, cache=True)
def _nll_fwd_bf16(xa, n_rows, n_cls, s0, s1, ta, ignore, mean, oa, ra):
    node_forward(xa, _BF16, n_rows, n_cls, s0, s1, ta, ignore, mean, oa, ra)


@cfunc(_NLL_BWD, nopython=True, nogil=True, cache=True)
def _nll_bwd_bf16(ta, ignore, g, w_sum, mean, da, n_rows, n_cls, threads):
    node_backward(ta, ignore, g, w_sum, mean, da, _BF16, n_rows, n_cls, threads)


@cfunc(_NLL_FWD, nopython=True, nogil=True, cache=True)
def _nll_fwd_f16(xa, n_rows, n_cls, s0, s1, ta, ignore, mean, oa, ra):
    node_forward(xa, _F16, n_rows, n_cls, s0, s1, ta, ignore, mean, oa, ra)


@cfunc(_NLL_BWD, nopython=True, nogil=True, cache=True)
def _nll_bwd_f16(ta, ignore, g, w_sum, mean, da, n_rows, n_cls, threads):
    node_backward(ta, ignore, g, w_sum, mean, da, _F16, n_rows, n_cls, threads)


def nll_entries() -> dict[torch.dtype, tuple[int, int]]:
    """dtype -> nll_loss's (forward, backward) C addresses."""
    return {torch.float32: (_nll_fwd_f32.address, _nll_bwd_f32.address),
            torch.bfloat16: (_nll_fwd_bf16.address, _nll_bwd_bf16.address),
            torch.float16: (_nll_fwd_f16.address, _nll_bwd_f16.address)}
