"""The cross-entropy family in elementary torch ops, for calls under functorch transforms.

``torch.func.vmap``, ``grad``, ``jacrev``, ``jvp``, ``hessian`` (per-sample gradients,
functional training loops) cannot run crossent's kernels: those read raw memory, and a batched
or dual tensor has none of its own. Under a transform the public functions compute here
instead, from ``amax``/``exp``/``sum``/``log``/``gather``: every transform and every order of
derivative then follows from torch's rules for those ops, never from torch's loss kernels.

Same semantics as the kernels (weights, ``ignore_index``, label smoothing, ``z_loss``,
``softcap``, probability targets, reductions), computed in float32 (float64 for float64 input)
and rounded once. The row max is detached: ``m + log sum exp(x - m)`` does not depend on ``m``,
so its derivatives are exact at every order without the max's own gradient. This path holds
the ``(N, C)`` intermediates a composite needs; the kernels' memory savings apply only outside
transforms.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from . import validate as _validate
from .dispatch import stats_sink
from ..backends.torch_fused import acc_dtype


def active() -> bool:
    """Whether a functorch transform (vmap, grad, jvp, ...) is running this call, or forward-mode
    AD (``torch.autograd.forward_ad``: inside a dual level, tensors may carry tangents that only
    torch's ops propagate)."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def check_targets(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """torch's IndexError for an index out of range, where the values can be read: not under
    vmap (a batched target has no single value to test; the gather raises there, as torch's)."""
    if not _batched(target):
        _validate.check_target_values(target, n_classes, ignore_index)


def _batched(t: Tensor) -> bool:
    """Whether any functorch level wraps ``t`` in a vmap batch (vmap(grad(f)) wraps the batched
    target once more, for grad)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _shifted(x: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(x - m, m, log sum exp(x - m))`` along ``dim`` (kept), with the max ``m`` detached."""
    m = x.amax(dim, keepdim=True).detach()
    z = x - m
    return z, m, z.exp().sum(dim, keepdim=True).log()


def log_softmax(input: Tensor, dim: int, log: bool) -> Tensor:
    """log_softmax (``log``) or softmax of ``input`` along ``dim``, in its dtype."""
    if input.numel() == 0:
        return input * 0  # (amax rejects an empty dim) still part of the graph
    z, _, log_s = _shifted(input.to(acc_dtype(input.dtype)), dim)
    return (z - log_s if log else (z - log_s).exp()).to(input.dtype)


def cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: float | None, probs: bool,
) -> tuple[Tensor, Tensor]:
    """``(loss, lse)`` of ``input`` ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (checked by
    the caller); ``lse`` (accumulation dtype, index shape) carries no gradient."""
    if input.dim() == 1:  # one row: no step on 0-d tensors, where a Python number times a
        # 0-d tensor gets a float64 tangent under torch.func.jvp
        loss, lse = cross_entropy(input[None], target[None] if probs else target.reshape(1),
                                  weight, ignore_index, reduction, label_smoothing, z_loss,
                                  softcap, probs)
        return (loss[0] if reduction == "none" else loss), lse[0]
    acc = acc_dtype(input.dtype)
    n_classes = input.shape[1]
    x = input.to(acc)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    z, m, log_s = _shifted(x, 1)
    logp = z - log_s  # (N, C, ...)
    lse = (m + log_s).squeeze(1)  # (N, ...)
    eps = label_smoothing if label_smoothing > 0 else 0.0  # torch ignores <= 0 and NaN
    w = None if weight is None else weight.detach().to(acc)
    w_c = None if w is None else w.reshape([1, n_classes] + [1] * (x.dim() - 2))  # along dim 1
    if probs:
        t = target.to(acc)
        if eps > 0:
            t = t * (1 - eps) + eps / n_classes
        loss = -(logp * t if w is None else logp * t * w_c).sum(1)
        if z_loss > 0:
            loss = loss + z_loss * lse * lse
        if reduction == "mean":
            loss = loss.mean()  # over rows, not weights, as torch (no rows: NaN)
        out_dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
        return _reduced(loss, reduction).to(out_dtype), lse.detach()
    check_targets(target, n_classes, ignore_index)
    t = target.long()  # in int64: as uint8, ignore_index -100 would equal class 156
    valid = t != ignore_index
    safe = torch.where(valid, t, 0)
    picked = logp.gather(1, safe.unsqueeze(1)).squeeze(1)  # log p_y, (N, ...)
    w_y = valid.to(acc) if w is None else torch.where(valid, w[safe], 0.0)
    loss = -(1 - eps) * w_y * picked
    if eps > 0:  # as torch: only then, since a -inf logit makes this term infinite
        loss = loss - (eps / n_classes) * (logp if w is None else logp * w_c).sum(1)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)  # 0, not NaN, at ignored positions
    sink = stats_sink.get()
    if sink is not None:  # crossent.cross_entropy_with_stats: the kernels' per-row numbers
        part = torch.stack([lse, (x.argmax(1) == t).to(acc), torch.ones_like(lse),
                            torch.special.entr(logp.exp()).sum(1)]).detach()  # (4, N, ...)
        sink.add(torch.where(valid, part, 0.0).flatten(1).sum(1, dtype=torch.float32))
    if reduction == "mean":
        loss = loss.sum() / w_y.sum()  # torch's: 0 gives NaN, a negative sum flips the sign
    return _reduced(loss, reduction).to(input.dtype), lse.detach()


def _reduced(loss: Tensor, reduction: str) -> Tensor:
    return loss.sum() if reduction == "sum" else loss  # "mean" was divided by the caller
