"""Large CPU output buffers backed by transparent huge pages.

With THP in ``madvise`` mode (the common default) a fresh ``torch.empty`` buffer is faulted in
4 KiB at a time: filling a 1 GiB gradient costs ~0.3 s of page faults, more than the whole
cross-entropy kernel. Advising a 2 MiB-aligned mapping with ``MADV_HUGEPAGE`` faults it in 2 MiB
at a time (measured 4x+ faster on this project's machines; see BENCHMARKS.md), which is what
torch does itself under ``THP_MEM_ALLOC_ENABLE=1``.
"""
from __future__ import annotations

import math
import mmap

import torch

_HUGE_PAGE = 2 << 20
# Below this the saving is small and the mapping rounds up to a whole huge page.
_MIN_BYTES = 8 * _HUGE_PAGE


def empty_huge(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, huge-page backed when large (else ``torch.empty``).

    The tensor owns its anonymous mapping (``torch.frombuffer`` keeps the ``mmap`` alive), which
    is unmapped when the last tensor viewing it is freed.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < _MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    # One spare huge page lets the tensor start on a 2 MiB boundary (untouched pages cost nothing).
    region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # (nbytes + 2 MiB,) views the mapping
    offset = -raw.data_ptr() % _HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    return raw[offset:offset + nbytes].view(dtype).view(shape)
