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
import os
import sys
import threading

import torch

_HUGE_PAGE = 2 << 20
# Below this the saving is small and the mapping rounds up to a whole huge page.
_MIN_BYTES = 8 * _HUGE_PAGE


def empty_huge(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, huge-page backed when large (else ``torch.empty``).

    The tensor views an anonymous mapping from a small cache (see ``_cached_region``): once every
    tensor viewing a mapping is freed, the next request of a similar size reuses it, already
    faulted in, instead of paying the page faults again (as torch's CUDA caching allocator does).
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < _MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    region = _cached_region(nbytes) if _CACHE_SLOTS else None
    if region is None:
        # One spare huge page lets the tensor start on a 2 MiB boundary (untouched pages cost nothing).
        region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if _CACHE_SLOTS:
            _remember(region)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # (len(region),) views the mapping
    offset = -raw.data_ptr() % _HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    return raw[offset:offset + nbytes].view(dtype).view(shape)


# Mappings kept for reuse: at most this many, so at most that many gradients stay resident after
# they are freed. CROSSENT_CPU_CACHE=0 turns the cache off (every buffer is unmapped when freed).
_CACHE_SLOTS = int(os.environ.get("CROSSENT_CPU_CACHE", "2"))
_cache: list[mmap.mmap] = []
_lock = threading.Lock()


def _free(i: int) -> bool:
    # Only the cache's own reference (and getrefcount's argument): no tensor views the mapping.
    return sys.getrefcount(_cache[i]) <= 2


def _cached_region(nbytes: int) -> mmap.mmap | None:
    """A free cached mapping that fits ``nbytes`` without wasting more than a quarter of it."""
    with _lock:
        for i in range(len(_cache)):
            size = len(_cache[i]) - _HUGE_PAGE
            if nbytes <= size <= nbytes * 4 // 3 and _free(i):
                _cache.insert(0, _cache.pop(i))  # most recently used first
                return _cache[0]
        return None


def _remember(region: mmap.mmap) -> None:
    """Cache ``region`` (most recent first), dropping the oldest free mappings beyond the limit."""
    with _lock:
        _cache.insert(0, region)
        for i in range(len(_cache) - 1, _CACHE_SLOTS - 1, -1):
            if _free(i):
                del _cache[i]
