"""nll_loss behind the public function: the numba kernel on CPU, else one gather in plain torch.

Both read the input in place, in its own layout (K-dim input is never moved or copied): only
the ``N * d1 * ... * dk`` picked log-probabilities are read, and the gradient is the sparse
scatter of ``-w_y * g`` into zeros, torch's layout.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..backends import native as _native
from . import composite as _composite
from . import dispatch as _dispatch
from . import validate as _validate
from .autograd import c_apply, fast_apply
from ..backends.torch_fused import nll_loss as torch_nll


@functools.lru_cache(maxsize=None)
def _numba_function():
    """The numba backend's Function (its ``fast_apply``), imported on first use (importing
    crossent loads no numba) and then kept: an import statement in the call path costs a small
    call ~0.5 us."""
    from ..backends.numba_nll import NLLLoss

    return fast_apply(NLLLoss)


def nll(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
        name: str) -> Tensor:
    """nll_loss on backend ``name`` (numba, or the torch gather for every other backend).

    Target values are checked by ``_validate.check_target_values``; on the numba path the kernel
    checks each index as it reads it (one pass instead of the check's five tensor ops, which
    dominate small calls), and the shared check runs to name the offender when it raises.
    """
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if _composite.active():  # the gather is all elementary ops: vmap, grad, jvp follow
        _composite.check_targets(target, n_classes, ignore_index)
        return torch_nll(input, target, weight, ignore_index, reduction)
    if name != "numba":
        _validate.check_target_values(target, n_classes, ignore_index)
        return torch_nll(input, target, weight, ignore_index, reduction)
    apply = _numba_function()
    if not torch.is_grad_enabled():
        input = input.detach()  # no graph, and no buffers kept for a backward
    try:
        loss = apply(input, target, weight, ignore_index, reduction)
    except IndexError:
        _validate.check_target_values(target, n_classes, ignore_index)
        raise
    return loss.reshape(()) if input.dim() == 1 and reduction == "none" else loss


_REDUCED = ("mean", "sum")
# (impl, dtype, target dtype, ignore_index, reduction) -> (``NLLLossLane``'s C entry, its plan), or
# None for calls the lane does not take; kept once numba is ready.
_PLANS: dict[tuple, tuple | None] = {}


def lane(input: Tensor, target: Tensor, ignore_index: int, reduction: str, impl: str
         ) -> Tensor | None:
    """The common call (``(N, C)`` CPU log-probabilities at any strides, contiguous ``(N,)``
    int64 or uint8 indices, no weight, "mean" or "sum", eager) on the numba kernels in as few
    torch calls as it takes (each costs more than the kernel at (64, 10)); ``None`` for every
    other call, which the public function checks and dispatches."""
    if torch.compiler.is_compiling():
        return None
    node = _native.module
    if (node is not None and impl in _native.IMPLS and reduction in _REDUCED
            and not _composite.active()):
        # the compiled node (``backends.native``) where a Python node's own cost shows: its lane
        # checks the call in C++
        try:
            loss = node.nll_lane(input, target, ignore_index, reduction == "mean")
        except IndexError:  # the kernel's own check: name the offender as the general path does
            _validate.check_target_values(target, input.shape[1], ignore_index)
            raise
        except TypeError:  # not tensors: the general path raises torch's error, named
            loss = None
        if loss is not None:
            return loss
    if type(input) is not Tensor or type(target) is not Tensor:
        return None
    shape = input.shape
    if len(shape) != 2 or target.shape != shape[:1] or not (input.is_cpu and target.is_cpu):
        return None
    dtype = input.dtype
    if dtype in _validate.HALF and torch.is_autocast_enabled("cpu"):
        return None  # autocast: nll_loss in float32 (``_validate.autocast_fp32``)
    key = (impl, dtype, target.dtype, ignore_index, reduction)
    plan = _PLANS.get(key, _dispatch.UNPLANNED)
    if plan is _dispatch.UNPLANNED:
        plan = _plan(key, input)
        if node is None and _native.module is not None:  # the plan loaded the compiled node
            return lane(input, target, ignore_index, reduction, impl)
    if plan is None or not target.is_contiguous() or input.is_neg() or _composite.active():
        return None  # (a negative-bit view: see ``_validate.resolved``)
    try:  # (a functorch tensor that escaped its transform has no data: general path)
        xa, ta = input.data_ptr(), target.data_ptr()
    except RuntimeError:
        return None
    st = input.stride()
    apply, plan = plan
    try:
        return apply(input if torch.is_grad_enabled() else input.detach(), target, plan, xa, ta,
                     (shape[0], shape[1], 1), (st[0], st[1], 0))
    except IndexError:  # the kernel's own check: name the offender as the general path does
        _validate.check_target_values(target, shape[1], ignore_index)
        raise


def _plan(key: tuple, input: Tensor) -> tuple | None:
    """``NLLLossLane``'s C entry and plan for ``key``'s calls (CPU input), or None; kept once
    numba is ready (before, ``auto`` runs on torch)."""
    impl, dtype, target_dtype, ignore_index, reduction = key
    numba = _dispatch.numba_lane(impl, input)
    if numba is None:
        return None
    plan = None
    if (numba and reduction in ("mean", "sum") and target_dtype in (torch.int64, torch.uint8)
            and dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)):
        from ..backends import numba_nll

        _native.load_built()  # (done by the background load unless CROSSENT_BACKGROUND_LOAD=0)
        plan = c_apply(numba_nll.NLLLossLane), (numba_nll.LIKE[dtype], numba_nll.LIKE[target_dtype],
                                              ignore_index, reduction, dtype)
    return _dispatch.keep_plan(_PLANS, key, plan)
