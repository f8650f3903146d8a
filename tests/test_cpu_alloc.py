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
    assert len(_cpu_alloc._cache) <= max(_cpu_alloc._CACHE_SLOTS, 2)
