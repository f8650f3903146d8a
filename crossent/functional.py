"""Public functions: validate, move the class dim last and flatten to rows, dispatch, reduce.

Shapes: ``C`` classes, ``N`` batch, ``d1..dk`` extra (e.g. spatial) dims; internally every
call becomes ``R`` rows of ``C`` logits (``R = N * d1 * ... * dk``).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.overrides import handle_torch_function

from ._core import composite as _composite
from ._core import diagnostics as _diagnostics
from ._core import lane as _lane
from ._core import nll as _nll
from ._core import softmax as _softmax
from ._core import validate as _validate
from ._core.autograd import CrossEntropyFunction, fast_apply
from ._core.dispatch import whole_call
from ._core.params import REDUCTIONS, CEParams
from .backends import TargetOutOfBounds
from .backends.torch_fused import acc_dtype

_PLAIN = (Tensor, type(None))  # weight types that need no __torch_function__ check

__all__ = ["cross_entropy", "cross_entropy_with_lse", "nll_loss", "log_softmax", "softmax"]


def cross_entropy(
    input: Tensor,
    target: Tensor,
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
) -> Tensor:
    r"""Cross-entropy between logits and targets, a drop-in for ``torch.nn.functional.cross_entropy``.

    For a row of logits :math:`x` and class index :math:`y` the loss is
    :math:`w_y (\log\sum_c e^{x_c} - x_y)`, computed max-subtracted so any finite logits are safe.

    Args:
        input: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; never probabilities.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64 or uint8), or class
            probabilities of the input's shape.
        weight: ``(C,)`` per-class weights, same dtype as ``input``.
        ignore_index: class-index value whose rows contribute nothing (not to the mean either).
        reduction: ``"none"`` (loss of the target's shape), ``"mean"`` (divided by the summed
            weight of non-ignored targets, or by the row count for probabilities; NaN when every
            target is ignored, as in torch) or ``"sum"``.
        label_smoothing: mixes the target with the uniform distribution, torch's formula.
        impl: backend, ``"auto"`` or a name from ``crossent.backends``; never falls back silently.
        z_loss: adds ``z_loss * lse**2`` for each counted row (PaLM's auxiliary loss).
        softcap: caps logits as ``softcap * tanh(x / softcap)`` before the softmax (Gemma 2).
        inplace_backward: write the gradient into ``input``'s storage (saves one ``(N, C)``
            buffer). ``input`` must not be needed afterwards; autograd raises if it is.

    Shape: scalar for "mean"/"sum"; the target's index shape for "none".

    Examples:
        >>> import torch, crossent
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
        >>> crossent.cross_entropy(logits, torch.tensor([0, 2]))
        tensor(0.1755)
    """
    if ((type(input) is not Tensor or type(target) is not Tensor or type(weight) not in _PLAIN)
            and _validate.overridden(input, target, weight)):  # a __torch_function__ subclass
        return handle_torch_function(
            cross_entropy, (input, target, weight), input, target, weight, size_average,
            ignore_index, reduce, reduction, label_smoothing, impl=impl, z_loss=z_loss,
            softcap=softcap, inplace_backward=inplace_backward)
    ignore_index = _validate.ignore_index_arg(ignore_index)
    if (weight is None and size_average is None and reduce is None and not inplace_backward
            and reduction in REDUCTIONS):
        loss = _lane.cross_entropy(input, target, ignore_index, reduction, label_smoothing,
                                   z_loss, softcap, impl)
        if loss is not None:  # the common call (``_core.lane``)
            return loss
    loss, _ = _cross_entropy(
        input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
        impl, z_loss, softcap, inplace_backward, want_lse=False,
    )
    return loss


def cross_entropy_with_lse(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    impl: str = "auto",
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Like :func:`cross_entropy`, also returning :math:`\log\sum_c e^{x_c}` of every row.

    Args: as :func:`cross_entropy` (without the legacy ``size_average`` / ``reduce``).

    Shape: ``loss`` as :func:`cross_entropy`; ``lse`` has the target's index shape, float32
    (float64 for float64 input), computed after ``softcap``, and carries no gradient.

    Examples:
        >>> import torch, crossent
        >>> loss, lse = crossent.cross_entropy_with_lse(torch.zeros(2, 4), torch.tensor([0, 1]))
        >>> lse
        tensor([1.3863, 1.3863])
    """
    if _validate.overridden(input, target, weight):
        return handle_torch_function(
            cross_entropy_with_lse, (input, target, weight), input, target, weight, ignore_index,
            reduction, label_smoothing, impl=impl, z_loss=z_loss, softcap=softcap,
            inplace_backward=inplace_backward)
    return _cross_entropy(
        input, target, weight, None, _validate.ignore_index_arg(ignore_index), None, reduction,
        label_smoothing, impl, z_loss, softcap, inplace_backward,
    )


def _cross_entropy(
    input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
    impl, z_loss, softcap, inplace_backward, want_lse=True,
) -> tuple[Tensor, Tensor | None]:
    """The shared body; with ``want_lse=False`` the returned lse is None.

    Every step is a few attribute checks or none at all on the common path: a small call pays
    per Python step and per torch op, so the target range, the mean denominator and the misuse
    probe are the backend's, made in its pass over the logits (``crossent.backends``)."""
    if size_average is not None or reduce is not None or reduction not in REDUCTIONS:
        # torch's legacy pair (and its warning), or torch's error for an unknown reduction
        reduction = _validate.resolve_reduction(size_average, reduce, reduction)
    input, target, weight = (_validate.resolved(input), _validate.resolved(target),
                             _validate.resolved(weight))
    if isinstance(input, Tensor) and _validate.autocast_fp32(input):
        input, target, weight = _validate.autocast_args(input, target, weight)
    plain = weight is None and _validate.plain_rows(input, target)
    if plain:  # (N, C) logits, (N,) int64 indices, CPU, no weight: the checks below all pass
        probs = False
    else:
        _validate.check_input(input)
        probs = _validate.target_is_probabilities(input, target, ignore_index, reduction)
        weight = _validate.check_weight(weight, input, probs)
        _validate.check_weight_grad(weight, "cross_entropy")
        if probs and _validate.float64_result(input, target, weight):
            # float64 probabilities or weights for narrower logits: torch sums the row terms in
            # float64, its result's dtype; in float32 a sum past 3.4e38 overflowed to inf
            input = input.double()
    if inplace_backward:
        _validate.check_inplace(input, probs and target.requires_grad)
    probe_tol = _diagnostics.probe_tolerance(input)
    # Checked and built once per distinct set of options (a training loop has one; checks and
    # a dataclass cost a microsecond); torch.compile cannot trace the cache and builds one.
    make = _options if not torch.compiler.is_compiling() else options
    params = make(ignore_index, reduction, _validate.real_arg("label_smoothing", label_smoothing),
                  _validate.real_arg("z_loss", z_loss), softcap, inplace_backward, want_lse,
                  probe_tol)
    if _composite.active():  # vmap, grad, jvp, ...: no kernel reads a transformed tensor
        loss, lse = _composite.cross_entropy(
            input, target, weight, ignore_index, reduction, params.label_smoothing,
            params.z_loss, softcap, probs)
        return loss, (lse if want_lse else None)
    call = whole_call(impl, input)
    if plain and input.stride(1) == 1:  # rows already, the target too: nothing to reshape
        logits, rows_target, out_shape = input, target, (input.shape[0],)
    else:
        logits, rows_target, out_shape = to_rows(input, target, probs, keep_kdim=True)
    if not torch.is_grad_enabled():
        # Under no_grad a Function still reports needs_input_grad for inputs that require grad:
        # detach so the kernel computes the loss only, with no gradient buffer.
        logits, rows_target = logits.detach(), rows_target.detach()
    w = None
    if weight is not None:
        w = weight.detach().to(acc_dtype(input.dtype))
    if probs:
        rows_target = rows_target.to(acc_dtype(input.dtype))
        out_dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)  # torch promotes, too
    else:
        out_dtype = input.dtype
    try:
        loss, lse, seen = _ce_apply(
            logits, rows_target, w, params, call, out_dtype
        )
    except TargetOutOfBounds as e:  # raised before anything was written
        raise _validate.out_of_bounds(target, e.row, logits.shape[1], ignore_index) from None
    _diagnostics.act_on_probe(input, seen, probe_tol)
    if reduction == "none" and loss.shape != out_shape:
        loss = loss.reshape(out_shape)
    return loss, (lse.reshape(out_shape) if want_lse else lse)


def options(
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
    softcap: float | None, inplace_backward: bool, want_lse: bool, probe_tol: float | None,
) -> CEParams:
    """The call's options, checked (the errors torch raises for them), as one object."""
    _validate.check_options(label_smoothing, z_loss, softcap)
    return CEParams(ignore_index, reduction, label_smoothing, z_loss, softcap, inplace_backward,
                    want_lse, probe_tol)


_options = functools.lru_cache(maxsize=64)(options)  # an error is raised again, never cached
_ce_apply = fast_apply(CrossEntropyFunction)


def to_rows(
    input: Tensor, target: Tensor, probs: bool, keep_kdim: bool = False
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Move the class dim last and flatten: logits ``(R, C)``, target ``(R,)`` or ``(R, C)``;
    with ``keep_kdim``, contiguous K-dimensional logits with class indices stay where they are,
    as an ``(N, C, S)`` view (for the whole-call backend contract).

    Also returns the index shape the per-row results are reshaped to for ``reduction="none"``.
    """
    if input.dim() == 1:
        logits = input.unsqueeze(0)  # (1, C)
        rows_target = target.reshape(1, -1) if probs else target.reshape(1).long()
        return logits, rows_target, ()
    n_classes = input.shape[1]
    out_shape = (input.shape[0], *input.shape[2:])
    if input.dim() == 2 and input.stride(1) == 1:
        # (R, C) rows already, contiguous or at any row stride (vocab-padded logits[:, :V]):
        # no op, no copy (a small call pays per op); backends without strided rows copy.
        logits = input
    elif keep_kdim and input.dim() >= 3 and input.is_contiguous() and not probs:
        # (N, C, S), a view: backends with a K-dim kernel read it in place (rows in (n, s)
        # order), the others move the class dim last themselves.
        logits = input.reshape(input.shape[0], n_classes, math.prod(input.shape[2:]))
    else:
        logits = input.movedim(1, -1).reshape(-1, n_classes).contiguous()  # (R, C)
    if probs:
        rows_target = target.movedim(1, -1).reshape(-1, n_classes)  # (R, C)
    elif target.dim() == 1 and target.dtype == torch.int64:
        rows_target = target  # (R,) already: no op
    else:
        rows_target = target.reshape(-1).long()  # (R,)
    return logits, rows_target, out_shape


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    impl: str = "auto",
) -> Tensor:
    r"""Negative log-likelihood of log-probabilities, a drop-in for ``torch.nn.functional.nll_loss``.

    .. math::
        \ell_n = -w_{y_n} x_{n, y_n}, \qquad
        \ell = \sum_n \ell_n \;\text{("sum")}, \quad
        \ell = \sum_n \ell_n \Big/ \sum_{n:\, y_n \ne \text{ignore}} w_{y_n} \;\text{("mean")}

    so ``nll_loss(log_softmax(x, 1), y) == cross_entropy(x, y)``. Ignored positions give 0 and
    leave the "mean" denominator; a denominator of 0 gives NaN (or inf), as torch.

    Args:
        input: log-probabilities ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``, read in place.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64 or uint8).
        weight, ignore_index, reduction: as in :func:`cross_entropy`.
        impl: ``"auto"`` (numba on CPU), ``"numba"``, ``"triton"`` or ``"torch"``; every
            backend but numba runs one torch ``gather`` (a single cheap pass, on any device).

    Shape: scalar for "mean"/"sum"; the target's shape for "none".

    Examples:
        >>> import torch, crossent
        >>> logp = crossent.log_softmax(torch.tensor([[2.0, 0.5, -1.0]]), dim=1)
        >>> crossent.nll_loss(logp, torch.tensor([0]))
        tensor(0.2413)
    """
    if ((type(input) is not Tensor or type(target) is not Tensor or type(weight) not in _PLAIN)
            and _validate.overridden(input, target, weight)):  # a __torch_function__ subclass
        return handle_torch_function(nll_loss, (input, target, weight), input, target, weight,
                                     size_average, ignore_index, reduce, reduction, impl=impl)
    ignore_index = _validate.ignore_index_arg(ignore_index)
    if weight is None and size_average is None and reduce is None:
        loss = _nll.lane(input, target, ignore_index, reduction, impl)
        if loss is not None:  # the common call (``_core.nll.lane``)
            return loss
    reduction = _validate.resolve_reduction(size_average, reduce, reduction)
    for arg, what in ((input, "input"), (target, "target")):
        if not isinstance(arg, Tensor):  # torch's class
            raise TypeError(f"nll_loss(): argument '{what}' must be a torch.Tensor, not "
                            f"{type(arg).__name__}")
    input, weight = _validate.resolved(input), _validate.resolved(weight)
    if _validate.autocast_fp32(input):
        input, target, weight = _validate.autocast_args(input, target, weight)
    if input.dim() == 0:
        raise ValueError(
            "Expected 1 or more dimensions (got 0): nll_loss needs log-probabilities of shape "
            "(C,), (N, C) or (N, C, d1, ..., dk), e.g. log_softmax(logits, dim) of the logits"
        )
    if weight is not None or not _validate.plain_rows(input, target):  # else they all pass
        _validate.check_input(input)
        _validate.check_index_target(input, target, reduction)
        weight = _validate.check_weight(weight, input)
        _validate.check_weight_grad(weight, "nll_loss")
    return _nll.nll(input, target, weight, ignore_index, reduction, _softmax.backend(impl, input))


def log_softmax(
    input: Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
    *,
    impl: str = "auto",
) -> Tensor:
    r"""Log-softmax along ``dim`` (any dim), a drop-in for ``torch.nn.functional.log_softmax``.

    .. math::
        \text{log\_softmax}(x)_i = x_i - \max_j x_j - \log \sum_j e^{x_j - \max_k x_k}

    Backward: :math:`g - e^{\text{out}} \sum_j g_j`. One read and one write each way.

    Args:
        input: any floating tensor (a 0-d tensor gives 0).
        dim: the dim to normalise (``None``: torch's deprecated implicit choice, with its warning).
        dtype: cast ``input`` to this first, as torch.
        impl: ``"auto"`` (numba on CPU, Triton on CUDA, else torch), ``"numba"``, ``"triton"``
            or ``"torch"``. float64 on CPU runs in torch (float64 throughout).

    Shape: same as ``input``. Computed in float32 for half-precision input, rounded once.

    Examples:
        >>> import torch, crossent
        >>> crossent.log_softmax(torch.tensor([0.0, 0.0]), dim=0)
        tensor([-0.6931, -0.6931])
    """
    if type(input) is not Tensor and _validate.overridden(input):  # a __torch_function__ subclass
        return handle_torch_function(log_softmax, (input,), input, dim, _stacklevel, dtype,
                                     impl=impl)
    return _softmax.apply(_softmax.LOG_SOFTMAX, "log_softmax", input, dim, dtype, impl)


def softmax(
    input: Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
    *,
    impl: str = "auto",
) -> Tensor:
    r"""Softmax along ``dim`` (any dim), max-subtracted, a drop-in for ``torch.nn.functional.softmax``.

    .. math::
        \text{softmax}(x)_i = \frac{e^{x_i - \max_k x_k}}{\sum_j e^{x_j - \max_k x_k}}

    Backward: :math:`\text{out} \odot (g - \sum_j g_j \text{out}_j)`. One read and one write each way.

    Args: as :func:`log_softmax` (a 0-d tensor gives 1).

    Shape: same as ``input``; each slice along ``dim`` sums to 1.

    Examples:
        >>> import torch, crossent
        >>> crossent.softmax(torch.tensor([[1.0, 1.0], [0.0, 1000.0]]), dim=1)  # exp(1000) = inf
        tensor([[0.5000, 0.5000],
                [0.0000, 1.0000]])
    """
    if type(input) is not Tensor and _validate.overridden(input):  # a __torch_function__ subclass
        return handle_torch_function(softmax, (input,), input, dim, _stacklevel, dtype, impl=impl)
    return _softmax.apply(_softmax.SOFTMAX, "softmax", input, dim, dtype, impl)
