"""Plain float64 cross-entropy, written for reading: the oracle the tests compare against.

It follows the seeds' math directly: log p = x - log(sum(exp(x))), loss = -sum(target * log p),
with torch's rules for weights, ignore_index, reductions and label smoothing. Slow on purpose.
"""
from __future__ import annotations

import torch
from torch import Tensor


def log_softmax(x: Tensor, dim: int) -> Tensor:
    """log p = x - max - log(sum(exp(x - max))) in float64."""
    x = x.double()
    m = x.amax(dim, keepdim=True)
    return x - m - (x - m).exp().sum(dim, keepdim=True).log()


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    """float64 cross-entropy of ``input`` (C,), (N, C) or (N, C, d1..dk), like torch's."""
    x = input.double()
    if x.dim() == 1:  # one sample: add the batch dim
        x, target = x.unsqueeze(0), (target.unsqueeze(0) if target.shape == input.shape else target.reshape(1))
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    n_classes = x.shape[1]
    logp = log_softmax(x, dim=1)  # (N, C, ...)
    lse = torch.logsumexp(x, 1)  # (N, ...)
    shape = [1, n_classes] + [1] * (x.dim() - 2)
    w = torch.ones(n_classes, dtype=torch.float64) if weight is None else weight.double()
    w = w.reshape(shape)  # broadcast along the class dim
    eps = label_smoothing if label_smoothing > 0 else 0.0  # torch ignores <= 0 and NaN

    if target.shape == x.shape:  # class probabilities
        t = target.double() * (1 - eps) + eps / n_classes
        loss = -(logp * t * w).sum(1) + z_loss * lse**2
        if reduction == "mean":
            return loss.sum() / loss.numel()
        return loss.sum() if reduction == "sum" else loss.reshape(_out_shape(input, loss))

    keep = target != ignore_index
    safe = torch.where(keep, target, 0).long()
    w_y = w.flatten()[safe]  # weight of each row's target class, (N, ...)
    nll = -w_y * logp.gather(1, safe.unsqueeze(1)).squeeze(1)  # w_y * (lse - x_y)
    loss = (1 - eps) * nll + z_loss * lse**2
    if eps > 0:  # only then, as torch: a -inf logit makes the smoothing term infinite
        loss = loss - eps * (logp * w).sum(1) / n_classes
    loss = torch.where(keep, loss, 0.0)
    if reduction == "mean":
        return loss.sum() / torch.where(keep, w_y, 0.0).sum()
    return loss.sum() if reduction == "sum" else loss.reshape(_out_shape(input, loss))


def _out_shape(input: Tensor, loss: Tensor) -> tuple[int, ...]:
    return () if input.dim() == 1 else tuple(loss.shape)
