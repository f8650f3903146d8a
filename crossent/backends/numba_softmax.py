"""Softmax and log-softmax on CPU, the host side of ``_numba_softmax_kernels``: buffers, the
``(O, C, I)`` view of a contiguous tensor about ``dim``, the thread count, one launch per call.

16-bit floats reach the kernels as their bits: bfloat16 as uint16, float16 as int16 (``LIKE``),
so that the storage format is known at compile time.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from . import _omp_team
from ._cpu_alloc import empty_huge
from ._numba_softmax_kernels import (
    backward_call, backward_units, forward_call, forward_units, width,
)
from . import _numba_threads
from ._numba_threads import _split_rows, parallel_min

# Elements below which outputs are torch.empty_like without asking empty_huge (which falls
# back to torch.empty below 16 MiB itself, after more per-call work).
_HUGE_MIN = 1 << 22
_VIEWS = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}

# Storage element types as the kernels see them (their ``f32`` / ``put`` pick the conversion
# by it): bfloat16 as uint16 bits, float16 as int16 bits; float64 (nll_loss) and index types.
LIKE = {torch.float32: np.empty(0, np.float32), torch.bfloat16: np.empty(0, np.uint16),
        torch.float16: np.empty(0, np.int16), torch.float64: np.empty(0, np.float64),
        torch.int64: np.empty(0, np.int64), torch.uint8: np.empty(0, np.uint8)}


def as_array(t: Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; bfloat16 as uint16 bits, float16 as int16 bits."""
    if t.requires_grad:
        t = t.detach()
    view = _VIEWS.get(t.dtype)
    return (t if view is None else t.view(view)).numpy()


def _dims(shape: torch.Size, dim: int) -> tuple[int, int, int]:
    """``(O, C, I)`` of a contiguous tensor of ``shape`` about ``dim``."""
    if len(shape) == 2 and dim == 1:  # rows: the common call, without two products
        return shape[0], shape[1], 1
    n_cls = shape[dim]
    n_in = math.prod(shape[dim + 1:])
    return math.prod(shape[:dim]), n_cls, n_in


def _on_pool(units_kernel, addresses: tuple, like: np.ndarray, dims: tuple[int, int, int],
             log: bool) -> None:
    """Where torch has no OpenMP team (no libgomp, a forked child), large work runs on the
    pool of Python threads (``_split_rows``), each on its share of work units through
    ``units_kernel`` (``forward_units`` / ``backward_units``: the team's views and bits)."""
    n_out, n_cls, n_in = dims
    units = n_out if n_in == 1 else n_out * -(-n_in // width(n_cls))
    _split_rows(units_kernel, (*addresses, like, *dims, log), units,
                min(torch.get_num_threads(), units))


def _threads(numel: int) -> int:
    """Threads of torch's team for a call of ``numel`` elements; 0: run on the Python pool."""
    if numel < parallel_min():
        return 1
    return torch.get_num_threads() if _omp_team.usable() else 0


def empty(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous CPU tensor: large ones huge-page backed and reused (4x
    cheaper page faults, see ``_cpu_alloc``), small ones plain (less per-call work)."""
    if math.prod(shape) < _HUGE_MIN:
        # sizes as separate arguments: torch parses a torch.Size argument ~0.8 us slower
        return torch.empty(*shape, dtype=dtype) if shape else torch.empty((), dtype=dtype)
    return empty_huge(shape, dtype)


def forward(x: Tensor, dim: int, log: bool) -> Tensor:
    """log_softmax (``log``) or softmax of a contiguous float32/bfloat16/float16 ``x`` along
    ``dim``; the output is contiguous, as torch's."""
    return forward_at(x, x.data_ptr(), LIKE[x.dtype], _dims(x.shape, dim), log)


def forward_at(x: Tensor, xa: int, like: np.ndarray, dims: tuple[int, int, int], log: bool
               ) -> Tensor:
    """``forward`` of ``x`` at address ``xa``, of storage type ``like``, seen as ``(O, C, I)``
    ``dims`` about the dim: for callers that know them (``crossent._core.softmax``'s lane),
    since at (64, 10) each torch call here costs more than the kernel."""
    numel = dims[0] * dims[1] * dims[2]
    out = torch.empty_like(x) if numel < _HUGE_MIN else empty_huge(x.shape, x.dtype)
    if numel == 0:
        return out
    threads = 1 if numel < _numba_threads.PARALLEL_MIN else _threads(numel)  # (no calls)
    if threads:
        forward_call(xa, out.data_ptr(), like, *dims, log, threads)
    else:
        _on_pool(forward_units, (xa, out.data_ptr()), like, dims, log)
    return out


def backward(g: Tensor, out: Tensor, dim: int, log: bool) -> Tensor:
    """Gradient of log_softmax / softmax from the upstream ``g`` and the forward output (both
    contiguous, of one shape and dtype)."""
    return backward_at(g.data_ptr(), out, out.data_ptr(), LIKE[out.dtype], _dims(out.shape, dim),
                       log)


def backward_at(ga: int, out: Tensor, oa: int, like: np.ndarray, dims: tuple[int, int, int],
                log: bool) -> Tensor:
    """``backward`` from the upstream gradient at ``ga`` and ``out`` at ``oa`` (as
    ``forward_at``)."""
    numel = dims[0] * dims[1] * dims[2]
    grad = torch.empty_like(out) if numel < _HUGE_MIN else empty_huge(out.shape, out.dtype)
    if numel == 0:
        return grad
    threads = 1 if numel < _numba_threads.PARALLEL_MIN else _threads(numel)  # (no calls)
    if threads:
        backward_call(ga, oa, grad.data_ptr(), like, *dims, log, threads)
    else:
        _on_pool(backward_units, (ga, oa, grad.data_ptr()), like, dims, log)
    return grad
