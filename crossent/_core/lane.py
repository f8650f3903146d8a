"""The common cross-entropy call in as few Python steps and torch calls as it takes.

Most calls in a training loop are the same call again: ``(N, C)`` logits on the CPU whose class
dim is contiguous, ``(N,)`` int64 class indices, no class weight, eager. For those the checks
of ``_core.validate`` all pass, and the options, the misuse probe's tolerance, the backend and
its launch are the same as last time: they are looked up once per distinct call (``_PLANS``),
and the call goes straight to an autograd Function's C entry. A (64, 10) call pays per Python
step and more per torch call (a tensor attribute read costs ~0.4 us alone and 1-2 us inside a
training step's cold caches, measured): this path reads each attribute it needs once. Any
other call returns ``None`` here and takes the general path, which raises torch's errors,
handles every layout, and sees tracing. Where the compiled node is loaded
(``backends.native``), its lane checks the tensors in C++ and the options alone pick its plan.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from . import diagnostics as _diagnostics
from . import composite as _composite
from . import validate as _validate
from ..backends import TargetOutOfBounds
from ..backends import native as _native
from .autograd import CrossEntropyFunction, CrossEntropyLane, c_apply, eager
from .dispatch import UNPLANNED, keep_plan, settled_backend, stats_sink, whole_call
from .params import CEParams

_apply = c_apply(CrossEntropyFunction)
_lane_apply = c_apply(CrossEntropyLane)


class _Plan(NamedTuple):
    """What a call with the same options, dtypes and class count needs: the checked options,
    the backend's whole call, and its launch for contiguous calls (``lane_launch``, or None)."""

    params: CEParams
    call: Callable[..., Any]
    launch: Callable[..., Any] | None


# (impl, ignore_index, reduction, label_smoothing, z_loss, diagnostics on) -> the compiled
# node's options after the tensors, or None (reduction "none"); bounded as _PLANS.
_NATIVE: dict[tuple, tuple | None] = {}


# (impl, dtype, target dtype, C, ignore_index, reduction, label_smoothing, z_loss, softcap,
# whether the probe is on) -> plan, or None for calls the lane does not take (not floating-point
# logits with int64 indices). Bounded (``dispatch.keep_plan``): past ``MAX_PLANS`` a caller that
# varies an option every call (a label-smoothing schedule) builds its plan each time.
_PLANS: dict[tuple, _Plan | None] = {}


def cross_entropy(
    input: Tensor, target: Tensor, ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: float | None, impl: str,
) -> Tensor | None:
    """``crossent.cross_entropy(input, target, ...)`` without a weight, the legacy arguments or
    an in-place gradient, for the common call (see the module docstring); ``None`` otherwise."""
    if torch.compiler.is_compiling():
        return None
    node = _native.module
    if (node is not None and softcap is None and impl in _native.IMPLS
            and not _composite.active() and stats_sink.get() is None):
        # the compiled node (``backends.native``) where a Python node's own cost shows: its lane
        # checks the tensors in C++, so the options alone pick its plan
        key = (impl, ignore_index, reduction, label_smoothing, z_loss, _diagnostics._enabled)
        options = _NATIVE.get(key, UNPLANNED)
        if options is UNPLANNED:
            options = _native_options(key)
        if options is not None:
            try:
                out = node.ce_lane(input, target, *options)
            except IndexError:  # the kernel's check: name the offender as the general path does
                _validate.check_target_values(target, input.shape[1], ignore_index)
                raise
            except TypeError:  # not tensors: the general path raises torch's error, named
                out = None
            if out is not None:
                if out[1]:
                    _diagnostics.warn_probabilities(input)
                return out[0]
    if type(input) is not Tensor or type(target) is not Tensor:
        return None
    shape = input.shape
    if len(shape) != 2 or target.shape != shape[:1] or not (input.is_cpu and target.is_cpu):
        return None
    n_rows, n_cls = shape
    dtype = input.dtype
    if dtype in _validate.HALF and torch.is_autocast_enabled("cpu"):
        return None  # autocast: a float32 loss (the general path, ``_validate.autocast_fp32``)
    key = (impl, dtype, target.dtype, n_cls, ignore_index, reduction, label_smoothing,
           z_loss, softcap, _diagnostics._enabled and n_rows > 0)
    plan = _PLANS.get(key, UNPLANNED)
    if plan is UNPLANNED:
        plan = _plan(key, input)
        if node is None and _native.module is not None:  # the plan loaded the compiled node
            return cross_entropy(input, target, ignore_index, reduction, label_smoothing, z_loss,
                                 softcap, impl)
    if plan is None or input.is_neg() or _composite.active() or stats_sink.get() is not None:
        return None  # (a negative-bit view: see ``_validate.resolved``)
    logits = input if torch.is_grad_enabled() else input.detach()  # see _cross_entropy
    try:
        if plan.launch is not None and input.is_contiguous() and target.is_contiguous():
            try:  # (a functorch tensor that escaped its transform has no data: general path)
                xa, ta = input.data_ptr(), target.data_ptr()
            except RuntimeError:
                return None
            loss, seen = _lane_apply(logits, target, plan.launch, xa, ta, n_rows)
        elif input.stride(1) == 1 and eager(input, target):
            loss, _, seen = _apply(logits, target, None, plan.params, plan.call, input.dtype)
        else:
            return None
    except TargetOutOfBounds as e:  # raised before anything was written
        raise _validate.out_of_bounds(target, e.row, n_cls, ignore_index) from None
    _diagnostics.act_on_probe(input, seen, plan.params.probe_tol)
    return loss


def _plan(key: tuple, input: Tensor) -> _Plan | None:
    """The plan for ``key`` (options checked: torch's errors), kept once the backend no longer
    changes (``auto`` runs on torch while numba loads)."""
    from ..functional import _options  # (functional imports this module)

    impl, dtype, target_dtype, n_cls, ignore_index, reduction, label_smoothing, z_loss, \
        softcap, probe = key
    if target_dtype != torch.int64 or not dtype.is_floating_point:
        plan = None
    else:
        probe_tol = _diagnostics.row_probe_tolerance(dtype, 1, n_cls) if probe else None
        params = _options(ignore_index, reduction,
                          _validate.real_arg("label_smoothing", label_smoothing),
                          _validate.real_arg("z_loss", z_loss), softcap, False, False, probe_tol)
        call = whole_call(impl, input)
        backend = settled_backend(impl)
        if backend is None or call is not backend.cross_entropy:  # for this call only
            return _Plan(params, call, None)
        launcher = getattr(backend, "lane_launch", None)
        launch = None if launcher is None else launcher(dtype, n_cls, params)
        if launch is not None:
            _native.load_built()  # (done by the background load unless CROSSENT_BACKGROUND_LOAD=0)
        plan = _Plan(params, call, launch)
    return keep_plan(_PLANS, key, plan)


def _native_options(key: tuple) -> tuple | None:
    """The compiled node's options for ``key``'s calls (checked: torch's errors), or None for
    the calls it does not take (reduction "none")."""
    from ..functional import _options  # (functional imports this module)

    impl, ignore_index, reduction, label_smoothing, z_loss, probe = key
    params = _options(ignore_index, reduction,
                      _validate.real_arg("label_smoothing", label_smoothing),
                      _validate.real_arg("z_loss", z_loss), None, False, False, None)
    options = None
    if params.reduction != "none":
        ignore_index, eps, z_loss, mean, _, _ = params.whole_call
        options = (ignore_index, eps, z_loss, mean, probe)
    return keep_plan(_NATIVE, key, options)
