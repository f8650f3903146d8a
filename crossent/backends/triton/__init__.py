"""Triton backend: one fused kernel per row computes loss, lse and the gradient in one launch.

Runs on CUDA tensors, and on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``
set before Triton is imported; slow, for tests). See ``crossent.backends`` for the contract;
``kernels.py`` holds the kernel, ``launch.py`` the grid and block sizes, ``ops.py`` the
``torch.library`` registration used under ``torch.compile``.
"""
from __future__ import annotations

from torch import Tensor

from ..._params import CEParams
from .ops import ce_forward_op

__all__ = ["ce_forward"]


def ce_forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    grad_scale: Tensor | None,
    params: CEParams,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row loss ``(R,)``, lse ``(R,)`` and, if ``grad_scale`` is given, the gradient ``(R, C)``.

    ``grad_scale`` is read by the kernel from device memory (no host sync). With
    ``params.inplace_backward`` the gradient overwrites ``logits`` and is returned as ``logits``.
    """
    if logits.stride(1) != 1:
        if params.inplace_backward and grad_scale is not None:
            raise ValueError("inplace_backward needs logits with a unit class stride")
        logits = logits.contiguous()
    if target.dim() == 2 and target.stride(1) != 1:
        target = target.contiguous()  # (R, C) probabilities, read row by row
    loss, lse, grad = ce_forward_op(
        logits, target, weight, grad_scale, params.ignore_index, params.label_smoothing,
        params.z_loss, params.softcap, params.inplace_backward,
    )
    if grad_scale is None:
        return loss, lse, None
    return loss, lse, logits if params.inplace_backward else grad
