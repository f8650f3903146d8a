"""Argument and tensor checks with messages that name the argument, the value and the fix.

Every check raises the exception class torch raises for the same input (or a subclass), so
``except`` clauses written against torch keep working.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ._params import REDUCTIONS

_INDEX_DTYPES = (torch.int64, torch.uint8)


def _shape(t: Tensor | torch.Size | tuple) -> str:
    dims = tuple(t.shape) if isinstance(t, Tensor) else tuple(t)
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def resolve_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """Map torch's legacy ``size_average`` / ``reduce`` onto ``reduction`` (with torch's warning)."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{reduction!r} is not a valid value for reduction: use one of 'none', 'mean', 'sum'"
        )
    return reduction


def check_options(label_smoothing: float, z_loss: float, softcap: float | None) -> None:
    if not label_smoothing <= 1.0 or math.isnan(label_smoothing):
        raise RuntimeError(
            f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}"
        )
    if not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")


def check_input(input: Tensor, name: str = "input") -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of logits, got {type(input).__name__}")
    if not input.is_floating_point():
        raise NotImplementedError(
            f"{name} has dtype {input.dtype}; cross-entropy needs floating-point logits "
            f"(float32, float64, bfloat16 or float16): pass {name}.float()"
        )
    if input.dim() == 0:
        raise RuntimeError(
            f"{name} is a 0-d tensor; expected logits of shape (C,), (N, C) or (N, C, d1, ..., dk)"
        )


def target_is_probabilities(input: Tensor, target: Tensor, ignore_index: int) -> bool:
    """True for class-probability targets (the input's shape), False for class indices.

    Raises for a target that fits neither reading, naming the shapes and the fix.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise RuntimeError(
            f"target is on {target.device} but input is on {input.device}: move both to one device"
        )
    if target.shape == input.shape:
        if not target.is_floating_point():
            raise RuntimeError(
                f"target has the input's shape {_shape(input)}, so it is read as class "
                f"probabilities, but its dtype is {target.dtype}; expected floating point type for "
                f"target with class probabilities. For class indices pass a target of shape "
                f"{_shape(_index_shape(input))}."
            )
        if ignore_index >= 0:
            raise RuntimeError(
                f"ignore_index={ignore_index} is not supported for floating point target "
                f"(class probabilities); give ignored rows zero probability instead"
            )
        return True
    check_index_target(input, target)
    return False


def _index_shape(input: Tensor) -> tuple[int, ...]:
    return () if input.dim() == 1 else (input.shape[0], *input.shape[2:])


def check_index_target(input: Tensor, target: Tensor) -> None:
    """Class-index target: dtype int64/uint8 and shape (), (N,) or (N, d1..dk) matching input."""
    expected = _index_shape(input)
    if target.dtype not in _INDEX_DTYPES:
        hint = (
            "use target.long()"
            if tuple(target.shape) == expected
            else f"pass class indices of shape {_shape(expected)}"
        )
        raise RuntimeError(
            f"target has dtype {target.dtype} and shape {_shape(target)}; expected target dtype "
            f"to be Long or Byte holding class indices: {hint}, or pass class probabilities of the "
            f"input's shape {_shape(input)}"
        )
    if input.dim() == 1:
        if target.dim() == 0 or tuple(target.shape) == (1,):
            return
        raise RuntimeError(
            f"input has shape {_shape(input)} (one sample, {input.shape[0]} classes), so target "
            f"must be a 0-d class index, got shape {_shape(target)}"
        )
    if input.dim() == 2 and target.dim() != 1:
        raise RuntimeError(
            f"0D or 1D target tensor expected, multi-target not supported: input {_shape(input)} "
            f"needs target of shape {_shape(expected)}, got {_shape(target)}"
        )
    if target.dim() and target.shape[0] != input.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({target.shape[0]}): input {_shape(input)}, target {_shape(target)}"
        )
    if input.dim() >= 3 and tuple(target.shape) != expected:
        raise RuntimeError(
            f"size mismatch (got input: {_shape(input)}, target: {_shape(target)}): for "
            f"K-dimensional input (N, C, d1, ..., dk) the target must be (N, d1, ..., dk) = "
            f"{_shape(expected)}{_swap_hint(input, target)}"
        )


def _swap_hint(input: Tensor, target: Tensor) -> str:
    """Spot channels-last logits such as (N, H, W, C) given for (N, C, H, W)."""
    if tuple(target.shape) == (input.shape[0], *input.shape[1:-1]):
        order = ", ".join(["0", str(input.dim() - 1)] + [str(i) for i in range(1, input.dim() - 1)])
        return (
            f". The class dim looks last (channels-last logits with C={input.shape[-1]}): "
            f"pass input.permute({order})"
        )
    return ""


def check_weight(weight: Tensor | None, input: Tensor) -> None:
    if weight is None:
        return
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a 1-D torch.Tensor of {n_classes} class weights")
    if weight.dim() != 1 or weight.shape[0] != n_classes:
        raise RuntimeError(
            f"weight tensor should be defined either for all {n_classes} classes or no classes "
            f"but got weight tensor of shape: {_shape(weight)}; pass a 1-D weight of length "
            f"{n_classes} (one per class) or weight=None"
        )
    if weight.dtype != input.dtype:
        raise RuntimeError(
            f"weight has dtype {weight.dtype} but input has dtype {input.dtype}; expected scalar "
            f"type {input.dtype}: pass weight.to(input.dtype)"
        )
    if weight.device != input.device:
        raise RuntimeError(
            f"weight is on {weight.device} but input is on {input.device}: move both to one device"
        )


def check_target_values(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """Every class index lies in [0, C) or equals ignore_index.

    On CPU the first offender is named (value and position). On accelerators the check is a
    device-side assert so that it costs no host synchronisation.
    """
    flat = target.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= n_classes))
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        # No host sync (and no data-dependent branch for torch.compile): assert on the device.
        torch._assert_async(~bad.any(), "crossent: target holds a class index out of range")
        return
    if not bad.any():
        return
    first = int(bad.nonzero()[0, 0])
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), target.shape))
    where = f"position {position[0] if len(position) == 1 else position}" if position else "the target"
    raise IndexError(
        f"Target {int(flat[first])} is out of bounds: target contains {int(flat[first])} at "
        f"{where}, but input has {n_classes} classes (valid: 0..{n_classes - 1}, or "
        f"ignore_index={ignore_index})"
    )


def warn_weight_grad(weight: Tensor | None) -> None:
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        warnings.warn(
            "crossent: weight requires grad, but no gradient is computed for the class weights "
            "(torch does not implement it either); pass weight.detach() to silence this",
            stacklevel=3,
        )
