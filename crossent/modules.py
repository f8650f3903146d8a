"""nn.Module wrappers: configuration only; the math lives in the functional layer."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import cross_entropy
from .linear import linear_cross_entropy
from ._core import lane as _lane
from ._core.params import REDUCTIONS
from ._core.validate import ignore_index_arg, resolve_reduction


class CrossEntropyLoss(nn.Module):
    r"""Drop-in for ``torch.nn.CrossEntropyLoss``, computed by crossent's fused kernels.

    Args: as :func:`crossent.cross_entropy`; ``weight`` is stored as a buffer, so it follows
    ``.to(device)`` and ``state_dict()`` like torch's.

    Shape:
        - input: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` logits.
        - target: indices ``()``, ``(N,)``, ``(N, d1, ..., dk)`` or probabilities of the input's shape.
        - output: scalar, or the index shape with ``reduction="none"``.

    Examples:
        >>> import torch, crossent
        >>> loss_fn = crossent.CrossEntropyLoss(label_smoothing=0.1)
        >>> loss_fn(torch.zeros(2, 4), torch.tensor([1, 3]))
        tensor(1.3863)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        impl: str = "auto",
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = resolve_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.impl = impl
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        # The common call straight to its lane (``crossent._core.lane``), as the functional
        # layer would send it: its ten keyword arguments cost a small call ~1 us, twice that in
        # a training loop's cold caches (measured, the seeds' loop).
        ignore_index = ignore_index_arg(self.ignore_index)  # (an attribute: set at any time)
        if (self._buffers["weight"] is None and not self.inplace_backward
                and self.reduction in REDUCTIONS):
            loss = _lane.cross_entropy(input, target, ignore_index, self.reduction,
                                       self.label_smoothing, self.z_loss, self.softcap, self.impl)
            if loss is not None:
                return loss
        return cross_entropy(
            input, target, self.weight, ignore_index=ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, impl=self.impl, z_loss=self.z_loss,
            softcap=self.softcap, inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, impl={self.impl!r}")


class LinearCrossEntropyLoss(nn.Module):
    r"""Drop-in for torch 2.13's ``torch.nn.LinearCrossEntropyLoss``: a linear head that owns its
    projection (``self.linear``, an ``nn.Linear(in_features, num_classes * prod(out_features))``)
    and whose forward returns :func:`crossent.linear_cross_entropy` of it, never all logits.

    The parameters and buffers are named as torch's (``linear.weight``, ``linear.bias``,
    ``weight``), so ``load_state_dict`` takes a torch module's ``state_dict()``. For a
    projection owned elsewhere (a model's ``lm_head``), call :func:`crossent.linear_cross_entropy`.

    Args:
        in_features: ``H``, the size of each input sample.
        num_classes: ``C``.
        out_features: ``(d1, ..., dK)`` for a K-dimensional loss; default ``()``.
        bias: whether ``self.linear`` has a bias; default ``False``.
        device, dtype: of ``self.linear``'s parameters.
        reduction, weight, ignore_index, label_smoothing, options: as
            :func:`crossent.linear_cross_entropy`; ``weight`` ``(C,)`` is a buffer.
        z_loss, softcap, logit_scale, impl, chunk_size: crossent's extras, as
            :func:`crossent.linear_cross_entropy`.

    Shape:
        - input: ``(H,)``, ``(N, H)`` or ``(*leading, H)`` (``(N, H)`` with ``out_features``).
        - target: indices ``()``, ``(N,)``, ``(*leading,)`` or ``(N, *out_features)``; or
          probabilities ``(C,)``, ``(N, C)``, ``(*leading, C)`` or ``(N, C, *out_features)``.
        - output: scalar, or the index shape with ``reduction="none"``.

    Examples:
        >>> import torch, crossent
        >>> loss_fn = crossent.LinearCrossEntropyLoss(8, 11, bias=True, label_smoothing=0.1)
        >>> loss = loss_fn(torch.randn(4, 8), torch.tensor([1, 3, 0, 10]))
        >>> loss.backward()
        >>> loss_fn.linear.weight.grad.shape
        torch.Size([11, 8])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: "torch.nn.LinearCrossEntropyOptions | None" = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float | None = None,
        impl: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise RuntimeError(
                f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}: "
                f"weight is the per-class loss weight; the projection is self.linear"
            )
        if not 0.0 <= label_smoothing <= 1.0:
            raise RuntimeError(
                f"expected label_smoothing to be in range [0, 1], got {label_smoothing}"
            )
        super().__init__()
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.reduction = resolve_reduction(None, None, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.impl = impl
        self.chunk_size = chunk_size
        # nn.Linear holds 2-D weights: (C * D, H), reshaped to (C, *out_features, H) in forward.
        self.linear = nn.Linear(
            in_features, math.prod(self.out_features, start=num_classes), bias=bias,
            device=device, dtype=dtype,
        )

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        linear_weight = self.linear.weight.reshape(
            (self.num_classes, *self.out_features, self.linear.in_features)
        )
        bias = self.linear.bias
        linear_bias = None if bias is None else bias.reshape((self.num_classes, *self.out_features))
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, options=self.options, z_loss=self.z_loss,
            softcap=self.softcap, logit_scale=self.logit_scale, impl=self.impl,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, logit_scale={self.logit_scale}, "
                f"impl={self.impl!r}, chunk_size={self.chunk_size}")
