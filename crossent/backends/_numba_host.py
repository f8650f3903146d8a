"""What the numba whole calls share on the host: numpy views of tensors, fresh gradient
buffers, and the one pass over the class indices (range check and "mean" denominator)."""
from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

from ._cpu_alloc import HUGE_MIN_BYTES, empty_huge
from ._numba_rows import BF16, F16

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


def reduced_loss(total: float, bits: int, dtype: torch.dtype) -> Tensor:
    """The 0-d reduced loss: float32 ``total`` for float32 logits, else the 16-bit ``bits``
    the kernel rounded it to (a cast here would be one more torch op, ~1.5 us)."""
    if dtype == torch.float32:
        return torch.from_numpy(np.array(total, np.float32))
    return torch.from_numpy(np.array(bits, np.uint16)).view(dtype)


def as_array(t: Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor; 16-bit floats as their uint16 bits."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.uint16).numpy()
    return t.numpy()
