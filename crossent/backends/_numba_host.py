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


def new_grad(logits: Tensor, x: np.ndarray) -> tuple[Tensor, np.ndarray]:
    """A fresh gradient of ``logits``' shape and dtype (contiguous) and its numpy view (``x``
    is ``logits``' own view, giving the storage type): numpy-made when small (cheaper than
    ``torch.empty`` and ``.numpy()``), huge-page backed when large (``empty_huge``)."""
    if x.nbytes < HUGE_MIN_BYTES:
        out = np.empty(x.shape, x.dtype)
        grad = torch.from_numpy(out)
        if logits.dtype != torch.float32:
            grad = grad.view(logits.dtype)  # 16-bit gradients travel as their uint16 bits
        return grad, out
    grad = empty_huge(logits.shape, logits.dtype)
    return grad, as_array(grad)


def as_array(t: Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor; 16-bit floats as their uint16 bits."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.uint16).numpy()
    return t.numpy()
