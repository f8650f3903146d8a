"""Row blocks of a numba kernel on the CPU's threads.

Shared by every numba kernel (rows, K-dim blocks, softmax, nll). Each kernel that is split has
a launcher compiled with ``_omp_team.team_launch`` that runs the blocks on torch's own OpenMP
team; without that runtime (or in a forked child) a pool of sleeping Python threads runs them
(the kernels release the GIL).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import _omp_team

# Elements below which one thread beats splitting. On torch's OpenMP team a split costs a few
# microseconds (measured fwd+bwd on 2 cores: (64, 1000) 62 -> 48 us, (32, 1000) 47 -> 48 us,
# (16, 10, 32, 32) 196 -> 130 us); a Python pool's hand-off cost ~45 us, so without the team the
# split starts at 512K elements ((256, 1000): 150 us on one thread, 195 us over two).
PARALLEL_MIN = 1 << 14
POOL_MIN = 1 << 19
_pool: ThreadPoolExecutor | None = None
_pool_key = (0, 0)  # (process id, workers): a forked child must not reuse its parent's threads
_pool_lock = threading.Lock()


def parallel_min() -> int:
    """Elements from which a kernel's rows are split over threads (team or pool)."""
    return PARALLEL_MIN if _omp_team.usable() else POOL_MIN


def threads(work: int, units: int) -> int:
    """Threads for ``work`` elements in ``units`` blocks: torch's thread count (at most one a
    block) from ``parallel_min()`` on, else one."""
    return 1 if work < parallel_min() else min(torch.get_num_threads(), units)


def team_threads(work: int, units: int) -> int:
    """Threads of torch's OpenMP team for a launch that splits its blocks itself: one where
    the team is not usable (such callers split large work with ``_split_rows`` instead)."""
    return 1 if work < PARALLEL_MIN or not _omp_team.usable() else min(torch.get_num_threads(), units)


def _split_rows(kernel, args: tuple, n_rows: int, n_threads: int, team=None) -> None:
    """Run ``kernel(*args, lo, hi)`` on ``n_threads`` contiguous row blocks at once; ``team`` is
    the kernel's OpenMP launcher, ``team(n_rows, n_threads, *args)``.

    Not numba's own OpenMP layer: a second OpenMP runtime next to torch's spins between calls,
    and on a 2-core machine the two runtimes' spinning threads slowed each other (and torch's own
    ops) several-fold.
    """
    global _pool, _pool_key
    if n_threads == 1:
        kernel(*args, 0, n_rows)
        return
    if team is not None and _omp_team.usable():
        team(n_rows, n_threads, *args)
        return
    bounds = [n_rows * i // n_threads for i in range(n_threads + 1)]
    with _pool_lock:
        if _pool is None or _pool_key[0] != os.getpid() or _pool_key[1] < n_threads - 1:
            _pool_key = (os.getpid(), n_threads - 1)
            _pool = ThreadPoolExecutor(n_threads - 1, thread_name_prefix="crossent-numba")
        pool = _pool
    futures = [pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, n_threads)]
    kernel(*args, bounds[0], bounds[1])  # the calling thread takes the first block
    for f in futures:
        f.result()
