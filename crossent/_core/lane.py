"""The common cross-entropy call in as few Python steps as it takes.

Most calls in a training loop are the same call again: ``(N, C)`` logits on the CPU whose class
dim is contiguous, ``(N,)`` int64 class indices, no class weight, eager. For those the checks
of ``_core.validate`` all pass, and the options, the misuse probe's tolerance and the backend
are the same as last time: they are looked up once per distinct call (``_PLANS``), and the call
goes straight to the autograd Function's C entry. A (64, 10) call pays per Python step and per
torch op (each ~0.1-0.7 us against a forward of a few microseconds); this path keeps only the
attribute checks that decide whether it applies. Any other call returns ``None`` here and takes
the general path, which raises torch's errors, handles every layout, and sees tracing.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from . import diagnostics as _diagnostics
from . import validate as _validate
from ..backends import TargetOutOfBounds
from .autograd import CrossEntropyFunction, c_apply, eager
from .dispatch import settled_backend, stats_sink, whole_call
from .params import CEParams

_apply = c_apply(CrossEntropyFunction)

# (impl, dtype, ignore_index, reduction, label_smoothing, z_loss, softcap, probe_tol) ->
# (options, backend module, the name of its whole call for these calls: ``cross_entropy_rows``
# where it has one, else ``cross_entropy``; looked up per call, as ``whole_call`` does). Bounded: a caller that varies an option every call (a label-smoothing schedule)
# would otherwise grow it without end; past the bound such calls build their plan each time.
_PLANS: dict[tuple, tuple[CEParams, Any, str]] = {}
_MAX_PLANS = 64


def cross_entropy(
    input: Tensor, target: Tensor, ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: float | None, impl: str,
) -> Tensor | None:
    """``crossent.cross_entropy(input, target, ...)`` without a weight, the legacy arguments or
    an in-place gradient, for the common call (see the module docstring); ``None`` otherwise."""
    if not (_validate.plain_rows(input, target) and input.stride(1) == 1 and eager(input, target)
            and stats_sink.get() is None):
        return None
    n_rows, n_cls = input.shape
    probe_tol = _diagnostics.row_probe_tolerance(input.dtype, n_rows, n_cls)
    key = (impl, input.dtype, ignore_index, reduction, label_smoothing, z_loss, softcap,
           probe_tol)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(key, input)
    params, backend, entry = plan
    logits = input if torch.is_grad_enabled() else input.detach()  # see _cross_entropy
    try:
        loss, _, seen = _apply(logits, target, None, params, getattr(backend, entry),
                               input.dtype)
    except TargetOutOfBounds as e:  # raised before anything was written
        raise _validate.out_of_bounds(target, e.row, n_cls, ignore_index) from None
    _diagnostics.act_on_probe(input, seen, probe_tol)
    return loss


def _plan(key: tuple, input: Tensor) -> tuple[CEParams, Any, str]:
    """The options (checked: torch's errors), the backend (an object with the whole call as
    ``cross_entropy``) and the name of its entry for these calls, for ``key``; kept once the
    backend no longer changes (``auto`` runs on torch while numba loads)."""
    from ..functional import _options  # (functional imports this module)

    impl, _, ignore_index, reduction, label_smoothing, z_loss, softcap, probe_tol = key
    params = _options(ignore_index, reduction, float(label_smoothing), float(z_loss), softcap,
                      False, False, probe_tol)
    call = whole_call(impl, input)
    backend = settled_backend(impl)
    if backend is not None and call is backend.cross_entropy:
        plan = params, backend, ("cross_entropy_rows" if hasattr(backend, "cross_entropy_rows")
                                 else "cross_entropy")
        if len(_PLANS) < _MAX_PLANS:
            _PLANS[key] = plan
        return plan
    return params, SimpleNamespace(cross_entropy=call), "cross_entropy"  # for this call only

