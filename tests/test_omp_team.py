"""Kernels split over torch's OpenMP team (``crossent.backends._omp_team``).

Every kernel that is split over threads runs its blocks on the team, or on the pool of Python
threads where the team cannot be used. Blocks hold whole rows (or whole groups of positions),
so any thread count and either runner must give the same bits as one thread.
"""
from __future__ import annotations

import multiprocessing as mp
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from numba import njit  # noqa: E402

import crossent  # noqa: E402
from crossent.backends import _numba_threads, _omp_team, native  # noqa: E402

from ._oracle import index_target, logits  # noqa: E402


@njit(nogil=True, cache=True)
def _mark(count, who, lo, hi):
    """Counts each row it is given and records which thread of the team took it."""
    place = _omp_team._team_place()
    for r in range(lo, hi):
        count[r] += 1
        who[r] = place[0]


@njit(nogil=True, cache=True)
def _mark_team(n_rows, threads, *args):
    _omp_team.team_launch(_mark, args, n_rows, threads)


def test_torch_openmp_runtime_is_found_on_linux():
    """Where torch's ops run on OpenMP (the Linux wheels), the team is its libgomp: a failed
    lookup would silently fall back to the slower pool."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not run on OpenMP here")
    assert _omp_team.AVAILABLE and _omp_team.usable()


def test_torch_copy_of_libgomp_is_preferred():
    """With the system's libgomp also mapped (another library loaded it), the team is torch's."""
    ours = "/site/torch/lib/libgomp-a34b3233.so.1"
    assert _omp_team._prefer_torch({"/usr/lib/libgomp.so.1", ours}, "/site/torch/") == ours
    assert _omp_team._prefer_torch({"/usr/lib/libgomp.so.1"}, "/site/torch/") == "/usr/lib/libgomp.so.1"
    assert _omp_team._prefer_torch(set(), "/site/torch/") is None


@pytest.mark.parametrize("team", [True, False])
@pytest.mark.parametrize("n_rows", [1, 2, 7, 100])
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_every_row_runs_exactly_once(monkeypatch, team, n_rows, threads):
    """Team and pool alike: each row is run once, by one of ``threads`` threads, which split
    the rows in contiguous blocks (the team: thread i takes the i-th block)."""
    if not team:
        monkeypatch.setattr(_omp_team, "usable", lambda: False)
    count = np.zeros(n_rows, np.int64)
    who = np.full(n_rows, -1, np.int64)
    _numba_threads._split_rows(_mark, (count, who), n_rows, min(threads, n_rows), _mark_team)
    assert (count == 1).all()
    if team and _omp_team.usable():
        k = min(threads, n_rows)
        expected = [i for i in range(k) for _ in range(n_rows * i // k, n_rows * (i + 1) // k)]
        assert who.tolist() == expected


def _child(queue):
    count = np.zeros(50, np.int64)
    who = np.zeros(50, np.int64)
    _numba_threads._split_rows(_mark, (count, who), 50, 2, _mark_team)
    queue.put((_omp_team.usable(), count.tolist()))


def test_forked_child_uses_the_pool():
    """libgomp's team is not valid in a forked child: the child runs the split on the pool."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue,))
    proc.start()
    usable, count = queue.get(timeout=120)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert not usable and count == [1] * 50


def _calls(x, t, p):
    """Every public call whose kernels split over threads, fwd+bwd; returns all results."""
    out = []
    for f in (lambda v: crossent.cross_entropy(v, t, reduction="mean"),
              lambda v: crossent.cross_entropy(v, t, reduction="none"),
              lambda v: crossent.cross_entropy(v, p),
              lambda v: crossent.log_softmax(v, 1),
              lambda v: crossent.softmax(v, 1),
              lambda v: crossent.softmax(v, -1),
              lambda v: crossent.nll_loss(v, t)):
        v = x.detach().clone().requires_grad_()
        y = f(v)
        up = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
        (y * up).sum().backward()
        out += [y.detach(), v.grad]
    return out


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), c=st.sampled_from([1, 3, 16, 17, 200]),
       inner=st.sampled_from([(), (5,), (3, 7)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_same_bits_on_any_thread_count_and_runner(monkeypatch, n, c, inner, dtype):
    """Whole calls (rows, few-class rows, K-dim), probability targets, softmax family and
    nll_loss: one thread, 2-3 threads of the team, and 2 threads of the pool agree bit for bit
    (the split threshold is lowered so that these small inputs are split)."""
    gen = torch.Generator().manual_seed(n * 1000 + c)
    shape = (n, c, *inner)
    x = logits(shape, dtype, gen)
    t = index_target(shape, c, gen)
    p = torch.rand(shape, generator=gen).to(dtype)  # probabilities up to a factor: any weights do
    threads = torch.get_num_threads()
    results = []
    try:
        with monkeypatch.context() as m:
            m.setattr(_numba_threads, "PARALLEL_MIN", 1)
            m.setattr(_numba_threads, "POOL_MIN", 1)
            m.setattr(native, "module", None)  # the Python nodes' splits (the compiled node's
            m.setattr(native, "_tried", True)  # one-thread size is its own: test_native)
            for k in (1, 2, 3):
                torch.set_num_threads(k)
                results.append(_calls(x, t, p))
            m.setattr(_omp_team, "usable", lambda: False)
            torch.set_num_threads(2)
            results.append(_calls(x, t, p))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    ref = F.cross_entropy(x.double(), t)  # and they are the loss (not, say, all unwritten)
    torch.testing.assert_close(results[0][0].double(), ref, rtol=2e-2, atol=2e-2, equal_nan=True)


_NO_LIBGOMP = r"""
import builtins, sys
real_open = builtins.open
def no_maps(path, *a, **k):
    if path == "/proc/self/maps":
        raise OSError("not Linux")
    return real_open(path, *a, **k)
builtins.open = no_maps
from crossent.backends import _numba_threads, _omp_team
builtins.open = real_open
import torch, torch.nn.functional as F, crossent
assert not _omp_team.AVAILABLE and not _omp_team.usable()
_numba_threads.PARALLEL_MIN = _numba_threads.POOL_MIN = 1  # split even these small calls
torch.manual_seed(0)
for shape in [(50, 300), (50, 7), (3, 5, 40)]:
    x = torch.randn(shape, requires_grad=True)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    ours = crossent.cross_entropy(x, t, impl="numba")
    ours.backward()
    g, x.grad = x.grad, None
    F.cross_entropy(x, t).backward()
    torch.testing.assert_close(ours, F.cross_entropy(x, t))
    torch.testing.assert_close(g, x.grad)
    torch.testing.assert_close(crossent.log_softmax(x, 1), F.log_softmax(x, 1))
# The serial stand-in for GOMP_parallel runs a launch as a team of one.
import numpy as np
from tests.test_omp_team import _mark, _mark_team
count, who = np.zeros(9, np.int64), np.full(9, -1, np.int64)
_mark_team(9, 2, count, who)
assert (count == 1).all() and (who == 0).all()
print("ok")
"""


def test_without_libgomp_the_entry_points_are_serial_stand_ins():
    """Where torch runs on no libgomp, every launcher still links (against serial stand-ins),
    the whole calls run on one thread and the split kernels on the Python pool, with torch's
    results; a launch forced onto the stand-ins runs every row once."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "CROSSENT_BACKGROUND_LOAD": "0", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", _NO_LIBGOMP], capture_output=True, text=True,
                         env=env, timeout=600, cwd=root)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_calls_from_several_python_threads_at_once(monkeypatch):
    """Each calling thread gets its own OpenMP team (libgomp makes one per master thread):
    concurrent split calls from Python threads give the single-threaded bits."""
    import threading

    monkeypatch.setattr(_numba_threads, "PARALLEL_MIN", 1)
    gen = torch.Generator().manual_seed(7)
    x = logits((300, 500), torch.float32, gen)
    t = index_target((300, 500), 500, gen)
    expected = F.cross_entropy(x, t, reduction="none")
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(crossent.cross_entropy(x, t, reduction="none", impl="numba"))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and len(results) == 60
    first = results[0]
    torch.testing.assert_close(first, expected)
    for r in results[1:]:
        assert torch.equal(r, first)
