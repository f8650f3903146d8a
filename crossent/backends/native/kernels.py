"""The softmax kernels as C entry points (numba ``cfunc``), for the compiled autograd node.

One forward and one backward per storage dtype, each ``(addresses..., O, C, I, log, threads)``
over the contiguous ``(O, C, I)`` view about ``dim``: the launches of
``numba_softmax.forward_at`` / ``backward_at`` (``_numba_softmax_kernels.forward_call`` /
``backward_call``), with the storage type a module global (a compile-time constant) instead of
an array argument. Written out per dtype, not made in a closure: numba's cache keys a function
by its name and signature, which the three would share.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import cfunc, types

from .._numba_softmax_kernels import backward_call, forward_call

_I64, _B = types.int64, types.boolean
_FWD = types.void(_I64, _I64, _I64, _I64, _I64, _B, _I64)  # xa, oa, O, C, I, log, threads
_BWD = types.void(_I64, _I64, _I64, _I64, _I64, _I64, _B, _I64)  # ga, oa, da, O, C, I, ...
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
