"""nll_loss behind the public function: the numba kernel on CPU, else one gather in plain torch.

Both read the input in place, in its own layout (K-dim input is never moved or copied): only
the ``N * d1 * ... * dk`` picked log-probabilities are read, and the gradient is the sparse
scatter of ``-w_y * g`` into zeros, torch's layout.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import validate as _validate
from .autograd import fast_apply
from ..backends.torch_fused import acc_dtype


def nll_torch(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
              reduction: str) -> Tensor:
    """Any device: ``gather`` along the class dim, differentiable (its backward is the scatter)."""
    acc = acc_dtype(input.dtype)
    class_dim = 0 if input.dim() == 1 else 1
    t = target.reshape(()) if class_dim == 0 else target
    valid = t != ignore_index  # an int64 compare also for uint8 targets
    safe = torch.where(valid, t.long(), 0)
    picked = input.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)  # target's shape
    w_y = valid.to(acc) if weight is None else torch.where(valid, weight.detach().to(acc)[safe], 0)
    loss = torch.where(valid, -(w_y * picked.to(acc)), 0)  # 0, not NaN, at ignored positions
    if reduction == "none":
        return loss.to(input.dtype)
    total = loss.sum()
    # torch divides by the weight sum as it is: 0 gives NaN (or +-inf), negative flips the sign.
    return (total if reduction == "sum" else total / w_y.sum()).to(input.dtype)


@functools.lru_cache(maxsize=None)
def _numba_function():
    """The numba backend's Function (its ``fast_apply``), imported on first use (importing
    crossent loads no numba) and then kept: an import statement in the call path costs a small
    call ~0.5 us."""
    from ..backends.numba_nll import NLLLoss

    return fast_apply(NLLLoss)


def nll(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
        name: str) -> Tensor:
    """nll_loss on backend ``name`` (numba, or the torch gather for every other backend).

    Target values are checked by ``_validate.check_target_values``; on the numba path the kernel
    checks each index as it reads it (one pass instead of the check's five tensor ops, which
    dominate small calls), and the shared check runs to name the offender when it raises.
    """
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if name != "numba":
        _validate.check_target_values(target, n_classes, ignore_index)
        return nll_torch(input, target, weight, ignore_index, reduction)
    apply = _numba_function()
    if not torch.is_grad_enabled():
        input = input.detach()  # no graph, and no buffers kept for a backward
    try:
        loss = apply(input, target, weight, ignore_index, reduction)
    except IndexError:
        _validate.check_target_values(target, n_classes, ignore_index)
        raise
    return loss.reshape(()) if input.dim() == 1 and reduction == "none" else loss
