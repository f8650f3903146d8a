"""Resolve ``impl=`` to a backend kernel, in one place.

``"auto"`` picks the fastest backend that can run on the tensor's device; an explicit name that
cannot run raises instead of falling back silently.
"""
from __future__ import annotations

import importlib.util
import os
import threading
from contextvars import ContextVar
from types import ModuleType
from typing import Any, Callable

import torch
from torch import Tensor

from .autograd import Kernel


# Loaders use import statements: torch.compile runs those while tracing (importlib it cannot),
# and optional dependencies are still imported only on first use, never at ``import crossent``.
# Each returns the backend module (its contract: ``crossent.backends``).
def _load_torch() -> ModuleType:
    from ..backends import torch_fused

    return torch_fused


def _load_numba() -> ModuleType:
    from ..backends import numba_cpu

    return numba_cpu


def _load_triton() -> ModuleType:
    from ..backends import triton

    return triton


def _numba_why_not(t: Tensor) -> str | None:
    if torch.compiler.is_compiling() and not hasattr(torch.library, "custom_op"):
        # The kernel enters compiled graphs as a custom op (torch >= 2.4); older torch cannot
        # trace numba, and auto then uses the traceable torch path.
        return ("torch.compile on torch < 2.4 cannot call numba kernels: use impl='torch' or "
                "'auto' when compiling")
    return None if t.device.type == "cpu" else f"the numba backend runs on CPU tensors, got {t.device}"


def _triton_why_not(t: Tensor) -> str | None:
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None  # Triton's interpreter runs the kernels on CPU tensors (tests, CI)
    return f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {t.device}"


# name -> (loads the kernel, tells why it cannot run on this tensor or None)
_BACKENDS: dict[str, tuple[Callable[[], ModuleType], Callable[[Tensor], str | None]]] = {
    "torch": (_load_torch, lambda t: None),
    "numba": (_load_numba, _numba_why_not),
    "triton": (_load_triton, _triton_why_not),
}
# Preference order for impl="auto", per device type; "torch" runs everywhere.
_AUTO = {"cpu": ("numba", "torch"), "cuda": ("triton", "torch")}


# Looked up once at import (a path search, nothing imported): torch.compile cannot trace find_spec.
_INSTALLED = {
    "torch": True,
    **{dep: importlib.util.find_spec(dep) is not None for dep in ("numba", "triton")},
}


def available(name: str) -> bool:
    """Whether backend ``name`` is installed (its optional dependency importable)."""
    return _INSTALLED.get(name, False)


# Set by ``crossent.stats`` for the duration of one ``*_with_stats`` call: an object whose
# ``wrap(kernel)`` returns a kernel that also asks for per-row statistics. A hook here, rather
# than one more argument through every public function and autograd Function, serves both the
# plain and the linear loss with the kernel pass they already make.
stats_sink: ContextVar[Any] = ContextVar("crossent_stats_sink", default=None)


def resolve(impl: str, tensor: Tensor) -> Kernel:
    """Return the kernel for ``impl`` on ``tensor``'s device, or raise a clear error."""
    return observed(resolve_backend(impl, tensor).ce_forward)


def observed(kernel: Kernel) -> Kernel:
    """``kernel``, or inside a ``*_with_stats`` call the kernel that also fills statistics."""
    if torch.compiler.is_compiling():
        return kernel  # the *_with_stats functions are eager-only (they refuse compilation)
    sink = stats_sink.get()
    return kernel if sink is None else sink.wrap(kernel)


def whole_call(impl: str, tensor: Tensor) -> Callable[..., Any]:
    """The whole-call ``cross_entropy`` of the backend ``impl`` resolves to on ``tensor``
    (``resolve_backend``), or inside a ``*_with_stats`` call the same contract composed from
    that backend's row kernel (``reduced``), which is the one that fills statistics."""
    backend = resolve_backend(impl, tensor)
    if torch.compiler.is_compiling() or stats_sink.get() is None:  # (Dynamo cannot trace .get)
        return backend.cross_entropy
    from ..backends._reduced import reduced

    return reduced(observed(backend.ce_forward), backend.index_target_sums)


def settled_backend(impl: str) -> ModuleType | None:
    """The backend whose ``cross_entropy`` ``whole_call(impl, t)`` returns for every eager CPU
    tensor ``t`` outside a ``*_with_stats`` call, once ``resolve_backend`` has settled it
    (cached below); else None."""
    return _RESOLVED.get((impl, "cpu", None))


def numba_lane(impl: str, tensor: Tensor) -> bool | None:
    """Whether a lane (the common call of ``softmax``/``nll_loss``) with ``impl`` on the CPU
    ``tensor`` runs the numba kernels: True (numba is loaded; ``numba``'s explicit errors are
    raised here), False (another backend: the lane does not apply), or None while ``auto``
    waits for numba to load (the lane then keeps no plan: ``auto`` runs on torch until it is
    ready)."""
    if impl not in ("auto", "numba"):
        return False
    if impl == "auto" and not (available("numba") and ready("numba")):
        return None
    resolve_backend(impl, tensor)
    return True


def keep_plan(plans: dict, key: tuple, plan: Any) -> Any:
    """Store a lane's ``plan`` under ``key`` unless ``plans`` holds ``MAX_PLANS`` already (a
    caller that varies an option every call would grow it without end); returns ``plan``."""
    if len(plans) < MAX_PLANS:
        plans[key] = plan
    return plan


MAX_PLANS = 64
UNPLANNED = object()  # a lane's "no plan for this key yet" (None is the plan "not taken")


# (impl, device type) -> backend, for eager calls: resolving imports modules and asks each
# backend whether it can run, a few microseconds that a small call should not pay every time.
_RESOLVED: dict[tuple[str, str, str | None], ModuleType] = {}


def resolve_backend(impl: str, tensor: Tensor) -> ModuleType:
    """Return the backend module for ``impl`` on ``tensor``'s device, or raise a clear error."""
    if torch.compiler.is_compiling():
        return _resolve(impl, tensor)
    # TRITON_INTERPRET decides only whether Triton runs on CPU tensors: tests set it per process.
    device = "cpu" if tensor.is_cpu else tensor.device.type  # is_cpu: no device object made
    key = (impl, device, os.environ.get("TRITON_INTERPRET") if impl == "triton" else None)
    backend = _RESOLVED.get(key)
    if backend is None:
        backend = _resolve(impl, tensor)
        if impl != "auto" or device != "cpu" or ready("numba"):
            # (not the torch stand-in that runs while numba loads)
            _RESOLVED[key] = backend
    return backend


# numba's import and first cache load take about half a second (LLVM's start, and numba
# importing scipy to look for BLAS), a hundred times torch's first call. ``impl="auto"`` loads
# it on a background thread and runs the torch backend (the same maths, in torch ops) until it
# is ready, so the first calls of a process cost what torch's do. CROSSENT_BACKGROUND_LOAD=0
# loads it in the first call instead (and makes "auto" pick numba from the first call on).
_BACKGROUND_LOAD = os.environ.get("CROSSENT_BACKGROUND_LOAD", "1").strip().lower() not in (
    "0", "false", "off", "no")
_loader: tuple[int, threading.Thread] | None = None  # (process id, thread) of the load
_loader_lock = threading.Lock()
_loaded = False  # set by the load when it ends; a forked child inherits a finished load


def ready(name: str, wait: bool = False) -> bool:
    """Whether ``impl="auto"`` may pick backend ``name`` now. For numba this starts the
    background load on first asking (once per process) and is False until it has finished;
    ``wait`` waits for it instead."""
    global _loader
    if (_loaded or name != "numba" or not _BACKGROUND_LOAD or not available("numba")
            or torch.compiler.is_compiling()):
        return True
    with _loader_lock:
        if _loader is None or _loader[0] != os.getpid():  # a forked child loads its own
            # daemon: a short script exits without waiting for a load it no longer needs (numba
            # writes its cache files whole, by rename).
            thread = threading.Thread(target=_load_numba_kernels, name="crossent-numba-load",
                                      daemon=True)
            if _loader is None and hasattr(os, "register_at_fork"):
                os.register_at_fork(before=_finish_load)
            _loader = (os.getpid(), thread)
            thread.start()
        thread = _loader[1]
    if wait:
        thread.join()
    return not thread.is_alive()


def _finish_load() -> None:
    """Before a fork: let a running load finish. A child forked in the middle of it would
    inherit a half-imported numba (module locks held by a thread it does not have) and a
    half-initialised LLVM, and hang or crash on its first numba call (DataLoader workers)."""
    loader = _loader
    if (loader is not None and loader[0] == os.getpid() and loader[1].is_alive()
            and threading.current_thread() is not loader[1]):
        loader[1].join()


def _load_numba_kernels() -> None:
    """The background load: numba, the backend, and the kernels' cached machine code. A
    failure is left for the first call that names numba to raise (it loads again there)."""
    global _loaded
    try:
        _load_numba().warm_up()
        from ..backends import native

        native.load_built()  # the compiled nodes, if `crossent build` made them (no compile)
    except Exception:  # noqa: BLE001 - reported by the foreground load, not lost in a thread
        pass
    _loaded = True


def backend_name(impl: str, tensor: Tensor) -> str:
    """The name (``"torch"``, ``"numba"``, ``"triton"``) of the backend ``impl`` resolves to
    (once every backend has loaded)."""
    ready("numba", wait=True)
    backend = resolve_backend(impl, tensor)
    return next(name for name, (loader, _) in _BACKENDS.items() if loader() is backend)


def _resolve(impl: str, tensor: Tensor) -> ModuleType:
    if impl == "auto":
        for name in _AUTO.get(tensor.device.type, ("torch",)):
            loader, why_not = _BACKENDS[name]
            if available(name) and why_not(tensor) is None and ready(name):
                return loader()
        return _load_torch()
    if impl not in _BACKENDS:
        raise ValueError(f"impl={impl!r} is not a crossent backend; choose one of "
                         f"{', '.join(repr(n) for n in ['auto', *_BACKENDS])}")
    loader, why_not = _BACKENDS[impl]
    if not available(impl):
        raise RuntimeError(f"impl={impl!r} needs an optional dependency: pip install 'crossent[{impl}]'")
    reason = why_not(tensor)
    if reason is not None:
        raise RuntimeError(f"impl={impl!r} cannot run here: {reason}")
    return loader()
