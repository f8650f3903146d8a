"""The whole-call contract (``crossent.backends``) composed from a backend's two parts.

``index_target_sums`` checks the targets and sums the counted weights, ``ce_forward`` makes the
per-row loss and the gradient already scaled for the reduction, and plain torch reduces the rows
(no host sync: on accelerators the range check is a device-side assert and the scale stays a
device tensor). Backends with a fused single pass (numba) use this for the cases it skips.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._core.params import CEParams
from . import TargetOutOfBounds
from .torch_fused import acc_dtype

Call = Callable[[Tensor, Tensor, "Tensor | None", bool, CEParams],
                tuple[Tensor, Tensor, "Tensor | None", "Tensor | float", None]]


def reduced(ce_forward: Callable, index_target_sums: Callable) -> Call:
    """The ``cross_entropy`` of the backend contract, from ``ce_forward`` and ``index_target_sums``."""

    def cross_entropy(
        logits: Tensor, target: Tensor, weight: Tensor | None, want_grad: bool, params: CEParams
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, None]:
        """The composed whole call; it does not probe (the last item is always None)."""
        if logits.dim() == 3:
            # K-dimensional (N, C, S): this backend reads rows, so the class dim goes last (a
            # copy); the gradient is handed back as a view in the caller's layout.
            n, n_classes, n_in = logits.shape
            # detach: where the layouts coincide (S = 1 or C = 1) this is a view of the logits,
            # which an in-place gradient may then overwrite outside autograd's view tracking.
            rows = logits.detach().movedim(1, 2).reshape(-1, n_classes).contiguous()  # (N*S, C)
            loss, lse, grad, scale, _ = cross_entropy(rows, target, weight, want_grad, params)
            if grad is not None:
                grad = grad.view(n, n_in, n_classes).movedim(2, 1)  # (N, C, S)
            return loss, lse, grad, scale, None
        denominator, scale = mean_terms(target, weight, params, logits.shape[1],
                                        acc_dtype(logits.dtype), index_target_sums)
        loss, lse, grad = ce_forward(logits, target, weight, scale if want_grad else None, params)
        # Reduced in the rows' dtype (float64 but on Triton), returned in the accumulation dtype.
        if params.reduction == "sum":
            loss = loss.sum()
        elif params.reduction == "mean":
            loss = loss.sum() / denominator
        return loss.to(lse.dtype), lse, grad, scale, None

    return cross_entropy


def mean_terms(
    target: Tensor, weight: Tensor | None, params: CEParams, n_classes: int,
    acc: torch.dtype, index_target_sums: Callable, checked: bool = False,
) -> tuple[Tensor | None, Tensor]:
    """The denominator of "mean" (``None`` otherwise) and the gradient scale the kernels fold
    in: ``1 / denominator`` for "mean", else 1. Class indices are range-checked on the way
    (``TargetOutOfBounds``) unless the caller ``checked`` them, in which case "sum" and "none"
    read no target at all; probability targets average over rows.

    1 / 0 = inf when nothing counts: the loss is 0/0 = NaN, ignored rows keep a zero gradient,
    and counted rows of weight sum 0 get torch's inf / NaN (the kernels scale per term).
    """
    if checked and params.reduction != "mean":
        return None, torch.ones((), dtype=acc, device=target.device)
    if target.is_floating_point():
        denominator = torch.tensor(float(target.shape[0]), dtype=acc, device=target.device)
    else:
        denominator, bad = index_target_sums(target, weight, params.ignore_index, n_classes, acc)
        if bad >= 0:
            raise TargetOutOfBounds(bad)
    if params.reduction != "mean":
        return None, torch.ones((), dtype=acc, device=target.device)
    return denominator, 1 / denominator
