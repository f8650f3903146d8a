"""The huge-page buffer cache: a mapping is reused only once no tensor views it."""
from __future__ import annotations

import torch

from crossent.backends import _cpu_alloc


def test_mapping_reused_only_when_free():
    n = 8 << 20  # 32 MiB of float32: above the huge-page threshold
    a = _cpu_alloc.empty_huge((n,), torch.float32)
    a.fill_(1.0)
    view = a[5:]
    ptr = a.data_ptr()
    del a
    b = _cpu_alloc.empty_huge((n,), torch.float32)
    assert b.data_ptr() != ptr, "a live view must keep its mapping out of the cache"
    assert torch.all(view == 1.0)
    del view
    c = _cpu_alloc.empty_huge((n,), torch.float32)
    assert c.data_ptr() == ptr, "a free mapping of the same size is reused"
    assert c.data_ptr() % (2 << 20) == 0  # 2 MiB aligned for huge pages
    small = _cpu_alloc.empty_huge((16,), torch.float32)  # small buffers: plain torch.empty
    assert small.shape == (16,)
    del b, c
    assert len(_cpu_alloc._free) <= _cpu_alloc._CACHE_SLOTS


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_freed_buffers_beyond_the_limit_are_released_at_once():
    """Hold many gradients, free them: at most _CACHE_SLOTS mappings stay resident, right away
    and after further calls that hit the cache (which once never trimmed it)."""
    n = 4 << 20  # 16 MiB of float32 each
    held = [_cpu_alloc.empty_huge((n,), torch.float32).fill_(1.0) for _ in range(8)]
    before_free = _rss_bytes()
    del held
    slots = _cpu_alloc._CACHE_SLOTS
    assert len(_cpu_alloc._free) <= slots
    released = before_free - _rss_bytes()
    assert released >= (8 - slots) * n * 4 * 0.9
    for _ in range(20):  # cache hits
        _cpu_alloc.empty_huge((n,), torch.float32).fill_(2.0)
        assert len(_cpu_alloc._free) <= slots
