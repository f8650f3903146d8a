"""``torch.library`` registration of the Triton launch, so ``torch.compile`` sees one opaque op.

Dynamo cannot trace the launcher itself (host-side heuristics, and under ``TRITON_INTERPRET=1``
Triton's interpreter), so the launch is a ``custom_op`` with a fake (meta) implementation
giving the output shapes. ``torch.library.triton_op`` would also let Inductor see inside, but
its body must be traceable, which the interpreter is not, and the kernel is one memory-bound
launch that gains nothing from fusion.

Custom-op outputs may not alias inputs: with ``inplace_backward`` the op writes the gradient
into ``logits`` (declared mutated) and returns an empty ``grad``; ``ce_forward`` then hands back
``logits`` as the gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .launch import launch_ce_forward

_HAS_CUSTOM_OP = hasattr(torch.library, "custom_op")  # torch >= 2.4


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ce_forward_impl(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    grad_scale: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss (R,), lse (R,), grad)``; ``grad`` is ``(R, C)``, or empty when there is no
    gradient or it was written into ``logits``."""
    n_rows = logits.shape[0]
    acc = _acc(logits.dtype)
    loss = torch.empty(n_rows, dtype=acc, device=logits.device)  # (R,)
    lse = torch.empty(n_rows, dtype=acc, device=logits.device)  # (R,)
    grad = logits.new_empty(0)
    if grad_scale is not None and not inplace_backward:
        grad = torch.empty_like(logits)  # (R, C)
    launch_ce_forward(
        logits, target, weight, grad_scale,
        None if grad_scale is None else (logits if inplace_backward else grad),
        loss, lse, ignore_index, label_smoothing, z_loss, softcap,
    )
    return loss, lse, grad


if _HAS_CUSTOM_OP:
    ce_forward_op = torch.library.custom_op(
        "crossent::triton_ce_forward", mutates_args=("logits",)
    )(_ce_forward_impl)

    @ce_forward_op.register_fake
    def _(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
          inplace_backward):
        n_rows = logits.shape[0]
        acc = _acc(logits.dtype)
        grad = logits.new_empty(0)
        if grad_scale is not None and not inplace_backward:
            grad = torch.empty_like(logits)
        return logits.new_empty(n_rows, dtype=acc), logits.new_empty(n_rows, dtype=acc), grad
else:
    ce_forward_op = _ce_forward_impl  # older torch: eager only
