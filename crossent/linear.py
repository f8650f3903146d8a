"""Fused linear + cross-entropy, torch 2.13's ``F.linear_cross_entropy`` API:
``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without ever holding the
``(N, V)`` logits: rows go through in chunks of a bounded size.

Shapes: ``N`` rows (all leading dims of ``input`` flattened), ``H`` features, ``V`` (= ``C``)
classes; a K-dimensional ``linear_weight (C, d1, ..., dK, H)`` adds ``D = d1 * ... * dK``
positions per row, each with its own ``(C, H)`` projection.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.overrides import handle_torch_function

from ._core import composite as _composite
from ._core import validate as _validate
from ._core.autograd import fast_apply
from ._core.dispatch import observed, resolve_backend
from ._core.linear_autograd import SKIP_IGNORED_ON, LinearCrossEntropyFunction, whole_call_fits
from ._core.linear_checks import (
    check_logit_scale, check_options_for_call, check_tensors, resolve_options,
    target_is_probabilities,
)
from ._core.params import CEParams
from .backends import TargetOutOfBounds, torch_fused
from .backends._reduced import mean_terms
from .backends.torch_fused import acc_dtype

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_lse", "auto_chunk_size"]

_LINEAR_APPLY = fast_apply(LinearCrossEntropyFunction)  # its apply without the Python prologue

# Bytes of one chunk's logits on CPU. Each chunk streams W once and reads/writes the (V, H)
# weight gradient (12*V*H bytes against 6*r*V*H flops), and BLAS runs its r-row products
# slower as r shrinks: below ~256 rows a chunk costs 10-25 % more than its share of the three
# bare products on the 2-core AVX-512 box whatever H and V are (BENCHMARKS.md, "Linear
# cross-entropy"), so the budget gives way to that floor.
_CHUNK_BYTES = {"cpu": 64 << 20}
# Accelerators: 1 GiB of logits, so N = 4096 rows of a 128256 vocabulary in bf16 are one
# chunk: one product per gradient and, for bf16/fp16, no (V, H) float32 weight-gradient buffer
# (more than one chunk needs one to sum the partials in). Larger N is chunked.
_DEFAULT_CHUNK_BYTES = 1 << 30
_MIN_ROWS = 256


def auto_chunk_size(
    n_rows: int, n_features: int, n_classes: int, device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Rows per chunk: as many as fit the device's budget of ``dtype`` logits, but at least
    ``_MIN_ROWS`` (matmul efficiency) and at most ``n_rows``. ``n_features`` does not enter: a
    chunk's matmul work and its weight traffic both scale with it."""
    budget = _CHUNK_BYTES.get(device.type, _DEFAULT_CHUNK_BYTES)
    rows = max(_MIN_ROWS, budget // (dtype.itemsize * max(1, n_classes)))
    rows -= rows % 16  # whole SIMD/BLAS panels
    return max(1, min(n_rows, rows))


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: "torch.nn.LinearCrossEntropyOptions | None" = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Cross-entropy of linearly projected inputs, a drop-in for torch 2.13's
    ``torch.nn.functional.linear_cross_entropy`` that never holds all logits.

    .. math::
        z = s \cdot (x W^\top + b), \qquad
        \ell = \mathrm{cross\_entropy}(c \tanh(z / c), y)

    with ``s = logit_scale`` (1 when ``None``) and the softcap ``c`` (none when ``None``); with
    neither this is ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``.
    At most ``chunk_size`` rows of logits exist at a time; the gradients of ``input``,
    ``linear_weight`` and ``linear_bias`` are made during the forward pass (no recomputation
    for "mean"/"sum"), ``linear_weight``'s accumulated in float32 for bfloat16/float16 inputs.
    On CPU the rows whose target is ``ignore_index`` skip the matmuls (calls of up to 2^20
    logits run as one product of all rows instead: there the chunk loop costs more).

    Args:
        input: hidden states ``(H,)``, ``(N, H)`` or, beyond torch, ``(B, T, H)`` (any leading
            dims; ``(N, H)`` only with a K-dimensional ``linear_weight``).
        linear_weight: projection ``(C, H)`` (``nn.Linear(H, C).weight``), or
            ``(C, d1, ..., dK, H)`` for a K-dimensional loss; same dtype and device as ``input``.
        target: class indices (int64 or uint8) of shape ``(*leading, d1, ..., dK)``, or class
            probabilities of the logits' shape ``(*leading, C, d1, ..., dK)``.
        linear_bias: ``(C, d1, ..., dK)`` added to the projection, or ``None``.
        weight: ``(C,)`` per-class loss weights, as in :func:`torch.nn.functional.cross_entropy`.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``; "mean" over an all-ignored batch is
            NaN, as torch.
        ignore_index: target value that contributes neither loss nor gradient; ``None`` means
            -100 for class indices. With probability targets it must stay ``None``.
        label_smoothing: in ``[0, 1]``, torch's formula.
        options: a ``torch.nn.LinearCrossEntropyOptions`` or ``None``, checked as torch checks
            it. crossent always runs chunked and accumulates in float32; beyond that three
            things act: ``batch_chunk_size`` (rows per chunk, when ``chunk_size`` is not given),
            ``allow_retain_graph`` (keep a copy of the gradients so that "mean"/"sum" can be
            backpropagated twice) and, for bfloat16/float16 input where torch's options path
            runs (int64 targets, no smoothing or out_features), float32 logits and products
            (as its ``acc_dtype``; without ``options`` the logits are rounded to the input's
            dtype, as torch's ``F.linear``).
        z_loss, softcap, impl: as :func:`crossent.cross_entropy` (crossent only).
        logit_scale: multiplies the logits before softcap and softmax (crossent only): Cohere's
            ``config.logit_scale``; for Granite, whose logits are *divided* by
            ``config.logits_scaling``, pass ``1 / logits_scaling``.
        chunk_size: rows per chunk (crossent only); default :func:`auto_chunk_size` (about
            64 MiB of logits on CPU, 1 GiB on accelerators).

    Shape:
        - input: ``(H,)``, ``(N, H)`` or ``(*leading, H)``.
        - linear_weight: ``(C, H)`` or ``(C, d1, ..., dK, H)``.
        - target: indices ``()``, ``(N,)``, ``(*leading,)`` or ``(N, d1, ..., dK)``; or
          probabilities ``(C,)``, ``(N, C)``, ``(*leading, C)`` or ``(N, C, d1, ..., dK)``.
        - output: scalar for "mean"/"sum"; the index shape for "none".

    ``reduction="mean"``/``"sum"`` makes its gradients in forward and hands them to autograd;
    under ``retain_graph=True`` as copies, so that the next backward gets them again (or always,
    with ``options``' ``allow_retain_graph``). "none" recomputes the logits in backward (4 matmuls instead of 3) and supports it. Probability
    targets get no gradient. Double backward (``create_graph=True``) raises: materialise the
    logits for gradient penalties or MAML. With bfloat16/float16 inputs a scalar upstream
    gradient other than 1 multiplies the finished gradients: one more rounding, none when it is
    a power of two (loss scaling).

    Examples:
        >>> import torch, crossent
        >>> x, w = torch.randn(6, 8), torch.randn(11, 8)
        >>> loss = crossent.linear_cross_entropy(x, w, torch.randint(0, 11, (6,)))
        >>> loss.shape
        torch.Size([])
        >>> b = torch.randn(11)
        >>> y = torch.tensor([0, 3, -100, 10, 5, 5])
        >>> torch.allclose(crossent.linear_cross_entropy(x, w, y, linear_bias=b, logit_scale=0.5),
        ...                torch.nn.functional.cross_entropy(0.5 * (x @ w.T + b), y))
        True
    """
    if _validate.overridden(input, linear_weight, target, linear_bias, weight):
        return handle_torch_function(  # a __torch_function__ subclass
            linear_cross_entropy, (input, linear_weight, target, linear_bias, weight), input,
            linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, options=options,
            z_loss=z_loss, softcap=softcap, logit_scale=logit_scale, impl=impl,
            chunk_size=chunk_size)
    loss, _ = _linear_cross_entropy(
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
        label_smoothing, options, z_loss, softcap, logit_scale, impl, chunk_size, want_lse=False,
    )
    return loss


def linear_cross_entropy_with_lse(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: "torch.nn.LinearCrossEntropyOptions | None" = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Like :func:`linear_cross_entropy`, also returning each row's logsumexp.

    Returns ``(loss, lse)``; ``lse`` (float32, float64 for float64 input) is that of the scaled,
    softcapped logits, has the index shape (``input``'s leading shape, then ``d1, ..., dK``),
    carries no gradient, and is NaN for rows whose target is ``ignore_index`` (their logits are
    never computed).

    Examples:
        >>> import torch, crossent
        >>> x, w, y = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
        >>> loss, lse = crossent.linear_cross_entropy_with_lse(x, w, y, reduction="none")
        >>> torch.allclose(lse, torch.logsumexp(x @ w.T, 1))
        True
    """
    return _linear_cross_entropy(
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
        label_smoothing, options, z_loss, softcap, logit_scale, impl, chunk_size,
    )


def _linear_cross_entropy(
    input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
    options, z_loss, softcap, logit_scale, impl, chunk_size, want_lse=True,
) -> tuple[Tensor, Tensor | None]:
    """The shared body; with ``want_lse=False`` the returned lse may be ``None``."""
    reduction = _validate.resolve_reduction(None, None, reduction)
    _validate.check_options(label_smoothing, z_loss, softcap)
    check_logit_scale(logit_scale)
    retain, chunk_size = resolve_options(options, chunk_size)
    out_features = check_tensors(input, linear_weight, linear_bias, weight)
    n_classes, n_features = linear_weight.shape[0], linear_weight.shape[-1]
    probs = target_is_probabilities(input, target, n_classes, out_features, ignore_index)
    if check_options_for_call(options, input, target, n_classes, out_features, label_smoothing):
        # torch's options path forms float32 logits from 16-bit input: so do we (rounded to
        # the input's dtype they lose ~3 digits; the float32 copies cost 2x input and weight)
        loss, lse = _linear_cross_entropy(
            input.float(), linear_weight.float(), target, _float(linear_bias), _float(weight),
            reduction, ignore_index, label_smoothing, options, z_loss, softcap, logit_scale,
            impl, chunk_size, want_lse)
        return loss.to(input.dtype), lse
    ignore_index = -100 if ignore_index is None else _validate.ignore_index_arg(ignore_index)
    backend = resolve_backend(impl, input)
    n_pos = math.prod(out_features)  # D positions per row (1 without out_features)
    # One position: the backend's pass over the targets both checks them and sums the "mean"
    # denominator below (numba: one launch, where the torch ops of both cost ~30 us a call).
    fused_check = not probs and n_pos == 1
    _validate.check_weight_grad(weight, "linear_cross_entropy")
    if _composite.active() or n_features == 0 or n_pos == 0:
        # vmap, grad, jvp, ...: no kernel reads a transformed tensor; no features: the logits
        # are the bias, there is no product to chunk; no positions (an out_features holding a
        # 0): empty logits. All materialise them.
        return _materialised(input, linear_weight, target, linear_bias, weight, reduction,
                             ignore_index, label_smoothing, z_loss, softcap, logit_scale, probs,
                             out_features)
    if not probs and not fused_check:
        _validate.check_target_values(target, n_classes, ignore_index)
    if probs and target.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "linear_cross_entropy computes no gradient for probability targets; pass "
            "target.detach(), or materialise the logits and use crossent.cross_entropy"
        )

    lead = input.shape[:-1]
    x = input.reshape(-1, n_features)  # (N, H)
    n_rows = x.shape[0]
    acc = acc_dtype(input.dtype)
    # Targets per position d of out_features, each block contiguous: (D, N) or (D, N, C).
    if probs:
        pos_target = target.reshape(n_rows, n_classes, n_pos).permute(2, 0, 1).to(acc).contiguous()
    elif n_pos == 1 and target.dtype == torch.int64:  # (1, N): a view, no torch op beyond it
        pos_target = target.reshape(1, n_rows).contiguous()
    else:
        pos_target = target.reshape(n_rows, n_pos).t().long().contiguous()
    cw = None if weight is None else weight.detach().to(acc)
    if chunk_size is None:
        chunk_size = auto_chunk_size(n_rows, n_features, n_classes, input.device, input.dtype)
    whole = (fused_check and not out_features and not want_lse and reduction != "none"
             and logit_scale is None and whole_call_fits(x, linear_weight, chunk_size)
             and not torch.is_autocast_enabled(input.device.type))
    params = CEParams(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=float(label_smoothing),
        z_loss=float(z_loss), softcap=softcap, want_lse=not whole,
    )
    if whole:  # the backend's whole call checks the targets and divides (whole_linear_ce)
        try:
            loss, _ = _LINEAR_APPLY(
                x, linear_weight, linear_bias, pos_target[0], cw, None, None, params,
                backend.cross_entropy, chunk_size, None, retain)
        except TargetOutOfBounds as e:  # raised before any gradient product
            raise _validate.out_of_bounds(target, e.row, n_classes, ignore_index) from None
        return loss.to(_loss_dtype(input, target, probs)), None
    # "mean" divides by the (weighted) count over all N * D positions.
    all_rows = pos_target.reshape(-1, n_classes) if probs else pos_target.reshape(-1)
    try:
        denominator, scale = mean_terms(
            all_rows, cw, params, n_classes, acc,
            backend.index_target_sums if fused_check else torch_fused.index_target_sums,
            checked=not fused_check)
    except TargetOutOfBounds as e:  # raised before any product
        raise _validate.out_of_bounds(target, e.row, n_classes, ignore_index) from None
    kernel = observed(backend.ce_forward)
    scale_f = None if logit_scale is None else float(logit_scale)
    if out_features:
        # Position d's logits are x @ W[:, d].T: one chunked pass per position over (C, H)
        # views; unbind's backward stacks the D weight gradients into one (C, D, H) tensor.
        weights = linear_weight.reshape(n_classes, n_pos, n_features).unbind(1)
        biases = ((None,) * n_pos if linear_bias is None
                  else linear_bias.reshape(n_classes, n_pos).unbind(1))
    else:  # W itself, so that autograd can adopt its gradient as .grad without a copy
        weights, biases = (linear_weight,), (linear_bias,)
    parts = [
        LinearCrossEntropyFunction.apply(
            x, w_d, b_d, pos_target[d], cw, denominator, scale, params, kernel, chunk_size,
            scale_f, retain,
        )
        for d, (w_d, b_d) in enumerate(zip(weights, biases))
    ]
    lse = parts[0][1] if n_pos == 1 else torch.stack([p[1] for p in parts], 1)  # (N,) | (N, D)
    if reduction == "none":
        loss = (parts[0][0] if n_pos == 1 else torch.stack([p[0] for p in parts], 1)).reshape(
            (*lead, *out_features))
    else:
        loss = sum((p[0] for p in parts[1:]), parts[0][0])  # each already divided for "mean"
    if not probs and input.device.type not in SKIP_IGNORED_ON:
        # Ignored rows: NaN (where they were skipped, the chunk loop left them NaN already).
        lse = torch.where(pos_target.t().reshape(lse.shape) == ignore_index, float("nan"), lse)
    return loss.to(_loss_dtype(input, target, probs)), lse.reshape((*lead, *out_features))


def _loss_dtype(input: Tensor, target: Tensor, probs: bool) -> torch.dtype:
    """The input's dtype (promoted with probability targets'); float32 for 16-bit input under
    autocast, where torch's linear then cross_entropy returns a float32 loss."""
    dtype = torch.promote_types(input.dtype, target.dtype) if probs else input.dtype
    return torch.float32 if _validate.autocast_fp32(input) else dtype


def _float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def _materialised(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                  label_smoothing, z_loss, softcap, logit_scale, probs, out_features
                  ) -> tuple[Tensor, Tensor]:
    """``(R, C, *out_features)`` logits from one ``linear``, then the composite cross-entropy
    (``_core.composite``: elementary ops, any transform, any order); lse NaN at ignored rows."""
    n_classes, n_features = linear_weight.shape[0], linear_weight.shape[-1]
    lead = input.shape[:-1]
    flat_bias = None if linear_bias is None else linear_bias.reshape(-1)
    n_rows = math.prod(lead)  # (not -1: with no features every size fits)
    logits = torch.nn.functional.linear(
        input.reshape(n_rows, n_features),
        linear_weight.reshape(n_classes * math.prod(out_features), n_features), flat_bias)
    logits = logits.reshape(n_rows, n_classes, *out_features)
    if logit_scale is not None:
        logits = logits * logit_scale
    rows_target = target.reshape(logits.shape if probs else (logits.shape[0], *out_features))
    loss, lse = _composite.cross_entropy(logits, rows_target, weight, ignore_index, reduction,
                                         float(label_smoothing), float(z_loss), softcap, probs)
    if not probs:
        # in int64: as uint8, ignore_index -100 would equal class 156
        lse = torch.where(rows_target.long() == ignore_index, float("nan"), lse)
    shape = (*lead, *out_features)
    loss = loss.reshape(shape) if reduction == "none" else loss
    return loss.to(_loss_dtype(input, target, probs)), lse.reshape(shape)
