"""What the numba whole calls share on the host: numpy views of tensors, fresh gradient
buffers, and the one pass over the class indices (range check and "mean" denominator)."""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor

from ._cpu_alloc import HUGE_MIN_BYTES, empty_huge
from ._numba_rows import BF16, F16
from ._numba_views import flat

FORMATS = {torch.float32: 0, torch.bfloat16: BF16, torch.float16: F16}  # storage format codes
EMPTY = np.empty(0, np.float32)  # "unweighted" (size 0, never written)
SMALL = HUGE_MIN_BYTES // 4  # elements below which a buffer is never huge-page backed


@njit(nogil=True, cache=True)
def target_pass(target, w, ignore_index, n_cls):
    """The summed class weight of the counted rows (their count when ``w`` is empty), in float64,
    and the first row whose index is neither in ``[0, C)`` nor ``ignore_index`` (-1 if none).
    Every comparison is in int64, the type the kernels index with (uint8 never wraps -1)."""
    den = 0.0
    has_w = w.size > 0
    for r in range(target.size):
        y = np.int64(target[r])
        if y == ignore_index:
            continue
        if y < 0 or y >= n_cls:
            return den, r
        den += np.float64(w[y]) if has_w else 1.0
    return den, -1


def new_grad_tensor(logits: Tensor) -> Tensor:
    """A fresh gradient buffer of ``logits``' shape, dtype and (dense) layout: torch's own
    allocation when small, huge-page backed when large and contiguous (``empty_huge``)."""
    if logits.numel() < SMALL or not logits.is_contiguous():
        return torch.empty_like(logits)
    return empty_huge(logits.shape, logits.dtype)


# float64 values of at least this magnitude round to float32's inf (its max plus half an ulp)
_F32_OVERFLOW = 3.4028235677973366e38


def f32_scalar(total: float) -> np.ndarray:
    """``total`` as a 0-d float32 array, rounded as numpy rounds, without numpy's "overflow
    encountered in cast" warning: a loss beyond float32's range is inf, as torch's (and a
    warning from numpy would reach the user; under ``-W error`` it would raise)."""
    if abs(total) >= _F32_OVERFLOW:  # (False for NaN, which stays NaN)
        total = math.copysign(math.inf, total)
    return np.array(total, np.float32)


def reduced_loss(total: float, bits: int, dtype: torch.dtype) -> Tensor:
    """The 0-d reduced loss: float32 ``total`` for float32 logits, else the 16-bit ``bits``
    the kernel rounded it to (a cast here would be one more torch op, ~1.5 us)."""
    if dtype == torch.float32:
        return torch.from_numpy(f32_scalar(total))
    return torch.from_numpy(np.array(bits, np.uint16)).view(dtype)


# 0-d templates of the 16-bit loss slots (``loss_slot``)
_SCALAR16 = {dtype: torch.empty((), dtype=dtype) for dtype in (torch.bfloat16, torch.float16)}


def loss_slot(dtype: torch.dtype) -> Tensor | None:
    """A fresh 0-d tensor for a launch to write a 16-bit reduced loss's bits into (at
    ``data_ptr()``; ``put_loss_bits`` in the launch): cheaper than ``reduced_loss``'s numpy round
    trip and view (0.7 against 1.1 us). ``None`` for float32 logits, whose loss comes back as a
    number (``reduced_loss`` is as cheap there)."""
    template = _SCALAR16.get(dtype)
    return None if template is None else torch.empty_like(template)


@njit(nogil=True, cache=True)
def put_loss_bits(oa, bits, bad):
    """Store a 16-bit loss's ``bits`` at address ``oa`` (a ``loss_slot``; 0: none, float32),
    unless the call found a bad target (``bad >= 0``: nothing is written)."""
    if oa != 0 and bad < 0:
        flat(oa, np.empty(0, np.uint16), 1)[0] = bits


def as_array(t: Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor; 16-bit floats as their uint16 bits."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.uint16).numpy()
    return t.numpy()
