r"""Vocab-parallel cross-entropy over ``torch.distributed`` (Megatron-style sharded vocabulary).

Each rank of ``group`` holds the logits (or the output-projection rows) of a contiguous slice
of the classes, ``[vocab_start, vocab_start + V_local)``, slices in rank order tiling
``[0, V)``; shards may be uneven (even empty). Every rank gets the loss the full logits would
give with :func:`crossent.cross_entropy`, and the gradient of its own slice.

Communication per call: one all-gather of a small ``(k, N)`` block of per-rank statistics
(local max, sum-exp, target logit, smoothing sums; ``k`` <= 5) plus 4 int64 of layout
information. Megatron's vocab-parallel loss needs three all-reduces. The gradient is made in
forward from the global logsumexp, so backward sends nothing; the fused linear variant adds one
all-reduce of the ``(N, H)`` input gradient. ``vocab_start=None`` costs one more tiny
all-gather (the shard sizes) and a host read per call: pass ``vocab_start`` (from
:func:`vocab_shard_range`, once) to avoid it.

Contract: ``target`` (class indices) and the batch size are identical on every rank. After the
collective every rank checks the layout, the weight length and a checksum of the targets, so
the same error is raised everywhere (never a deadlock): on CPU it names the values, on
accelerators it is a device-side assert (no host sync).

Without an initialised process group and with ``group=None`` the call runs as a single process
(the shard must then be the whole vocabulary), through the same code minus the collective.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ._core import validate as _validate
from ._core import vocab_parallel as vp
from ._core.params import CEParams
from ._core.vocab_parallel_autograd import (
    ReduceGradInput,
    VocabParallelCrossEntropy,
    VocabParallelLinearCrossEntropy,
)
from .backends.torch_fused import acc_dtype
from .linear import auto_chunk_size

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "vocab_shard_range"]


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    *,
    vocab_start: int | None = None,
    group: dist.ProcessGroup | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    r"""Cross-entropy of logits whose class dim is sharded across the ranks of ``group``.

    Returns on every rank what ``crossent.cross_entropy(full_logits, target, weight, ...)``
    returns; the gradient of ``local_logits`` is this rank's slice of the full gradient.

    Args:
        local_logits: ``(V_local,)``, ``(N, V_local)`` or ``(N, V_local, d1, ..., dk)``: classes
            ``[vocab_start, vocab_start + V_local)``.
        target: global class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)``, the same on every
            rank; or this rank's slice of class probabilities, of ``local_logits``' shape.
        vocab_start: first class of this shard; ``None`` derives it from the shard sizes in
            rank order (one extra all-gather and a host read per call).
        group: process group holding the shards; ``None`` is the default group, or a single
            process when no process group is initialised.
        weight: the full ``(V,)`` class weights (same on every rank), ``local_logits``' dtype.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`crossent.cross_entropy` (``V`` is the global class count in every formula).

    Examples:
        >>> import torch
        >>> from crossent.distributed import vocab_parallel_cross_entropy
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])  # one process: all classes
        >>> vocab_parallel_cross_entropy(logits, torch.tensor([0, 2]))
        tensor(0.1755)
    """
    reduction = _validate.resolve_reduction(None, None, reduction)
    _validate.check_options(label_smoothing, z_loss, softcap)
    _validate.check_input(local_logits, "local_logits")
    probs = _validate.target_is_probabilities(local_logits, target, ignore_index)
    _check_weight(weight, local_logits.dtype, local_logits.device)
    n_local = local_logits.shape[0] if local_logits.dim() == 1 else local_logits.shape[1]
    shard = _shard(n_local, vocab_start, group, local_logits.device)
    params = _params(ignore_index, reduction, label_smoothing, z_loss, softcap)
    logits, rows_target, out_shape = _to_rows(local_logits, target, probs)
    w = None if weight is None else weight.detach().to(acc_dtype(local_logits.dtype))
    loss = VocabParallelCrossEntropy.apply(logits, rows_target, w, shard, params)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    dtype = local_logits.dtype
    return loss.to(torch.promote_types(dtype, target.dtype) if probs else dtype)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    local_weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    vocab_start: int | None = None,
    group: dist.ProcessGroup | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Vocab-parallel cross-entropy of ``input @ local_weight.T + bias`` (output layer fused).

    Args:
        input: ``(N, H)`` or ``(*, H)`` hidden states, replicated on every rank.
        local_weight: ``(V_local, H)``, rows ``[vocab_start, vocab_start + V_local)`` of the
            output projection; ``bias``: its ``(V_local,)`` slice, optional.
        target: ``(N,)`` / ``(*)`` global class indices (same on every rank), or ``(*, V_local)``
            local probability slices.
        class_weight: the full ``(V,)`` class weights (``weight`` of
            :func:`vocab_parallel_cross_entropy`, named as in
            :func:`crossent.linear.linear_cross_entropy`, where ``weight`` is the projection).
        chunk_size: rows of logits ``(chunk_size, V_local)`` alive at a time ("mean"/"sum");
            default :func:`crossent.linear.auto_chunk_size`. When the rows need more than one
            chunk the logits are computed twice (statistics, then gradient): 4 matmuls, not 3.
        Other arguments as :func:`vocab_parallel_cross_entropy`.

    For "mean" and "sum" the logits live only during forward: the input, weight and bias
    gradients are made there (weight and bias accumulated in float32 for low precision), and
    the input gradient's all-reduce (SUM over ``group``) starts there and is awaited in
    backward; they are handed to autograd once, so a second backward through the same call
    (``retain_graph=True``) raises. ``reduction="none"`` (and probability targets that require
    grad) take the unfused path: the whole local logits, their gradient kept until backward
    (its per-row upstream gradient is needed first), the input gradient all-reduced there.
    """
    reduction = _validate.resolve_reduction(None, None, reduction)
    _validate.check_options(label_smoothing, z_loss, softcap)
    _validate.check_input(input, "input")
    _validate.check_input(local_weight, "local_weight")
    if input.dim() < 2 or local_weight.dim() != 2 or local_weight.shape[1] != input.shape[-1]:
        raise RuntimeError(
            f"input {tuple(input.shape)} must be (*, H) and local_weight (V_local, H), got "
            f"local_weight {tuple(local_weight.shape)}"
        )
    n_local = local_weight.shape[0]
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if local_weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        raise RuntimeError(
            f"input, local_weight and bias must share a dtype, got {input.dtype}, "
            f"{local_weight.dtype}, {None if bias is None else bias.dtype}"
        )
    if bias is not None and tuple(bias.shape) != (n_local,):
        raise RuntimeError(f"bias must be (V_local,) = ({n_local},), got {tuple(bias.shape)}")
    lead = tuple(input.shape[:-1])
    rows = input.reshape(-1, input.shape[-1])  # (R, H)
    # A stand-in of the local logits' shape (no memory) for the target checks.
    proxy = torch.empty((), dtype=input.dtype, device=input.device).expand(rows.shape[0], n_local)
    if not isinstance(target, Tensor) or tuple(target.shape) not in (lead, (*lead, n_local)):
        raise RuntimeError(
            f"target must be class indices of shape {lead} or local class probabilities of shape "
            f"{(*lead, n_local)} for input {tuple(input.shape)} and local_weight "
            f"{tuple(local_weight.shape)}, got {getattr(target, 'shape', type(target).__name__)}"
        )
    probs = tuple(target.shape) != lead
    rows_target = target.reshape(rows.shape[0], n_local) if probs else target.reshape(-1)
    _validate.target_is_probabilities(proxy, rows_target, ignore_index)  # dtype checks
    _check_weight(class_weight, input.dtype, input.device)
    shard = _shard(n_local, vocab_start, group, input.device)
    params = _params(ignore_index, reduction, label_smoothing, z_loss, softcap)
    w = None if class_weight is None else class_weight.detach().to(acc_dtype(input.dtype))
    if not probs:
        rows_target = rows_target.long()
    if reduction != "none" and not (probs and target.requires_grad):
        chunk = chunk_size or auto_chunk_size(rows.shape[0], rows.shape[1], n_local, rows.device,
                                               rows.dtype)
        loss = VocabParallelLinearCrossEntropy.apply(
            rows, local_weight, bias, rows_target, w, shard, params, chunk)
    else:
        if shard.distributed and torch.is_grad_enabled() and rows.requires_grad:
            rows = ReduceGradInput.apply(rows, shard.group)
        logits = torch.nn.functional.linear(rows, local_weight, bias)  # (R, V_local)
        loss = VocabParallelCrossEntropy.apply(logits, rows_target, w, shard, params)
        if reduction == "none":
            loss = loss.reshape(lead)
    return loss.to(torch.promote_types(input.dtype, target.dtype) if probs else input.dtype)


def vocab_shard_range(
    local_size: int, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"
) -> tuple[int, int]:
    """``(vocab_start, vocab_size)`` of this rank's shard, from every rank's ``local_size``.

    One all-gather (on ``device``: a CUDA device for NCCL) and a host read: call it once and
    pass ``vocab_start`` to the losses. A single process gets ``(0, local_size)``.
    """
    return vp.shard_layout(local_size, group, _is_distributed(group), torch.device(device))


def _to_rows(input: Tensor, target: Tensor, probs: bool) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Class dim last, flattened: logits ``(R, V_local)``, target ``(R,)`` or ``(R, V_local)``.

    Like ``functional.to_rows``, with explicit row counts so an empty shard (V_local = 0) works.
    """
    if input.dim() == 1:
        out_shape: tuple[int, ...] = ()
        logits, t = input.unsqueeze(0), target.unsqueeze(0) if probs else target  # (1, V_local)
    else:
        out_shape = (input.shape[0], *input.shape[2:])
        logits, t = input.movedim(1, -1), target.movedim(1, -1) if probs else target
    n_rows, n_local = math.prod(out_shape), logits.shape[-1]
    logits = logits.reshape(n_rows, n_local).contiguous()  # (R, V_local)
    t = t.reshape(n_rows, n_local) if probs else t.reshape(n_rows).long()  # (R, V_local) or (R,)
    return logits, t, out_shape


def _is_distributed(group) -> bool:
    return group is not None or (dist.is_available() and dist.is_initialized())


def _shard(n_local: int, vocab_start: int | None, group, device: torch.device) -> vp.Shard:
    distributed = _is_distributed(group)
    if vocab_start is None:
        start, vocab = vp.shard_layout(n_local, group, distributed, device)
        return vp.Shard(start, n_local, group, distributed, vocab)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int or None, got {vocab_start!r}")
    return vp.Shard(vocab_start, n_local, group, distributed)


def _params(ignore_index, reduction, label_smoothing, z_loss, softcap) -> CEParams:
    return CEParams(ignore_index=ignore_index, reduction=reduction,
                    label_smoothing=float(label_smoothing), z_loss=float(z_loss), softcap=softcap)


def _check_weight(weight: Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
    """Shape-independent checks; the length (= V) is checked after the collective."""
    if weight is None:
        return
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        raise RuntimeError(
            f"weight must be the full 1-D (V,) class-weight tensor, got "
            f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}"
        )
    if weight.dtype != dtype or weight.device != device:
        raise RuntimeError(
            f"weight has dtype {weight.dtype} on {weight.device} but the logits are {dtype} on "
            f"{device}: pass weight.to(logits)"
        )
    _validate.check_weight_grad(weight, "vocab_parallel_cross_entropy")
