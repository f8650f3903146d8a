"""Resolve ``impl=`` to a backend kernel, in one place.

``"auto"`` picks the fastest backend that can run on the tensor's device; an explicit name that
cannot run raises instead of falling back silently.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Callable

from torch import Tensor

from ._autograd import Kernel


def _kernel(module: str) -> Callable[[], Kernel]:
    """Lazy loader: optional dependencies are imported on first use, never at import crossent."""
    name = f"crossent.backends.{module}"
    # sys.modules first: torch.compile can trace a dict lookup but not an import.
    return lambda: (sys.modules.get(name) or importlib.import_module(name)).ce_forward


def _load_triton() -> Kernel:
    # An import statement, which torch.compile runs while tracing (importlib it cannot trace):
    # a compiled first call works before anything imported the backend.
    from .backends import triton

    return triton.ce_forward


def _numba_why_not(t: Tensor) -> str | None:
    return None if t.device.type == "cpu" else f"the numba backend runs on CPU tensors, got {t.device}"


def _triton_why_not(t: Tensor) -> str | None:
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None  # Triton's interpreter runs the kernels on CPU tensors (tests, CI)
    return f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {t.device}"


# name -> (loads the kernel, tells why it cannot run on this tensor or None)
_BACKENDS: dict[str, tuple[Callable[[], Kernel], Callable[[Tensor], str | None]]] = {
    "torch": (_kernel("torch_fused"), lambda t: None),
    "numba": (_kernel("numba_cpu"), _numba_why_not),
    "triton": (_load_triton, _triton_why_not),
}
# Preference order for impl="auto", per device type; "torch" runs everywhere.
_AUTO = {"cpu": ("numba", "torch"), "cuda": ("triton", "torch")}


_OPTIONAL_DEPENDENCY = {"triton": "triton", "numba": "numba"}


def available(name: str) -> bool:
    """Whether backend ``name`` is installed (its optional dependency importable)."""
    dependency = _OPTIONAL_DEPENDENCY.get(name)
    return name in _BACKENDS and (dependency is None or importlib.util.find_spec(dependency) is not None)


def resolve(impl: str, tensor: Tensor) -> Kernel:
    """Return the kernel for ``impl`` on ``tensor``'s device, or raise a clear error."""
    if impl == "auto":
        for name in _AUTO.get(tensor.device.type, ("torch",)):
            loader, why_not = _BACKENDS[name]
            if available(name) and why_not(tensor) is None:
                return loader()
        return _BACKENDS["torch"][0]()
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
