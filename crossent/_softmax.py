"""Softmax and log-softmax over any dim, as autograd.Functions that save only their output."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor


def softmax_dim(name: str, ndim: int, dim: int | None) -> int:
    """torch's rule for ``dim=None`` (deprecated there too): 0 for 0-, 1- and 3-d input, else 1."""
    if dim is not None:
        return dim
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=3,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _acc(x: Tensor) -> Tensor:
    # Half-precision inputs are computed in float32 and rounded once at the end.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class LogSoftmax(torch.autograd.Function):
    """``log_softmax(x)_i = x_i - logsumexp(x)`` along ``dim``; backward ``g - softmax * sum(g)``."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        xa = _acc(x)
        out = (xa - torch.logsumexp(xa, dim, keepdim=True)).to(x.dtype)
        ctx.dim = dim
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (out,) = ctx.saved_tensors
        ga = _acc(g)
        grad = ga - _acc(out).exp() * ga.sum(ctx.dim, keepdim=True)
        return grad.to(g.dtype), None


class Softmax(torch.autograd.Function):
    """``softmax(x)_i = exp(x_i - max) / sum exp(x - max)``; backward ``p * (g - sum(g * p))``."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        xa = _acc(x)
        out = (xa - torch.logsumexp(xa, dim, keepdim=True)).exp_().to(x.dtype)
        ctx.dim = dim
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (out,) = ctx.saved_tensors
        p, ga = _acc(out), _acc(g)
        grad = p * (ga - (ga * p).sum(ctx.dim, keepdim=True))
        return grad.to(g.dtype), None
