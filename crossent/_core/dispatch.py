"""Resolve ``impl=`` to a backend kernel, in one place.

``"auto"`` picks the fastest backend that can run on the tensor's device; an explicit name that
cannot run raises instead of falling back silently.
"""
from __future__ import annotations

import importlib.util
import os
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


def whole_call(backend: ModuleType) -> Callable[..., Any]:
    """``backend.cross_entropy``, or inside a ``*_with_stats`` call the same contract composed
    from the backend's row kernel (``reduced``), which is the one that fills statistics."""
    if torch.compiler.is_compiling() or stats_sink.get() is None:
        return backend.cross_entropy
    from ..backends._reduced import reduced

    return reduced(observed(backend.ce_forward), backend.index_target_sums)


# (impl, device type) -> backend, for eager calls: resolving imports modules and asks each
# backend whether it can run, a few microseconds that a small call should not pay every time.
_RESOLVED: dict[tuple[str, str, str | None], ModuleType] = {}


def resolve_backend(impl: str, tensor: Tensor) -> ModuleType:
    """Return the backend module for ``impl`` on ``tensor``'s device, or raise a clear error."""
    if torch.compiler.is_compiling():
        return _resolve(impl, tensor)
    key = (impl, tensor.device.type, os.environ.get("TRITON_INTERPRET"))
    backend = _RESOLVED.get(key)
    if backend is None:
        backend = _RESOLVED[key] = _resolve(impl, tensor)
    return backend


def backend_name(impl: str, tensor: Tensor) -> str:
    """The name (``"torch"``, ``"numba"``, ``"triton"``) of the backend ``impl`` resolves to."""
    backend = resolve_backend(impl, tensor)
    return next(name for name, (loader, _) in _BACKENDS.items() if loader() is backend)


def _resolve(impl: str, tensor: Tensor) -> ModuleType:
    if impl == "auto":
        for name in _AUTO.get(tensor.device.type, ("torch",)):
            loader, why_not = _BACKENDS[name]
            if available(name) and why_not(tensor) is None:
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
