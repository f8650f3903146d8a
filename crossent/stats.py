"""Token statistics from the loss's own pass: ``*_with_stats(...) -> (loss, TokenStats)``.

Training scripts log token accuracy and predictive entropy beside the loss; computed the usual
way (``logits.argmax(-1)``, ``softmax * log_softmax``) they need the ``(N, V)`` logits again,
which the fused and linear losses never keep. Here every backend's kernel, asked for them,
fills two more numbers per row in the pass that reads the logits anyway: whether the row's
first argmax is its target, and its entropy. This module sums them over counted rows.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._core.autograd import Kernel
from ._core.dispatch import stats_sink
from ._core.params import CEParams
from .backends.torch_fused import acc_dtype

__all__ = ["TokenStats", "cross_entropy_with_stats", "linear_cross_entropy_with_stats"]


class TokenStats(NamedTuple):
    """Sums over the counted rows (target not ``ignore_index``), 0-d float32 tensors.

    Sums, not means, so that ranks and micro-batches combine by adding:
    ``TokenStats(*dist.all_reduce(torch.stack(stats)))`` (one collective), then read the means.
    None carries a gradient.
    """

    lse_sum: Tensor  # sum of logsumexp(logits) (after softcap)
    correct: Tensor  # rows whose first argmax is the target (torch.argmax's tie rule)
    count: Tensor  # counted rows
    entropy_sum: Tensor  # sum of -sum_c p_c log p_c

    @property
    def accuracy(self) -> Tensor:
        """Share of counted rows predicted right (NaN when none is counted)."""
        return self.correct / self.count

    @property
    def mean_entropy(self) -> Tensor:
        """Mean predictive entropy in nats (NaN when no row is counted)."""
        return self.entropy_sum / self.count


class _Sink:
    """Collects the statistics of the kernel calls of one public call, then closes: the
    linear loss with ``reduction="none"`` runs its kernel again in backward."""

    def __init__(self) -> None:
        self.total: Tensor | None = None  # (4,) float32
        self.open = True

    def wrap(self, kernel: Kernel) -> Kernel:
        def with_stats(logits: Tensor, target: Tensor, weight: Tensor | None,
                       grad_scale: Tensor | None, params: CEParams):
            if not self.open:
                return kernel(logits, target, weight, grad_scale, params)
            rows = torch.empty((logits.shape[0], 2), dtype=acc_dtype(logits.dtype),
                               device=logits.device)  # (r, 2): correct, entropy
            loss, lse, grad = kernel(logits, target, weight, grad_scale, params, stats=rows)
            valid = (target != params.ignore_index).unsqueeze(1)  # (r, 1)
            part = torch.stack([lse, rows[:, 0], torch.ones_like(lse), rows[:, 1]], 1)  # (r, 4)
            # where, not multiply: ignored rows may hold NaN (the linear loss skips them).
            self.add(torch.where(valid, part, 0).sum(0, dtype=torch.float32))
            return loss, lse, grad

        return with_stats

    def add(self, part: Tensor) -> None:
        """Add ``(lse_sum, correct, count, entropy_sum)`` (4,) float32 of some rows (also
        the composite path's, under torch.func transforms)."""
        self.total = part if self.total is None else self.total + part

    def result(self, device: torch.device) -> TokenStats:
        self.open = False
        total = self.total if self.total is not None else torch.zeros(4, device=device)
        return TokenStats(*total.unbind())


def _collect(fn: Any, input: Tensor, target: Tensor, *args: Any, **kwargs: Any):
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "crossent's *_with_stats functions run eagerly only: call them outside "
            "torch.compile, or use the functions without statistics there"
        )
    if not isinstance(target, Tensor) or target.is_floating_point():
        raise ValueError(
            "token statistics need class-index targets (int64); probability targets have no "
            "single right class: use the function without statistics"
        )
    sink = _Sink()
    token = stats_sink.set(sink)
    try:
        loss = fn(input, target, *args, **kwargs)
    finally:
        stats_sink.reset(token)
    return loss, sink.result(input.device)


def cross_entropy_with_stats(input: Tensor, target: Tensor, *args: Any, **kwargs: Any
                             ) -> tuple[Tensor, TokenStats]:
    r"""Like :func:`crossent.cross_entropy` (same arguments), also returning :class:`TokenStats`.

    The statistics come from the kernel's single pass over the logits and carry no gradient.

    Args: as :func:`crossent.cross_entropy`; ``target`` must hold class indices.

    Shape: ``loss`` as :func:`crossent.cross_entropy`; each statistic is a 0-d float32 tensor.

    Examples:
        >>> import torch, crossent
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [0.0, 1.0, 0.0]])
        >>> loss, stats = crossent.cross_entropy_with_stats(logits, torch.tensor([0, 2, -100]))
        >>> stats.correct, stats.count
        (tensor(2.), tensor(2.))
    """
    from .functional import cross_entropy

    return _collect(cross_entropy, input, target, *args, **kwargs)


def linear_cross_entropy_with_stats(input: Tensor, linear_weight: Tensor, target: Tensor,
                                    **kwargs: Any) -> tuple[Tensor, TokenStats]:
    r"""Like :func:`crossent.linear_cross_entropy` (same arguments), also returning
    :class:`TokenStats` of the logits ``input @ linear_weight.T + linear_bias`` it never holds.

    Args: as :func:`crossent.linear_cross_entropy`; ``target`` must hold class indices.

    Shape: ``loss`` as :func:`crossent.linear_cross_entropy`; statistics 0-d float32 tensors.

    Examples:
        >>> import torch, crossent
        >>> x, w = torch.randn(6, 8), torch.randn(11, 8)
        >>> loss, stats = crossent.linear_cross_entropy_with_stats(x, w, torch.randint(0, 11, (6,)))
        >>> stats.count
        tensor(6.)
    """
    from .linear import linear_cross_entropy

    def call(x: Tensor, t: Tensor, **kw: Any) -> Tensor:
        return linear_cross_entropy(x, linear_weight, t, **kw)

    return _collect(call, input, target, **kwargs)
