"""Misuse diagnostics: catch probabilities passed where logits belong, cheaply.

The classic mistake: a model whose ``forward`` ends in ``softmax`` feeding ``cross_entropy``,
which applies log-softmax itself. Training still runs, but the loss is squashed into
``[log(e + C - 1) - 1, log(e + C - 1)]`` and its gradients shrink, so it costs users days.

Cost and scope, by design:
- Bounded work: at most ``_SAMPLE_ROWS`` rows of ``C`` values are looked at (views, no copy of
  the input), whatever the batch or spatial size.
- CPU tensors only. Reading the verdict back from an accelerator would add a host sync to a
  call that has none; on CUDA the check is skipped (run one batch on CPU to check a model).
- Skipped while tracing (``torch.compile``, functorch transforms, meta/fake tensors), so it
  never breaks a graph.
- One warning per call site (a registry keyed by the caller's file and line).
- Switch off with ``crossent.set_diagnostics(False)`` (or ``CROSSENT_DIAGNOSTICS=0`` in the
  environment, read at import).
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import Tensor

__all__ = ["ProbabilitiesAsLogitsWarning", "set_diagnostics", "diagnostics_enabled",
           "check_probabilities_as_logits", "probe_tolerance", "looks_like_probabilities",
           "warn_probabilities", "act_on_probe", "row_probe_tolerance"]

try:  # numpy is optional for torch: the probe uses it where present (faster on small inputs)
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

_NUMPY_DTYPES = (torch.float32, torch.float64)
_SAMPLE_ROWS = 8
_PREFILTER = 4096  # values of the first sampled row checked before the whole sample
_enabled = os.environ.get("CROSSENT_DIAGNOSTICS", "1").strip().lower() not in ("0", "false", "off", "no")
_warned_sites: set[tuple[str, int]] = set()
# Frames inside these directories are not "the caller": the crossent package, and nn.Module.__call__.
_SKIP_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
              os.path.dirname(os.path.abspath(torch.nn.modules.module.__file__)) + os.sep)


class ProbabilitiesAsLogitsWarning(UserWarning):
    """The input of a cross-entropy looks like probabilities (softmax output), not logits.

    Examples:
        >>> import torch, warnings, crossent
        >>> probs = torch.softmax(torch.randn(4, 3), dim=1)  # the mistake: softmax, then the loss
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     loss = crossent.cross_entropy(probs, torch.tensor([0, 1, 2, 0]))
        >>> caught[0].category.__name__
        'ProbabilitiesAsLogitsWarning'
    """


def set_diagnostics(enabled: bool) -> None:
    """Turn crossent's misuse diagnostics on or off for the whole process.

    Args:
        enabled: ``False`` skips the probabilities-as-logits check in every call
            (the environment variable ``CROSSENT_DIAGNOSTICS=0`` sets this at import).

    Examples:
        >>> import crossent
        >>> crossent.set_diagnostics(False)
        >>> crossent._core.diagnostics.diagnostics_enabled()
        False
        >>> crossent.set_diagnostics(True)
    """
    global _enabled
    _enabled = bool(enabled)


def diagnostics_enabled() -> bool:
    """Whether misuse diagnostics run (``crossent.set_diagnostics`` / ``CROSSENT_DIAGNOSTICS``)."""
    return _enabled


def _caller() -> tuple[int, tuple[str, int]]:
    """The stacklevel (for ``warnings.warn`` called from here) and location of the user's call."""
    frame = sys._getframe(2)  # the function that called warn_probabilities
    level = 2  # warnings.warn's stacklevel of that frame, seen from warn_probabilities
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_DIRS):
        frame = frame.f_back
        level += 1
    if frame is None:
        return 2, ("", 0)
    return level, (frame.f_code.co_filename, frame.f_lineno)


def _sample_rows(input: Tensor, class_dim: int) -> tuple[Tensor, int]:
    """At most ``_SAMPLE_ROWS`` rows of ``C`` values and the class axis in them, by one index.

    Keeps index 0 of every non-class dim but the last, then up to 8 along the last one: a view
    of at most ``8 * C`` values, so a huge ``(N, C, H, W)`` costs the same as a small one.
    """
    if input.dim() == 1:
        return input, 0
    if input.dim() == 2 and class_dim == 1:  # the common (N, C) case, by the cheapest op
        return input.narrow(0, 0, min(_SAMPLE_ROWS, input.shape[0])), 1
    others = [d for d in range(input.dim()) if d != class_dim]
    last = others[-1]
    index = tuple(slice(None) if d == class_dim else slice(0, _SAMPLE_ROWS) if d == last else 0
                  for d in range(input.dim()))
    return input[index], 0 if class_dim < last else 1


def _tolerance(dtype: torch.dtype) -> float:
    return _TOLERANCES.get(dtype) or max(1e-3, 8 * torch.finfo(dtype).eps)


# A softmax stored in a dtype sums to 1 within eps/2 (each p_c rounded with relative error
# eps/2, and the p_c sum to 1; a softmax divided in that dtype, within eps). bfloat16: 2 eps
# (0.016; 8 eps let 14% of random 2-class rows in [0, 1] warn). float16 also rounds tiny p_c
# to subnormals, up to 2^-25 each: 8 eps (0.0078) covers 245K classes. fp32/fp64: 1e-3, which
# also catches a softmax made in 16 bits and cast up. (torch.finfo costs a microsecond a call.)
_TOLERANCES = {torch.float32: 1e-3, torch.float64: 1e-3,
               torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
               torch.float16: 8 * torch.finfo(torch.float16).eps}


def check_probabilities_as_logits(input: Tensor, class_dim: int | None = None) -> None:
    """Warn (once per call site) when ``input`` looks like softmax output rather than logits.

    "Looks like": every sampled value in ``[0, 1]`` and every sampled row summing to 1 along
    ``class_dim`` (default: 0 for ``(C,)`` input, else 1). Log-probabilities (``log_softmax``
    output) are valid input to cross-entropy and do not warn. ``C == 1`` never warns: the loss
    is identically 0 for any input, probabilities or logits, so the warning would not help.
    """
    if probe_tolerance(input, class_dim) is not None and looks_like_probabilities(input, class_dim):
        warn_probabilities(input, class_dim)


def probe_tolerance(input: Tensor, class_dim: int | None = None) -> float | None:
    """The row-sum tolerance of the probe when ``input`` is to be probed, else ``None``
    (diagnostics off, not a CPU tensor, empty, tracing, or fewer than 2 classes). A backend
    may run the probe in its own pass (``CEParams.probe_tol``)."""
    if not _enabled or not input.is_cpu or input.numel() == 0:
        return None
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(input):
        return None
    if class_dim is None:
        class_dim = 0 if input.dim() == 1 else 1
    if input.shape[class_dim] < 2:
        return None
    return _tolerance(input.dtype)


def act_on_probe(input: Tensor, seen: bool | None, tol: float | None) -> None:
    """After a call that asked its backend to probe with tolerance ``tol`` (None: not asked):
    warn when the backend saw probabilities, and probe here when it could not (``seen`` None)."""
    if seen:
        warn_probabilities(input)
    elif seen is None and tol is not None:
        check_probabilities_as_logits(input)


def row_probe_tolerance(dtype: torch.dtype, n_rows: int, n_cls: int) -> float | None:
    """``probe_tolerance`` for ``(n_rows, n_cls)`` CPU logits of ``dtype`` in an eager call
    (the caller checked both)."""
    if not _enabled or n_rows == 0 or n_cls < 2:
        return None
    return _tolerance(dtype)


def looks_like_probabilities(input: Tensor, class_dim: int | None = None) -> bool:
    """The probe itself, on at most ``_SAMPLE_ROWS`` rows (for inputs ``probe_tolerance`` takes)."""
    if class_dim is None:
        class_dim = 0 if input.dim() == 1 else 1
    if _np is not None and input.dtype in _NUMPY_DTYPES and input.dim() <= 2:
        return _looks_like_probabilities_np(input.detach().numpy(), class_dim, input.dtype)
    return _looks_like_probabilities(input, class_dim)


def warn_probabilities(input: Tensor, class_dim: int | None = None) -> None:
    """The warning for ``input`` that the probe found to look like probabilities, once per
    call site (the first frame outside crossent and ``nn.Module``)."""
    if class_dim is None:
        class_dim = 0 if input.dim() == 1 else 1
    level, site = _caller()
    if site in _warned_sites:
        return
    _warned_sites.add(site)
    warnings.warn(
        f"crossent: the input of shape {tuple(input.shape)} looks like probabilities, not logits "
        f"(values in [0, 1] summing to 1 along dim {class_dim}), as if the model ended in softmax. "
        "Remove the softmax from the model's output; cross_entropy applies log-softmax itself "
        "(softmax followed by cross_entropy squashes the loss and its gradients). "
        "Silence with crossent.set_diagnostics(False).",
        ProbabilitiesAsLogitsWarning,
        stacklevel=level,
    )


def _looks_like_probabilities_np(a, class_dim: int, dtype: torch.dtype) -> bool:
    """The same test on a numpy view of a (C,) or (N, C) tensor: numpy's reductions over a few
    rows cost about a microsecond each, torch's several (a small call pays per op)."""
    x = a if a.ndim == 1 else (a[:_SAMPLE_ROWS] if class_dim == 1 else a[:, :_SAMPLE_ROWS])
    row = x if x.ndim == 1 else (x[0] if class_dim == 1 else x[:, 0])
    if not row[:_PREFILTER].min() >= 0.0:  # real logits almost always fail here
        return False
    if not x.min() >= 0.0 or not x.max() <= 1.0:
        return False
    axis = 0 if x.ndim == 1 else class_dim
    sums = x.sum(axis=axis, dtype=_np.float64)
    return bool((abs(sums - 1) <= _tolerance(dtype)).all())


def _looks_like_probabilities(input: Tensor, class_dim: int) -> bool:
    # detach: the probe must not enter the autograd graph. Real logits almost always have a
    # negative entry: one reduction and one read reject them.
    x, axis = _sample_rows(input.detach(), class_dim)
    # First a few thousand values of one row: small enough to stay under torch's threading
    # cutoff (~32K elements), where a reduction costs microseconds, and real logits fail here.
    row = x if x.dim() == 1 else x.select(1 - axis, 0)  # (C,) the first sampled row
    head = row.narrow(0, 0, min(_PREFILTER, row.shape[0]))
    if not float(head.min()) >= 0.0:
        return False
    if not float(x.min()) >= 0.0 or not float(x.max()) <= 1.0:
        return False
    row_sums = x.sum(dim=axis, dtype=torch.float64)  # (r,)
    return bool(((row_sums - 1).abs() <= _tolerance(input.dtype)).all())
