"""Softmax and log-softmax over any dim, as autograd.Functions that save only their output.

The work goes to one backend per call (numba on CPU, Triton on CUDA, plain torch elsewhere and
for float64 on CPU, which the float32 numba kernels would not keep exact). Each backend reads the
input once and writes the output once, in forward and in backward, over any ``dim``, without
moving ``dim`` last.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
from torch import Tensor

from . import dispatch as _dispatch
from .autograd import fast_apply


def softmax_dim(name: str, ndim: int, dim: int | None) -> int:
    """torch's rule for ``dim=None`` (deprecated there too): 0 for 0-, 1- and 3-d input, else 1."""
    if dim is not None:
        return dim
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=4,
    )
    return 0 if ndim in (0, 1, 3) else 1


def wrap_dim(dim: int, ndim: int) -> int:
    """``dim`` in ``[0, ndim)``; torch's IndexError otherwise (a 0-d tensor takes 0 or -1)."""
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {dim}): "
            f"the input has {ndim} dims"
        )
    return dim % n


def backend(impl: str, x: Tensor) -> str:
    """The backend name for ``impl`` on ``x`` (``_dispatch``'s rules: auto picks numba on CPU,
    once loaded, Triton on CUDA, else torch; an explicit backend that cannot run raises)."""
    if impl != "auto":
        _dispatch.resolve_backend(impl, x)  # raises the shared, explicit errors
        return impl
    if torch.compiler.is_compiling():
        return "torch"  # the kernels are not traceable; the torch path fuses under the compiler
    if x.is_cpu:  # no device object made
        return "numba" if _dispatch.available("numba") and _dispatch.ready("numba") else "torch"
    if x.is_cuda and _dispatch.available("triton"):
        return "triton"
    return "torch"


def _acc(x: Tensor) -> Tensor:
    # Half-precision inputs are computed in float32 and rounded once at the end.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _torch_forward(x: Tensor, dim: int, log: bool) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)  # amax rejects an empty dim
    xa = _acc(x)
    # Subtract the max itself, not logsumexp: logsumexp maps a row holding +inf to inf, which
    # would leave -inf where torch's softmax gives NaN for the whole row.
    z = xa - xa.amax(dim, keepdim=True)
    e = z.exp()
    s = e.sum(dim, keepdim=True)
    return (z - s.log() if log else e / s).to(x.dtype)


def _torch_backward(g: Tensor, out: Tensor, dim: int, log: bool) -> Tensor:
    ga, oa = _acc(g), _acc(out)
    if log:
        return (ga - oa.exp() * ga.sum(dim, keepdim=True)).to(g.dtype)
    return (oa * (ga - (ga * oa).sum(dim, keepdim=True))).to(g.dtype)


@functools.lru_cache(maxsize=None)
def _kernels(name: str, dtype: torch.dtype):
    """(forward, backward) of backend ``name`` for ``dtype`` (cached: an import statement in
    the call path costs a small call ~0.5 us each way)."""
    if name == "numba" and dtype != torch.float64:
        from ..backends import numba_softmax

        return numba_softmax.forward, numba_softmax.backward
    if name == "triton":
        from ..backends.triton import softmax as triton_softmax

        return triton_softmax.forward, triton_softmax.backward
    return _torch_forward, _torch_backward


def _forward(ctx, x: Tensor, dim: int, name: str, log: bool) -> Tensor:
    # The kernels index a dense (O, C, I) view: strided input is made contiguous once, as torch's
    # own softmax does (its output is contiguous too); ``dim`` itself is never moved.
    out = _kernels(name, x.dtype)[0](x.contiguous(), dim, log)
    ctx.dim, ctx.name = dim, name
    ctx.save_for_backward(out)
    return out


def _backward(ctx, g: Tensor, log: bool) -> Tensor:
    (out,) = ctx.saved_tensors
    if g.dtype != out.dtype:
        g = g.to(out.dtype)
    return _kernels(ctx.name, out.dtype)[1](g.contiguous(), out, ctx.dim, log)


# Static methods (not one class with a flag): Dynamo inlines autograd.Functions written this way.
class LogSoftmax(torch.autograd.Function):
    """``log_softmax(x)_i = x_i - logsumexp(x)`` along ``dim``; backward ``g - softmax * sum(g)``."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, name: str) -> Tensor:
        return _forward(ctx, x, dim, name, True)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _backward(ctx, g, True), None, None


class Softmax(torch.autograd.Function):
    """``softmax(x)_i = exp(x_i - max) / sum exp(x - max)``; backward ``p * (g - sum(g * p))``."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, name: str) -> Tensor:
        return _forward(ctx, x, dim, name, False)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _backward(ctx, g, False), None, None


def apply(run: Callable[..., Tensor], name: str, input: Tensor, dim: int | None,
          dtype: torch.dtype | None, impl: str) -> Tensor:
    """The public ``log_softmax`` / ``softmax`` (``run`` is ``LOG_SOFTMAX`` or ``SOFTMAX``):
    cast, check, 0-d handling, dispatch."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}(): input must be a torch.Tensor, got {type(input).__name__}")
    if dtype is not None:
        input = input.to(dtype)
    if not input.is_floating_point():
        raise NotImplementedError(
            f"{name} needs a floating-point input, got {input.dtype}: pass input.float() or "
            f"dtype=torch.float32"
        )
    ndim = input.dim()
    # (an in-range int, the usual dim=1 or dim=-1 of 2-d input, needs no call)
    d = dim if type(dim) is int and 0 <= dim < ndim else wrap_dim(softmax_dim(name, ndim, dim),
                                                                  ndim)
    if ndim == 0:
        # A single value: torch gives 0 (log_softmax) / 1 (softmax), and NaN for inf or NaN.
        return run(input.reshape(1), 0, backend(impl, input)).reshape(())
    return run(input, d, backend(impl, input))


# The Functions' apply (``fast_apply``): what the public functions pass to ``apply``.
LOG_SOFTMAX, SOFTMAX = fast_apply(LogSoftmax), fast_apply(Softmax)
