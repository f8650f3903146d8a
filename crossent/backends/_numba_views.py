"""Arrays over tensors' memory, made inside numba-compiled code from the tensors' addresses.

A numpy view of a tensor made in Python costs 0.6-0.9 us (``t.detach().numpy()``) and numba
unboxes each array argument again; a small call has three of them (logits, target, gradient),
a fifth of a (8, 10) forward. ``t.data_ptr()`` costs 0.06 us, and the view made from it in
machine code costs nothing. The host passes the address together with the shape (and strides)
torch reports for the same tensor, in elements, and keeps the tensor alive for the call, so a
view covers exactly the tensor's own elements: the only way to get these wrong is to pass
numbers that do not come from the tensor, which the callers never do.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import carray, njit, types
from numba.extending import intrinsic

# Element type of a tensor's storage as numba sees it, by a 0-size array of that type (numba
# specialises on it): 16-bit floats as their uint16 bits (``_numba_rows`` converts them).
LIKE = {
    torch.float32: np.empty(0, np.float32),
    torch.bfloat16: np.empty(0, np.uint16),
    torch.float16: np.empty(0, np.uint16),
    torch.int64: np.empty(0, np.int64),
    torch.uint8: np.empty(0, np.uint8),
}


@intrinsic
def _pointer(typingctx, addr, like):
    """``addr`` (an integer) as a pointer to ``like``'s element type."""
    if not isinstance(addr, types.Integer) or not isinstance(like, types.Array):
        return None
    ptr_t = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_t))

    return ptr_t(addr, like), codegen


@njit(inline="always")
def flat(addr, like, n):
    """The ``(n,)`` contiguous array at ``addr``."""
    return carray(_pointer(addr, like), (n,))


@njit(inline="always")
def rows(addr, like, n, c):
    """The ``(n, c)`` C-contiguous array at ``addr``."""
    return carray(_pointer(addr, like), (n, c))


@njit(inline="always")
def strided3(addr, like, shape, strides):
    """The 3-d array at ``addr`` of ``shape`` whose steps are ``strides`` elements (e.g. the
    ``(1, C, R)`` transpose of ``(R, C)`` rows: strides ``(R * C, 1, C)``)."""
    item = like.itemsize
    return np.lib.stride_tricks.as_strided(
        carray(_pointer(addr, like), (1,)), shape=shape,
        strides=(strides[0] * item, strides[1] * item, strides[2] * item))


@njit(inline="always")
def cube(addr, like, a, b, c):
    """The ``(a, b, c)`` C-contiguous array at ``addr``."""
    return carray(_pointer(addr, like), (a, b, c))
