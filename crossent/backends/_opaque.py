"""Kernels that ``torch.compile`` cannot trace (numba, Triton's launcher) as ``torch.library`` ops.

Dynamo sees one opaque op with a fake implementation giving the output shapes, so a compiled
graph calls the same fast kernel as eager code instead of breaking the graph or falling back.

Two ops per backend, because a custom op's outputs may not alias its inputs and an op declared
as mutating an input makes the compiler keep that input's old value alive (a copy) where it
cannot prove otherwise: ``<name>_ce_forward`` returns a fresh gradient, and
``<name>_ce_forward_inplace`` writes it over ``logits`` (declared mutated) and returns an empty
one, which :func:`opaque_kernel` turns back into ``logits``.

Eager calls skip the op (the dispatcher adds ~10-20 us a call, most of a small batch's time).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._core.autograd import Kernel
from .._core.params import CEParams
from .torch_fused import acc_dtype

HAS_CUSTOM_OP = hasattr(torch.library, "custom_op")  # torch >= 2.4


def _fake(logits: Tensor, grad_scale: Optional[Tensor], inplace: bool, loss_dtype):
    n_rows, acc = logits.shape[0], acc_dtype(logits.dtype)
    fresh = grad_scale is not None and not inplace
    grad = torch.empty_like(logits) if fresh else logits.new_empty(0)
    return (logits.new_empty(n_rows, dtype=loss_dtype or acc), logits.new_empty(n_rows, dtype=acc),
            grad)


def opaque_kernel(name: str, kernel: Kernel, loss_dtype: torch.dtype | None = None) -> Kernel:
    """``kernel`` (the backend contract of ``crossent.backends``), run through the custom ops
    ``crossent::<name>_ce_forward[_inplace]`` while ``torch.compile`` traces, directly otherwise.
    ``loss_dtype``: the dtype of its per-row losses (``None``: the accumulation dtype). Without
    ``torch.library.custom_op`` (torch < 2.4) ``kernel`` itself, eager only."""
    if not HAS_CUSTOM_OP:
        return kernel

    def make(inplace: bool):
        def impl(
            logits: Tensor,
            target: Tensor,
            weight: Optional[Tensor],
            grad_scale: Optional[Tensor],
            ignore_index: int,
            label_smoothing: float,
            z_loss: float,
            softcap: Optional[float],
        ) -> tuple[Tensor, Tensor, Tensor]:
            params = CEParams(ignore_index=ignore_index, label_smoothing=label_smoothing,
                              z_loss=z_loss, softcap=softcap, inplace_backward=inplace)
            loss, lse, grad = kernel(logits, target, weight, grad_scale, params)
            if grad is None or inplace:
                grad = logits.new_empty(0)  # in place: the gradient is in ``logits``
            return loss, lse, grad

        suffix = "_inplace" if inplace else ""
        op = torch.library.custom_op(
            f"crossent::{name}_ce_forward{suffix}", mutates_args=("logits",) if inplace else ()
        )(impl)
        op.register_fake(
            lambda logits, target, weight, grad_scale, *_: _fake(logits, grad_scale, inplace,
                                                                 loss_dtype)
        )
        return op

    ops = {False: make(False), True: make(True)}

    def ce_forward(
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        grad_scale: Tensor | None,
        params: CEParams,
        stats: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if not torch.compiler.is_compiling():
            return kernel(logits, target, weight, grad_scale, params, stats=stats)
        inplace = params.inplace_backward and grad_scale is not None
        loss, lse, grad = ops[inplace](
            logits, target, weight, grad_scale, params.ignore_index, params.label_smoothing,
            params.z_loss, params.softcap,
        )
        if grad_scale is None:
            return loss, lse, None
        return loss, lse, logits if inplace else grad

    ce_forward.__doc__ = kernel.__doc__
    return ce_forward
