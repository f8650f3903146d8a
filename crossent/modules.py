"""nn.Module wrappers: configuration only; the math lives in the functional layer."""
from __future__ import annotations

from torch import Tensor, nn

from .functional import cross_entropy
from .linear import linear_cross_entropy
from ._validate import resolve_reduction


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
        return cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, impl=self.impl, z_loss=self.z_loss,
            softcap=self.softcap, inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, impl={self.impl!r}")


class LinearCrossEntropyLoss(nn.Module):
    r"""Fused ``nn.Linear`` head + cross-entropy: :func:`crossent.linear_cross_entropy` as a Module.

    Holds the options only (the projection ``weight``/``bias`` are passed to ``forward``, as
    they usually belong to the model's ``lm_head``); ``class_weight`` is a buffer.

    Shape:
        - input: ``(N, H)``, ``(B, T, H)`` or ``(H,)`` hidden states; weight ``(V, H)``; bias ``(V,)``.
        - target: class indices of input's leading shape, or probabilities ``(*leading, V)``.
        - output: scalar, or input's leading shape with ``reduction="none"``.

    Examples:
        >>> import torch, crossent
        >>> head = torch.nn.Linear(8, 11)
        >>> loss_fn = crossent.LinearCrossEntropyLoss(label_smoothing=0.1)
        >>> loss_fn(torch.randn(4, 8), head.weight, torch.tensor([1, 3, 0, 10]), head.bias).shape
        torch.Size([])
    """

    def __init__(
        self,
        *,
        class_weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        impl: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = resolve_reduction(None, None, reduction)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.impl = impl
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return linear_cross_entropy(
            input, weight, target, bias, class_weight=self.class_weight,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            impl=self.impl, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, impl={self.impl!r}, chunk_size={self.chunk_size}")
