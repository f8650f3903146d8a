"""Fused linear + cross-entropy: ``cross_entropy(input @ weight.T + bias, target)`` without ever
holding the ``(N, V)`` logits: rows go through in chunks of a bounded size.

Shapes: ``N`` rows (all leading dims of ``input`` flattened), ``H`` features, ``V`` classes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _validate
from ._dispatch import resolve
from ._linear_autograd import LinearCrossEntropyFunction
from ._params import CEParams
from .backends.torch_fused import acc_dtype
from ._validate import _shape
from .functional import _mean_terms

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_lse", "auto_chunk_size"]

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
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r"""``cross_entropy(input @ weight.T + bias, target, ...)`` computed chunk by chunk.

    At most ``chunk_size`` rows of logits exist at a time; the gradients of ``input``,
    ``weight`` and ``bias`` are made during the forward pass (no recomputation for
    "mean"/"sum"), ``weight``'s accumulated in float32 for bfloat16/float16 inputs. On CPU the
    rows whose target is ``ignore_index`` skip the matmuls.

    Args:
        input: hidden states ``(H,)``, ``(N, H)`` or ``(B, T, H)`` (any leading dims).
        weight: projection ``(V, H)``, same dtype and device as ``input``.
        target: class indices of ``input``'s leading shape (int64 or uint8), or class
            probabilities ``(*leading, V)``.
        bias: ``(V,)`` or ``None``.
        class_weight: ``(V,)`` per-class loss weights (``weight`` of ``torch.nn.functional
            .cross_entropy``; renamed because ``weight`` is the projection here).
        ignore_index, reduction, label_smoothing, z_loss, softcap, impl: as in
            :func:`crossent.cross_entropy`; "mean" over an all-ignored batch is NaN, as torch.
        chunk_size: rows per chunk; default :func:`auto_chunk_size` (about 64 MiB of logits on CPU,
            1 GiB on accelerators).

    Shape: scalar for "mean"/"sum"; ``input``'s leading shape for "none".

    ``reduction="mean"``/``"sum"`` hands its gradients to autograd once: a second backward
    through the same call (``retain_graph=True``) raises. "none" recomputes the logits in
    backward (4 matmuls instead of 3) and supports it. Probability targets get no gradient.
    With bfloat16/float16 inputs a scalar upstream gradient other than 1 multiplies the finished
    gradients: one more rounding, none when it is a power of two (loss scaling).

    Examples:
        >>> import torch, crossent
        >>> x, w = torch.randn(6, 8), torch.randn(11, 8)
        >>> loss = crossent.linear_cross_entropy(x, w, torch.randint(0, 11, (6,)))
        >>> loss.shape
        torch.Size([])
    """
    loss, _ = _linear_cross_entropy(
        input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing,
        z_loss, softcap, impl, chunk_size,
    )
    return loss


def linear_cross_entropy_with_lse(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Like :func:`linear_cross_entropy`, also returning each row's logsumexp.

    Returns ``(loss, lse)``; ``lse`` (float32, float64 for float64 input) has ``input``'s
    leading shape, carries no gradient, and is NaN for rows whose target is ``ignore_index``
    (their logits are never computed).
    """
    return _linear_cross_entropy(
        input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing,
        z_loss, softcap, impl, chunk_size,
    )


def _linear_cross_entropy(
    input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing,
    z_loss, softcap, impl, chunk_size,
) -> tuple[Tensor, Tensor]:
    reduction = _validate.resolve_reduction(None, None, reduction)
    _validate.check_options(label_smoothing, z_loss, softcap)
    _check_tensors(input, weight, bias, class_weight)
    n_classes = weight.shape[0]
    probs = _target_is_probabilities(input, target, n_classes, ignore_index)
    if not probs:
        _validate.check_target_values(target, n_classes, ignore_index)
    _validate.warn_weight_grad(class_weight)
    if probs and target.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "linear_cross_entropy computes no gradient for probability targets; pass "
            "target.detach(), or materialise the logits and use crossent.cross_entropy"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")

    lead = input.shape[:-1]  # the loss shape of "none"
    x = input.reshape(-1, input.shape[-1])  # (N, H)
    acc = acc_dtype(input.dtype)
    rows_target = target.reshape(-1, n_classes).to(acc) if probs else target.reshape(-1).long()
    cw = None if class_weight is None else class_weight.detach().to(acc)
    params = CEParams(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=float(label_smoothing),
        z_loss=float(z_loss), softcap=softcap,
    )
    denominator, scale = _mean_terms(rows_target, cw, params, probs, acc)
    kernel = resolve(impl, input)
    if chunk_size is None:
        chunk_size = auto_chunk_size(x.shape[0], x.shape[1], n_classes, input.device, input.dtype)
    loss, lse = LinearCrossEntropyFunction.apply(
        x, weight, bias, rows_target, cw, denominator, scale, params, kernel, chunk_size,
    )
    if not probs:
        # Ignored rows: NaN whether or not this device skipped their matmul.
        lse = torch.where(rows_target == ignore_index, float("nan"), lse)
    out_dtype = torch.result_type(input, target) if probs else input.dtype
    if reduction == "none":
        loss = loss.reshape(lead)
    return loss.to(out_dtype), lse.reshape(lead)


def _check_tensors(
    input: Tensor, weight: Tensor, bias: Tensor | None, class_weight: Tensor | None
) -> None:
    """input (.., H) / weight (V, H) / bias (V,) / class_weight (V,): shapes, dtypes, devices."""
    _validate.check_input(input)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise RuntimeError(f"weight must be a 2-D projection (V, H), got {got}")
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"input {_shape(input)} and weight {_shape(weight)} cannot be multiplied: input's "
            f"last dim ({input.shape[-1]}) must equal weight's second dim, in_features "
            f"({weight.shape[1]}); weight is (V, H) as in nn.Linear(H, V).weight"
        )
    n_classes = weight.shape[0]
    for name, t in (("weight", weight), ("bias", bias), ("class_weight", class_weight)):
        if t is None:
            continue
        if name != "weight" and (not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != n_classes):
            got = _shape(t) if isinstance(t, Tensor) else type(t).__name__
            raise RuntimeError(
                f"{name} must have shape ({n_classes},), one entry per class (weight is "
                f"{_shape(weight)}), got {got}"
            )
        if t.dtype != input.dtype:
            raise RuntimeError(
                f"{name} has dtype {t.dtype} but input has dtype {input.dtype}; expected both "
                f"to have the same dtype: pass {name}.to(input.dtype)"
            )
        if t.device != input.device:
            raise RuntimeError(
                f"{name} is on {t.device} but input is on {input.device}: move both to one device"
            )


def _target_is_probabilities(input: Tensor, target: Tensor, n_classes: int, ignore_index: int) -> bool:
    """Class indices of ``input``'s leading shape, or probabilities ``(*leading, V)``."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise RuntimeError(
            f"target is on {target.device} but input is on {input.device}: move both to one device"
        )
    lead = tuple(input.shape[:-1])
    if target.is_floating_point():
        if tuple(target.shape) != (*lead, n_classes):
            raise RuntimeError(
                f"floating-point target is read as class probabilities and must have shape "
                f"{_shape((*lead, n_classes))} (input's leading dims, then V), got "
                f"{_shape(target)}; for class indices pass an int64 target of shape "
                f"{_shape(lead)}"
            )
        if ignore_index >= 0:
            raise RuntimeError(
                f"ignore_index={ignore_index} is not supported for floating point target "
                f"(class probabilities); give ignored rows zero probability instead"
            )
        return True
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(
            f"target has dtype {target.dtype}; expected Long or Byte class indices: use target.long()"
        )
    if tuple(target.shape) != lead:
        raise ValueError(
            f"target {_shape(target)} does not match input {_shape(input)}: expected one class "
            f"index per row of input, shape {_shape(lead)}"
        )
    return False
