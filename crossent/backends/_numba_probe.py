"""The probabilities-as-logits probe (``crossent._core.diagnostics``) inside the numba backend.

The whole-call kernels look at the same sampled rows as the Python probe while they hold the
logits anyway, so the softmax-before-the-loss warning costs a few hundred values' reads instead
of several torch or numpy reductions per call. The verdict is the Python probe's: every sampled
value in ``[0, 1]`` (NaN fails) and every sampled row summing to 1 within ``tol``, summed in
float64; the first value outside ``[0, 1]`` ends the look (real logits fail at once).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .._core.diagnostics import _SAMPLE_ROWS as SAMPLE_ROWS  # the Python probe's row count
from ._numba_kdim import to_f32


@njit(nogil=True, cache=True)
def _is_distribution(row, fmt, tol):
    """Every value of the 1-d ``row`` in ``[0, 1]`` (NaN fails) and their float64 sum within
    ``tol`` of 1; the first value outside ends the look."""
    total = 0.0
    for c in range(row.size):
        v = to_f32(row[c], fmt)
        if not (v >= 0.0 and v <= 1.0):
            return False
        total += np.float64(v)
    return abs(total - 1.0) <= tol


@njit(nogil=True, cache=True)
def probe_rows(x, fmt, tol):
    """Whether the first rows of ``x`` ``(R, C)`` look like softmax output (``C >= 2``)."""
    n_rows, n_cls = x.shape
    if n_cls < 2 or n_rows == 0:
        return False
    for r in range(min(SAMPLE_ROWS, n_rows)):
        if not _is_distribution(x[r], fmt, tol):
            return False
    return True


@njit(nogil=True, cache=True)
def probe_positions(x, fmt, tol):
    """The same for K-dimensional ``x`` ``(N, C, S)``: the first positions of sample 0, each a
    row of ``C`` values at stride ``S``."""
    n, n_cls, n_in = x.shape
    if n_cls < 2 or n * n_in == 0:
        return False
    for s in range(min(SAMPLE_ROWS, n_in)):
        if not _is_distribution(x[0, :, s], fmt, tol):
            return False
    return True
