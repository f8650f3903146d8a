"""Large CPU output buffers backed by transparent huge pages.

With THP in ``madvise`` mode (the common default) a fresh ``torch.empty`` buffer is faulted in
4 KiB at a time: filling a 1 GiB gradient costs ~0.3 s of page faults, more than the whole
cross-entropy kernel. Advising a 2 MiB-aligned mapping with ``MADV_HUGEPAGE`` faults it in 2 MiB
at a time (measured 4x+ faster on this project's machines; see BENCHMARKS.md), which is what
torch does itself under ``THP_MEM_ALLOC_ENABLE=1``.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import threading
import weakref

import torch

_HUGE_PAGE = 2 << 20
_HAS_MADVISE = hasattr(mmap, "MADV_HUGEPAGE")
# Below this the saving is small and the mapping rounds up to a whole huge page.
HUGE_MIN_BYTES = 8 * _HUGE_PAGE


def empty_huge(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, huge-page backed when large (else ``torch.empty``).

    The tensor views an anonymous mapping. Once every tensor viewing it is freed, the mapping
    joins a small list of free ones (at most ``_CACHE_SLOTS``, the oldest unmapped beyond that),
    so that the next request of a similar size reuses it already faulted in instead of paying
    the page faults again (as torch's CUDA caching allocator does).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_MIN_BYTES or not _HAS_MADVISE:
        return torch.empty(shape, dtype=dtype)
    region = _take_free(nbytes)
    if region is None:
        # One spare huge page lets the tensor start on a 2 MiB boundary (untouched pages cost nothing).
        region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    offset = -start % _HUGE_PAGE
    # The tensor holds this ctypes view of the mapping (not the mapping itself): the view can
    # be watched, and it dies exactly when the last tensor sharing its storage does.
    view = (ctypes.c_char * nbytes).from_buffer(region, offset)
    if _CACHE_SLOTS:
        weakref.finalize(view, _give_back, region)
    region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    return torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(shape)


# Free mappings kept for reuse, most recently freed first: at most this many, at all times, so
# at most that many freed gradients stay resident. CROSSENT_CPU_CACHE=0 turns the cache off
# (every mapping is unmapped when its last tensor is freed).
_CACHE_SLOTS = int(os.environ.get("CROSSENT_CPU_CACHE", "2"))
_free: list[mmap.mmap] = []
# Reentrant: _give_back runs wherever the last tensor of a mapping dies, which may be inside
# this module's own critical section on the same thread.
_lock = threading.RLock()


def _take_free(nbytes: int) -> mmap.mmap | None:
    """Remove and return a free mapping that fits ``nbytes`` without wasting more than a
    quarter of it, or ``None``."""
    with _lock:
        for i, region in enumerate(_free):
            if nbytes <= len(region) - _HUGE_PAGE <= nbytes * 4 // 3:
                return _free.pop(i)
        return None


def _give_back(region: mmap.mmap) -> None:
    """The last tensor viewing ``region`` died: keep it first in the free list, and drop the
    oldest beyond the limit (unmapped as soon as the dying view releases it)."""
    with _lock:
        _free.insert(0, region)
        del _free[_CACHE_SLOTS:]
