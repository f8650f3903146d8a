"""Row blocks of a numba kernel on torch's own OpenMP team.

torch's CPU ops run on an OpenMP team (GNU libgomp on Linux). After each of its parallel
regions the team's threads spin, waiting for the next one, for milliseconds. A kernel handed to
them starts in about a microsecond; a kernel handed to any other thread (a Python pool,
numba's own OpenMP runtime) must wait for the spinning thread's time slice on that core, so on
a machine as wide as torch's team it ran at one thread's speed, and a Python hand-off also
costs ~45 us of thread wake-ups (measured on a 2-core VM).

So a kernel's row blocks are run with ``GOMP_parallel``, the C entry point of every
``#pragma omp parallel`` compiled by GCC, on the runtime torch loaded. The launch is machine
code made by numba (``team_launch`` below, called from one cached ``@njit`` launcher per
kernel): it stores the kernel's arguments on its stack, and each thread of the team reads them
back and runs its share of rows. No Python object is touched off the calling thread.

``AVAILABLE`` is false where no libgomp is found (macOS, Windows, TBB builds of torch): the
entry points are then serial stand-ins (a team of one), so launchers still compile, and callers
pass one thread or use a pool of Python threads (``_numba_threads``) instead.
"""
from __future__ import annotations

import ctypes
import os

import llvmlite.binding as llvm
import torch  # loads the OpenMP runtime this module looks for
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_ENTRY_POINTS = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
_PREFIX = "crossent_"  # the symbols' names in numba's linker: never another library's


def _loaded_libgomp() -> str | None:
    """Path of the libgomp mapped into this process, if any: torch's own copy first (another
    library may have loaded the system's, whose team torch's ops do not use)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.rsplit(None, 1)[-1] for line in maps if "/libgomp" in line}
    except OSError:  # not Linux
        return None
    return _prefer_torch(paths, os.path.dirname(torch.__file__) + os.sep)


def _prefer_torch(paths: set[str], torch_dir: str) -> str | None:
    return min(paths, key=lambda p: (not p.startswith(torch_dir), p), default=None)


_TEAM_ENTRY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_THREAD_QUERY = ctypes.CFUNCTYPE(ctypes.c_int)
# A team of one, for linking where there is no libgomp: GOMP_parallel runs the entry here.
_SERIAL = (
    ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)(
        lambda fn, data, threads, flags: _TEAM_ENTRY(fn)(data)),
    _THREAD_QUERY(lambda: 0),
    _THREAD_QUERY(lambda: 1),
)


def _register() -> bool:
    """Give numba's linker the entry points: libgomp's when loaded, else the serial stand-ins.
    Returns whether they are libgomp's."""
    addresses = None
    path = _loaded_libgomp()
    if path is not None:
        try:
            lib = ctypes.CDLL(path)  # the already-loaded copy: dlopen returns its handle
            addresses = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                         for name in _ENTRY_POINTS]
        except (OSError, AttributeError):
            addresses = None
    found = addresses is not None
    if not found:
        addresses = [ctypes.cast(f, ctypes.c_void_p).value for f in _SERIAL]
    for name, address in zip(_ENTRY_POINTS, addresses):
        llvm.add_symbol(_PREFIX + name, address)
    return found


AVAILABLE = _register()
# libgomp's team is not valid in a forked child: it gets the Python pool. Told by a fork hook,
# not by comparing os.getpid() per call (a system call, ~0.2 us of a small call's budget).
_usable = AVAILABLE


def _forked() -> None:
    global _usable
    _usable = False


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork (and no libgomp)
    os.register_at_fork(after_in_child=_forked)


def usable() -> bool:
    """The team can run a launch in this process."""
    return _usable


_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _omp_call(builder: ir.IRBuilder, name: str) -> ir.Value:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, []), _PREFIX + name)
    return builder.sext(builder.call(fn, []), _I64)


@intrinsic
def _team_place(typingctx):
    """``(this thread's number in the team, the team's size)``."""
    sig = types.UniTuple(types.int64, 2)()

    def codegen(context, builder, sig, args):
        place = [_omp_call(builder, "omp_get_thread_num"), _omp_call(builder, "omp_get_num_threads")]
        return context.make_tuple(builder, sig.return_type, place)

    return sig, codegen


@intrinsic
def team_launch(typingctx, kernel, args, n_rows, threads):
    """Run ``kernel(*args, lo, hi)`` over rows ``0 .. n_rows`` split into ``threads`` contiguous
    blocks, one per thread of the team (the calling thread takes the first); returns when all
    are done. For use in an ``@njit(nogil=True)`` launcher that names ``kernel`` as a global."""
    sig = types.none(kernel, args, n_rows, threads)
    shared_ty = types.Tuple((args, n_rows))
    run = kernel.dispatcher

    def block(shared):  # on each thread of the team
        a, n = shared
        t, k = _team_place()
        lo, hi = n * t // k, n * (t + 1) // k
        if hi > lo:
            run(*a, lo, hi)

    def codegen(context, builder, sig, llargs):
        module = builder.module
        ll_shared = context.get_value_type(shared_ty)
        slot = cgutils.alloca_once(builder, ll_shared)  # lives until GOMP_parallel returns
        builder.store(context.make_tuple(builder, shared_ty, [llargs[1], llargs[2]]), slot)
        # The team's entry: void fn(void *shared), an internal function of this module.
        voidptr = cgutils.voidptr_t
        entry = ir.Function(module, ir.FunctionType(ir.VoidType(), [voidptr]),
                            name=module.get_unique_name("crossent_team_block"))
        entry.linkage = "internal"
        b = ir.IRBuilder(entry.append_basic_block())
        shared = b.load(b.bitcast(entry.args[0], ll_shared.as_pointer()))
        block_sig = types.none(shared_ty)
        # caching=False: compiled per kernel (``block`` has one code object for all kernels)
        cres = context.compile_subroutine(b, block, block_sig, caching=False)
        context.call_internal_no_propagate(b, cres.fndesc, block_sig, [shared])  # never raises
        b.ret_void()
        gomp_ty = ir.FunctionType(ir.VoidType(), [voidptr, voidptr, _I32, _I32])
        gomp = cgutils.get_or_insert_function(module, gomp_ty, _PREFIX + "GOMP_parallel")
        builder.call(gomp, [builder.bitcast(entry, voidptr), builder.bitcast(slot, voidptr),
                            builder.trunc(llargs[3], _I32), ir.Constant(_I32, 0)])
        return context.get_dummy_value()

    return sig, codegen

