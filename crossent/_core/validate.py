"""Argument and tensor checks with messages that name the argument, the value and the fix.

Every check raises the exception class torch raises for the same input (or a subclass), so
``except`` clauses written against torch keep working.
"""
from __future__ import annotations

import math
import operator
import warnings
from typing import Any

import torch
from torch import Tensor

from .params import REDUCTIONS

_INDEX_DTYPES = (torch.int64, torch.uint8)
_TYPE_NAMES = {torch.uint8: "Byte"}


def _shape(t: Tensor | torch.Size | tuple) -> str:
    dims = tuple(t.shape) if isinstance(t, Tensor) else tuple(t)
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def resolve_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """Map torch's legacy ``size_average`` / ``reduce`` onto ``reduction`` (with torch's warning)."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction == "elementwise_mean":  # torch's deprecated spelling, with its warning
        warnings.warn("reduction='elementwise_mean' is deprecated, please use reduction='mean' "
                      "instead.", stacklevel=4)
        reduction = "mean"
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{reduction!r} is not a valid value for reduction: use one of 'none', 'mean', 'sum'"
        )
    return reduction


def real_arg(name: str, value: Any) -> float:
    """A float option (``label_smoothing``, ``z_loss``) as torch's argument parser takes it: a
    real number, numpy scalar or 0-d tensor; TypeError otherwise (``float("0.1")`` would
    quietly take a string)."""
    if isinstance(value, (str, bytes)) or not hasattr(type(value), "__float__"):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def check_options(label_smoothing: float, z_loss: float, softcap: float | None) -> None:
    # NaN passes, as in torch: it compares false with 0, so no smoothing is applied.
    if label_smoothing > 1.0:
        raise RuntimeError(
            f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}"
        )
    if not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")


class WrongTypeError(TypeError, AttributeError):
    """An argument of the wrong type where torch raises AttributeError, since it calls a method
    of the argument (``input.softmax``, ``options._adjust``): a TypeError, and torch's class."""


class TargetIndexError(IndexError, RuntimeError):
    """A class index out of range: torch raises IndexError from its eager kernels and
    RuntimeError from others (linear_cross_entropy with ``options``, vmap); this is both."""


def check_softmax_args(name: str, input: Any, dtype: Any) -> None:
    """torch's errors for an input that is not a tensor and a ``dtype`` that is not one."""
    if not isinstance(input, Tensor):
        raise WrongTypeError(f"{name}(): input must be a torch.Tensor, got {type(input).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}(): argument 'dtype' must be torch.dtype, not "
                        f"{type(dtype).__name__}: pass e.g. dtype=torch.float32")


HALF = (torch.bfloat16, torch.float16)  # the dtypes torch's autocast runs float32 ops for


def autocast_fp32(input: Tensor) -> bool:
    """Whether ``torch.autocast`` is on for ``input``'s device and ``input`` is 16-bit: torch's
    autocast then runs cross_entropy and nll_loss in float32 (a float32 loss), so do these."""
    return input.dtype in HALF and torch.is_autocast_enabled(input.device.type)


# Devices whose autocast runs softmax / log_softmax in float32 when no dtype is given (CUDA's
# "fp32_set_opt_dtype" ops; on CPU torch keeps them in the 16-bit dtype).
AUTOCAST_SOFTMAX_FP32 = {"cuda"}


def autocast_softmax_dtype(input: Tensor, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype softmax / log_softmax run in: float32 for 16-bit input under autocast on the
    devices where torch does so (and no ``dtype`` given), else ``dtype``."""
    if (dtype is None and input.dtype in HALF and input.device.type in AUTOCAST_SOFTMAX_FP32
            and torch.is_autocast_enabled(input.device.type)):
        return torch.float32
    return dtype


def autocast_args(*tensors: Any) -> tuple[Any, ...]:
    """The tensors as torch's autocast passes them to a float32 op: 16-bit ones as float32
    copies (differentiable: their gradients come back in their own dtype)."""
    return tuple(t.float() if isinstance(t, Tensor) and t.dtype in HALF else t
                 for t in tensors)


def overridden(*tensors: Any) -> bool:
    """Whether a tensor subclass (or other type) among ``tensors`` overrides
    ``__torch_function__``: the call then goes to it, as torch's functional API does. Plain
    tensors skip the check."""
    return (any(type(t) is not Tensor for t in tensors if t is not None)
            and torch.overrides.has_torch_function(tuple(t for t in tensors if t is not None)))


class ZeroDimLogitsError(IndexError, RuntimeError):
    """0-d logits: torch raises IndexError ("Dimension out of range") or, with a 0-d target read
    as probabilities, RuntimeError; this is both."""


def check_input(input: Tensor, name: str = "input") -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of logits, got {type(input).__name__}")
    if not input.is_floating_point():
        raise NotImplementedError(
            f"{name} has dtype {input.dtype}; cross-entropy needs floating-point logits "
            f"(float32, float64, bfloat16 or float16): pass {name}.float()"
        )
    if input.dim() == 0:
        raise ZeroDimLogitsError(
            f"{name} is a 0-d tensor; expected logits of shape (C,), (N, C) or (N, C, d1, ..., dk)"
        )


def ignore_index_arg(value: Any) -> int:
    """``ignore_index`` as torch's argument parser takes it: an int, or anything with
    ``__index__`` (numpy integers, 0-d integer tensors) but a bool. torch's classes otherwise:
    TypeError for another type (a float, a bool, None), ValueError outside int64."""
    if type(value) is not int:
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise TypeError(f"ignore_index must be an int (the target value to skip, e.g. -100), "
                            f"got {type(value).__name__} {value!r}")
        try:
            value = operator.index(value)
        except TypeError:  # (a floating-point tensor, say)
            raise TypeError(f"ignore_index must be an int (the target value to skip, e.g. "
                            f"-100), got {value!r}") from None
    if not -(1 << 63) <= value < 1 << 63:
        raise ValueError(f"ignore_index {value} does not fit in int64 (torch: Overflow when "
                         f"unpacking long long)")
    return value


def resolved(t: Any) -> Any:
    """``t`` with a negative-bit view materialised (``z.conj().imag`` of a complex ``z`` is one;
    ``resolve_neg`` is differentiable), anything else as it is. The kernels read memory through
    addresses, where such a view holds the negated values: read raw, the result is silently
    wrong. (Traced calls run torch ops, which read the bit themselves; Dynamo cannot trace
    ``is_neg``.)"""
    if torch.compiler.is_compiling() or not isinstance(t, Tensor):
        return t
    return t.resolve_neg() if t.is_neg() else t


def plain_rows(input: Tensor, target: Tensor) -> bool:
    """Whether the call is the common one that every check of this module passes: ``(N, C)``
    floating-point logits and ``(N,)`` int64 class indices, both on the CPU. Attribute reads
    only (a small call's budget is a few microseconds); callers run the full checks, and their
    messages, when it is False."""
    return (type(input) is Tensor and type(target) is Tensor and input.dim() == 2
            and target.dim() == 1 and target.dtype == torch.int64 and input.is_floating_point()
            and input.is_cpu and target.is_cpu and target.shape[0] == input.shape[0])


def target_is_probabilities(
    input: Tensor, target: Tensor, ignore_index: int, reduction: str = "none"
) -> bool:
    """True for class-probability targets (the input's shape), False for class indices.

    Raises for a target that fits neither reading, naming the shapes and the fix.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_cpu != input.is_cpu or (not input.is_cpu and target.device != input.device):
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
    check_index_target(input, target, reduction)
    return False


def _index_shape(input: Tensor) -> tuple[int, ...]:
    return () if input.dim() == 1 else (input.shape[0], *input.shape[2:])


def _check_index_dtype(input: Tensor, target: Tensor) -> None:
    if target.dtype not in _INDEX_DTYPES:
        expected = _index_shape(input)
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


def check_index_target(input: Tensor, target: Tensor, reduction: str = "none") -> None:
    """Class-index target: dtype int64/uint8 and shape (), (N,) or (N, d1..dk) matching input.

    Exception classes and their order are torch's: batch size (``ValueError``), then dtype and
    rank (``RuntimeError``)."""
    in_dim, t_dim = input.dim(), target.dim()
    if in_dim == 1:  # torch checks the dtype first here, the batch size first otherwise
        _check_index_dtype(input, target)
    if in_dim == 1 and t_dim == 1 and target.shape[0] != 1:
        raise ValueError(
            f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}: "
            f"input {_shape(input)} is one sample of {input.shape[0]} classes, so target must "
            f"be one class index, shape () or (1,)"
        )
    if in_dim >= 2 and t_dim == 0 and input.shape[0] == 0:  # (torch: IndexError; a batch
        # of N > 0 gets the ValueError below)
        raise IndexError(
            f"target is a 0-d tensor but input {_shape(input)} has a batch dim: pass class "
            f"indices of shape {_shape(_index_shape(input))}"
        )
    batch = target.shape[0] if t_dim else 0
    if in_dim >= 2 and batch != input.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({batch}): input {_shape(input)} needs class indices of shape "
            f"{_shape(_index_shape(input))}{_probs_hint(input, target)}, got target "
            f"{_shape(target)}"
        )
    _check_index_dtype(input, target)
    if in_dim <= 2 and t_dim <= 1:
        return  # the common case: nothing below applies
    expected = _index_shape(input)
    empty_reduced = target.numel() == 0 and reduction != "none"  # torch returns before checking
    if input.dim() >= 3 and target.dtype != torch.int64 and not empty_reduced:
        # torch's K-dim kernels (nll_loss2d) take int64 only; uint8 works for (C,) / (N, C).
        raise RuntimeError(
            f"expected scalar type Long but found {_TYPE_NAMES.get(target.dtype, target.dtype)}: "
            f"K-dimensional input {_shape(input)} takes int64 class indices, as in torch; pass "
            f"target.long()"
        )
    if input.dim() <= 2 and target.dim() > 1:
        raise RuntimeError(
            f"0D or 1D target tensor expected, multi-target not supported: input {_shape(input)} "
            f"needs target of shape {_shape(expected)}, got {_shape(target)}"
        )
    if input.dim() >= 3 and tuple(target.shape) != expected:
        raise RuntimeError(
            f"size mismatch (got input: {_shape(input)}, target: {_shape(target)}): for "
            f"K-dimensional input (N, C, d1, ..., dk) the target must be (N, d1, ..., dk) = "
            f"{_shape(expected)}{_swap_hint(input, target)}"
        )


def _probs_hint(input: Tensor, target: Tensor) -> str:
    if target.is_floating_point():
        return f", or class probabilities of the input's shape {_shape(input)}"
    return ""


def _swap_hint(input: Tensor, target: Tensor) -> str:
    """Spot channels-last logits such as (N, H, W, C) given for (N, C, H, W)."""
    if tuple(target.shape) == (input.shape[0], *input.shape[1:-1]):
        order = ", ".join(["0", str(input.dim() - 1)] + [str(i) for i in range(1, input.dim() - 1)])
        return (
            f". The class dim looks last (channels-last logits with C={input.shape[-1]}): "
            f"pass input.permute({order})"
        )
    return ""


def check_weight(weight: Tensor | None, input: Tensor, probs: bool = False) -> Tensor | None:
    """``weight`` as ``(C,)`` (torch takes any shape of ``C`` values for K-dimensional input,
    ``(C,)`` otherwise) on input's device; its dtype is input's for class indices (as torch: a
    RuntimeError), any floating dtype for probabilities (the result is promoted)."""
    if weight is None:
        return None
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a 1-D torch.Tensor of {n_classes} class weights")
    if input.dim() >= 3 and weight.dim() != 1 and weight.numel() == n_classes:
        weight = weight.reshape(n_classes)
    if weight.dim() != 1 or weight.shape[0] != n_classes:
        raise RuntimeError(
            f"weight tensor should be defined either for all {n_classes} classes or no classes "
            f"but got weight tensor of shape: {_shape(weight)}; pass a 1-D weight of length "
            f"{n_classes} (one per class) or weight=None"
        )
    if weight.dtype != input.dtype and not (probs and weight.is_floating_point()):
        raise RuntimeError(
            f"weight has dtype {weight.dtype} but input has dtype {input.dtype}; expected scalar "
            f"type {input.dtype}: pass weight.to(input.dtype)"
        )
    if weight.device != input.device:
        raise RuntimeError(
            f"weight is on {weight.device} but input is on {input.device}: move both to one device"
        )
    return weight


def check_target_values(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """Every class index lies in [0, C) or equals ignore_index.

    On CPU the first offender is named (value and position). On accelerators the check is a
    device-side assert so that it costs no host synchronisation.
    """
    # int64, as the kernels index: in uint8, ignore_index=-1 would wrap to 255 and match.
    flat = target.reshape(-1).long()
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= n_classes))
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        # No host sync (and no data-dependent branch for torch.compile): assert on the device.
        torch._assert_async(~bad.any(), "crossent: target holds a class index out of range")
        return
    if not bad.any():
        return
    raise out_of_bounds(target, int(bad.nonzero()[0, 0]), n_classes, ignore_index)


def out_of_bounds(target: Tensor, first: int, n_classes: int, ignore_index: int
                  ) -> TargetIndexError:
    """torch's ``IndexError`` for ``target``'s flat entry ``first``, naming its value and
    position, the class count and the valid range."""
    flat = target.reshape(-1)
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), target.shape))
    where = f"position {position[0] if len(position) == 1 else position}" if position else "the target"
    return TargetIndexError(
        f"Target {int(flat[first])} is out of bounds: target contains {int(flat[first])} at "
        f"{where}, but input has {n_classes} classes (valid: 0..{n_classes - 1}, or "
        f"ignore_index={ignore_index})"
    )


def check_inplace(input: Tensor, target_needs_grad: bool) -> None:
    """``inplace_backward=True`` writes the gradient over ``input``: refuse what torch refuses
    for in-place ops (a leaf that requires grad, or a view of one) and what would lose data."""
    # A view's _base is the tensor it views (the root, for views of views). Dynamo cannot trace
    # _is_view(); compiled graphs see the tensor itself.
    base = input if torch.compiler.is_compiling() or not input._is_view() else input._base
    if input.requires_grad and base.is_leaf and base.requires_grad:
        what = "a view of a leaf tensor" if base is not input else "a leaf tensor"
        raise RuntimeError(
            f"inplace_backward=True would overwrite {what} that requires grad (a parameter or "
            "user input, as torch refuses for in-place ops); pass the logits produced by the "
            "model, or inplace_backward=False"
        )
    if target_needs_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "inplace_backward=True overwrites the logits, but the gradient of probability targets "
            "that require grad is made from them in backward; pass target.detach() or "
            "inplace_backward=False"
        )


def float64_result(input: Tensor, target: Tensor, weight: Tensor | None) -> bool:
    """Whether probability targets (or their class weights) promote the loss of narrower logits
    to float64."""
    if input.dtype == torch.float64:
        return False
    return torch.float64 in (target.dtype, None if weight is None else weight.dtype)


def check_weight_grad(weight: Tensor | None, name: str) -> None:
    """torch's RuntimeError for class weights that require grad in grad mode: no loss of the
    family is differentiable in them (a silent zero gradient would look like training)."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"crossent.{name} is not differentiable with respect to argument 'weight' (nor is "
            "torch's): the class weights cannot have requires_grad=True. Pass weight.detach(), "
            "or call under torch.no_grad()"
        )
