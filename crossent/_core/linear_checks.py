"""Argument checks of :func:`crossent.linear_cross_entropy`: torch 2.13's exception classes, with
messages that name the fix."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import validate as _validate
from .validate import _shape


def check_tensors(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, weight: Tensor | None
) -> tuple[int, ...]:
    """input ``(.., H)`` / linear_weight ``(C, *out_features, H)`` / linear_bias
    ``(C, *out_features)`` / weight ``(C,)``: shapes, dtypes, devices. Returns ``out_features``."""
    _validate.check_input(input)
    if not isinstance(linear_weight, Tensor) or linear_weight.dim() < 2:
        got = linear_weight.dim() if isinstance(linear_weight, Tensor) else type(linear_weight).__name__
        raise RuntimeError(
            f"expected linear_weight with dimensionality at least 2, got {got}: linear_weight is "
            f"(C, H) as nn.Linear(H, C).weight, or (C, d1, ..., dK, H) for a K-dimensional loss"
        )
    n_classes, *out, n_features = linear_weight.shape
    out_features = tuple(out)
    if input.shape[-1] != n_features:
        raise RuntimeError(
            f"expected equal input and linear_weight last dimensions (in_features), got "
            f"{input.shape[-1]} and {n_features}: input {_shape(input)} cannot be multiplied by "
            f"linear_weight {_shape(linear_weight)}, which is (C, H) as nn.Linear(H, C).weight"
        )
    if out_features and input.dim() != 2:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {_shape(linear_weight)} requires "
            f"batched input (N, {n_features}), got input with shape {_shape(input)}"
        )
    if linear_bias is not None and (
        not isinstance(linear_bias, Tensor) or tuple(linear_bias.shape) != (n_classes, *out_features)
    ):
        got = _shape(linear_bias) if isinstance(linear_bias, Tensor) else type(linear_bias).__name__
        raise RuntimeError(
            f"expected linear_bias shape {_shape((n_classes, *out_features))} (linear_weight's "
            f"shape without its last dim), got {got}"
        )
    if weight is not None and (not isinstance(weight, Tensor) or tuple(weight.shape) != (n_classes,)):
        got = _shape(weight) if isinstance(weight, Tensor) else type(weight).__name__
        raise RuntimeError(
            f"weight tensor should be defined either for all {n_classes} classes or no classes "
            f"but got weight tensor of shape: {got}; weight is the per-class loss weight (C,), "
            f"the projection is linear_weight"
        )
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias), ("weight", weight)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise RuntimeError(
                f"{name} has dtype {t.dtype} but input has dtype {input.dtype}; expected both "
                f"to have the same dtype: pass {name}.to(input.dtype)"
            )
        if t.device != input.device:
            raise RuntimeError(
                f"{name} is on {t.device} but input is on {input.device}: move both to one device"
            )
    return out_features


def target_is_probabilities(
    input: Tensor, target: Tensor, n_classes: int, out_features: tuple[int, ...],
    ignore_index: int | None,
) -> bool:
    """Class indices of shape ``(*leading, *out_features)``, or probabilities of the logits'
    shape ``(*leading, C, *out_features)`` (torch tells them apart by that shape)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise RuntimeError(
            f"target is on {target.device} but input is on {input.device}: move both to one device"
        )
    lead = tuple(input.shape[:-1])
    logits_shape = (*lead, n_classes, *out_features)
    index_shape = (*lead, *out_features)
    if tuple(target.shape) == logits_shape:
        if ignore_index is not None:
            raise RuntimeError(
                f"ignore_index cannot be specified when target contains probabilities (target "
                f"{_shape(target)} has the logits' shape); give ignored rows zero probability, "
                f"or leave ignore_index=None"
            )
        if not target.is_floating_point():
            raise RuntimeError(
                f"Expected floating point type for target with class probabilities, got "
                f"{target.dtype}: target {_shape(target)} has the logits' shape; class indices "
                f"have shape {_shape(index_shape)}"
            )
        return True
    if target.is_floating_point():
        raise RuntimeError(
            f"floating-point target is read as class probabilities and must have the logits' "
            f"shape {_shape(logits_shape)}, got {_shape(target)}; for class indices pass an "
            f"int64 target of shape {_shape(index_shape)}"
        )
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got {target.dtype}: use target.long()"
        )
    if tuple(target.shape) != index_shape:
        # torch: ValueError for a batch mismatch, RuntimeError for the K-dimensional positions
        # and for a target of the right batch but too many dims ((N, 1): "multi-target").
        rows = index_shape[0] if index_shape else 1  # (torch reads (H,) input as one row)
        batch = not out_features and (target.dim() == 0 or target.shape[0] != rows)
        error = ValueError if batch else RuntimeError
        raise error(
            f"target {_shape(target)} does not match input {_shape(input)}: expected class "
            f"indices of shape {_shape(index_shape)} (one per row of input"
            f"{', per position of out_features' if out_features else ''})"
        )
    return False


def resolve_options(options: object, chunk_size: int | None) -> tuple[bool, int | None]:
    """torch's ``LinearCrossEntropyOptions`` -> ``(allow_retain_graph, chunk_size)``.

    crossent always runs chunked, accumulating in float32 (torch's ``acc_policy="accurate"``), so
    of the options only ``batch_chunk_size`` (when ``chunk_size`` is not given) and
    ``allow_retain_graph`` have a meaning here.
    """
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if options is None:
        return False, chunk_size
    cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if cls is None or not isinstance(options, cls):
        raise _validate.WrongTypeError(
            f"options must be None or a torch.nn.LinearCrossEntropyOptions, got "
            f"{type(options).__name__}"
        )
    rows = options.batch_chunk_size
    if chunk_size is not None and rows is not None and rows != chunk_size:
        raise ValueError(
            f"chunk_size={chunk_size} disagrees with options.batch_chunk_size={rows}: give one"
        )
    return bool(options.allow_retain_graph), chunk_size if chunk_size is not None else rows


def check_logit_scale(logit_scale: object) -> None:
    if logit_scale is None:
        return
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real):
        raise TypeError(
            f"logit_scale must be None or a real number (a Python float), got "
            f"{type(logit_scale).__name__}; for a tensor pass float(logit_scale)"
        )
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be finite, got {logit_scale}")


def check_options_for_call(options: object, input: Tensor, target: Tensor, n_classes: int,
                           out_features: tuple[int, ...], label_smoothing: float) -> bool:
    """torch's errors for ``options`` that its chunked path would reject for this call: a
    ``batch_chunk_size`` that disagrees with an explicit ``chunking_method`` (ValueError) and an
    ``acc_dtype`` other than the input's or float32 for 16-bit input (RuntimeError). torch
    takes that path, and so checks, only without out_features or smoothing and with int64
    targets; crossent's own chunking would accept all of them.

    Returns whether that path forms float32 logits from 16-bit input (its ``acc_dtype``),
    where ``options=None`` rounds them to the input's dtype."""
    if (options is None or out_features or label_smoothing != 0.0 or target.dtype != torch.int64
            or not hasattr(options, "_adjust")):
        return False
    acc = options._adjust(num_batches=input.shape[0] if input.dim() == 2 else 1,
                          in_features=input.shape[-1], num_classes=n_classes, dtype=input.dtype,
                          device=input.device).acc_dtype
    if acc != input.dtype and not (input.dtype in (torch.float16, torch.bfloat16)
                                   and acc == torch.float32):
        raise RuntimeError(
            f"options.acc_dtype={acc} is not supported for {input.dtype} input (as torch's): "
            "float32 accumulates float16/bfloat16 input, other inputs their own dtype; crossent "
            "accumulates in float32 anyway, so pass acc_dtype=None"
        )
    return acc != input.dtype
