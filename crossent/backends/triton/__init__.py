"""Triton backend: one fused kernel per row computes loss, lse and the gradient in one launch.

Runs on CUDA tensors, and on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``
set before Triton is imported; slow, for tests). See ``crossent.backends`` for the contract;
``kernels.py`` holds the kernel, ``launch.py`` the grid and block sizes. Under ``torch.compile``
the launch is an opaque ``torch.library`` op (``crossent.backends._opaque``): Dynamo cannot
trace the launcher (host-side heuristics, the interpreter), and the kernel is one memory-bound
launch that gains nothing from fusion.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._core.params import CEParams
from .._opaque import opaque_kernel
from ..torch_fused import acc_dtype, index_target_sums
from .._reduced import reduced
from .launch import launch_ce_forward

__all__ = ["ce_forward", "cross_entropy", "index_target_sums"]


def _ce_forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    grad_scale: Tensor | None,
    params: CEParams,
    stats: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row loss ``(R,)``, lse ``(R,)`` and, if ``grad_scale`` is given, the gradient ``(R, C)``.

    ``logits`` may have any row stride (a slice ``wide[:, :C]`` is read where it lies). A fresh
    gradient is contiguous; with ``params.inplace_backward`` it overwrites ``logits`` at their
    stride and is returned as ``logits``. ``grad_scale`` is read by the kernel from device
    memory (no host sync).
    """
    if logits.stride(1) != 1 and logits.shape[1] > 1 and logits.shape[0] > 0:  # a real stride
        if params.inplace_backward and grad_scale is not None:
            raise ValueError("inplace_backward needs logits with a unit class stride")
        logits = logits.contiguous()
    if target.dim() == 2 and target.stride(1) != 1:
        target = target.contiguous()  # (R, C) probabilities, read row by row
    acc = acc_dtype(logits.dtype)
    loss = torch.empty(logits.shape[0], dtype=acc, device=logits.device)  # (R,)
    lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)  # (R,)
    grad = None
    if grad_scale is not None:
        # (R, C); not empty_like, which would copy a strided layout that is not dense
        grad = logits if params.inplace_backward else torch.empty(
            logits.shape, dtype=logits.dtype, device=logits.device)
    launch_ce_forward(
        logits, target, weight, grad_scale, grad, loss, lse, params.ignore_index,
        params.label_smoothing, params.z_loss, params.softcap, stats,
    )
    return loss, lse, grad


ce_forward = opaque_kernel("triton", _ce_forward)  # a custom op under torch.compile
cross_entropy = reduced(ce_forward, index_target_sums)  # the whole call, composed
