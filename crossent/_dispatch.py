"""Resolve ``impl=`` to a backend kernel, in one place.

``"auto"`` picks the fastest backend that can run on the tensor's device; an explicit name that
cannot run raises instead of falling back silently.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

from torch import Tensor

from ._autograd import Kernel


def _torch_kernel() -> Kernel:
    from .backends import torch_fused

    return torch_fused.ce_forward


# name -> (loads the kernel, tells why it cannot run on this tensor or None)
_BACKENDS: dict[str, tuple[Callable[[], Kernel], Callable[[Tensor], str | None]]] = {
    "torch": (_torch_kernel, lambda t: None),
}
# Preference order for impl="auto", per device type.
_AUTO = {"cpu": ("torch",), "cuda": ("torch",)}


def available(name: str) -> bool:
    """Whether backend ``name`` is installed (its optional dependency importable)."""
    module = {"triton": "triton", "numba": "numba"}.get(name)
    return name in _BACKENDS and (module is None or importlib.util.find_spec(module) is not None)


def resolve(impl: str, tensor: Tensor) -> Kernel:
    """Return the kernel for ``impl`` on ``tensor``'s device, or raise a clear error."""
    if impl == "auto":
        for name in _AUTO.get(tensor.device.type, ("torch",)):
            loader, why_not = _BACKENDS[name]
            if available(name) and why_not(tensor) is None:
                return loader()
        return _torch_kernel()
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
