"""nn.Module wrappers: configuration only; the math lives in :mod:`crossent.functional`."""
from __future__ import annotations

from torch import Tensor, nn

from . import functional as F
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
        return F.cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, impl=self.impl, z_loss=self.z_loss,
            softcap=self.softcap, inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, impl={self.impl!r}")
