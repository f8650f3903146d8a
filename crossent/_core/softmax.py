"""Softmax and log-softmax over any dim, as autograd.Functions that save only their output.

The work goes to one backend per call (numba on CPU, Triton on CUDA, plain torch elsewhere and
for float64 on CPU, which the float32 numba kernels would not keep exact). Each backend reads the
input once and writes the output once, in forward and in backward, over any ``dim``, without
moving ``dim`` last.
"""
from __future__ import annotations

import functools
import math
import operator
import warnings
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from ..backends import native as _native
from . import composite as _composite
from . import dispatch as _dispatch
from . import validate as _validate
from .autograd import c_apply, fast_apply


def softmax_dim(name: str, ndim: int, dim: int | None) -> int:
    """``dim`` as an int (TypeError for a bool, a float, ...: torch's class), or torch's rule for
    ``dim=None`` (deprecated there too): 0 for 0-, 1- and 3-d input, else 1."""
    if dim is not None:
        if isinstance(dim, bool) or not hasattr(type(dim), "__index__"):
            raise TypeError(f"{name}(): dim must be an int, got {type(dim).__name__} {dim!r}")
        dim = operator.index(dim)
        if not -(1 << 63) <= dim < 1 << 63:  # torch's class for an argument beyond int64
            raise ValueError(f"{name}(): dim={dim} does not fit in a 64-bit integer "
                             "(Overflow when unpacking long long)")
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
    if torch.is_grad_enabled():
        # create_graph=True (a gradient penalty, a Hessian-vector product): the same gradient
        # in torch ops, differentiable, since ``out`` here is this Function's output and its
        # graph; a kernel's result would carry no graph and drop the second derivative.
        return _torch_backward(g, out, ctx.dim, log)
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


class _Plan(NamedTuple):
    """The numba kernels' storage type for a dtype (``numba_softmax.LIKE``) and their two
    entries for callers that know the dims."""

    like: Any
    forward_at: Callable[..., Tensor]
    backward_at: Callable[..., Tensor]


class SoftmaxLane(torch.autograd.Function):
    """``(x, its address, plan, (O, C, I) dims, log) -> out``: log_softmax or softmax of a
    contiguous CPU tensor through the numba kernels (``_lane``). Its own Function: the caller
    knows the dims, the address and the kernels' storage type, so neither direction reads a
    tensor attribute twice (at (64, 10) each torch call costs more than the kernel)."""

    @staticmethod
    def forward(ctx, x: Tensor, xa: int, plan: _Plan, dims: tuple[int, int, int], log: bool
                ) -> Tensor:
        out = plan.forward_at(x, xa, plan.like, dims, log)
        ctx.state = (plan, dims, log, out.data_ptr())
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (out,) = ctx.saved_tensors
        plan, dims, log, oa = ctx.state
        if torch.is_grad_enabled():  # create_graph (see _backward), on the (O, C, I) view
            grad = _torch_backward(g.reshape(dims), out.reshape(dims), 1, log).reshape(out.shape)
        else:
            g = g.contiguous()  # (autograd hands it in the output's dtype)
            grad = plan.backward_at(g.data_ptr(), out, oa, plan.like, dims, log)
        return grad, None, None, None, None


class LogSoftmaxLane(SoftmaxLane):
    """``SoftmaxLane`` for log_softmax (its own class: a graph shows ``LogSoftmaxLaneBackward``)."""


# (impl, dtype, dim, ndim) -> the plan, or None where the lane does not apply (float64, another
# backend); kept once numba is ready.
_PLANS: dict[tuple, _Plan | None] = {}
_LANE_APPLY = {True: c_apply(LogSoftmaxLane), False: c_apply(SoftmaxLane)}  # by ``log``


def _lane(input: Tensor, dim: int, impl: str, log: bool) -> Tensor | None:
    """The common call (contiguous CPU input of a numba format, eager, ``dim`` in range) in
    as few torch calls as it takes; ``None`` for every other call (``apply`` then checks and
    dispatches it)."""
    if torch.compiler.is_compiling():
        return None
    node = _native.module
    if node is not None and impl in _native.IMPLS and not _composite.active():
        # the compiled node (``backends.native``) where a Python node's own cost shows: its lane
        # checks the call in C++
        try:
            out = node.softmax_lane(input, dim, log)
        except TypeError:  # a dim beyond int64: the general path raises torch's error, named
            out = None
        if out is not None:
            return out
    if type(input) is not Tensor or not input.is_cpu:
        return None
    shape = input.shape
    ndim = len(shape)
    if dim < 0:
        dim += ndim  # dim=-1, the usual spelling for class-last logits
    if not 0 <= dim < ndim:
        return None
    key = (impl, input.dtype, dim, ndim)
    plan = _PLANS.get(key, _dispatch.UNPLANNED)
    if plan is _dispatch.UNPLANNED:
        plan = _plan(key, input)
        if node is None and _native.module is not None:  # the plan loaded the compiled node
            return _lane(input, dim, impl, log)
    if plan is None or not input.is_contiguous() or input.is_neg() or _composite.active():
        return None  # (a negative-bit view: see ``_validate.resolved``)
    try:  # (a functorch tensor that escaped its transform has no data: general path)
        xa = input.data_ptr()
    except RuntimeError:
        return None
    if ndim == 2 and dim == 1:
        dims = (shape[0], shape[1], 1)
    else:
        dims = (math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:]))
    # (under no_grad apply records nothing and the output is all forward makes: no detach)
    return _LANE_APPLY[log](input, xa, plan, dims, log)


def _plan(key: tuple, input: Tensor) -> _Plan | None:
    """The plan for ``key``'s calls (CPU input), or None; kept once numba is ready (before,
    ``auto`` runs on torch)."""
    impl, dtype, _, _ = key
    numba = _dispatch.numba_lane(impl, input)
    if numba is None:
        return None
    plan = None
    if numba and dtype in (torch.float32, torch.bfloat16, torch.float16):
        from ..backends import numba_softmax

        _native.load_built()  # (done by the background load unless CROSSENT_BACKGROUND_LOAD=0)

        plan = _Plan(numba_softmax.LIKE[dtype], numba_softmax.forward_at,
                     numba_softmax.backward_at)
    return _dispatch.keep_plan(_PLANS, key, plan)


def apply(run: Callable[..., Tensor], name: str, input: Tensor, dim: int | None,
          dtype: torch.dtype | None, impl: str) -> Tensor:
    """The public ``log_softmax`` / ``softmax`` (``run`` is ``LOG_SOFTMAX`` or ``SOFTMAX``):
    cast, check, 0-d handling, dispatch."""
    if dtype is None and type(dim) is int and isinstance(input, Tensor):
        out = _lane(input, dim, impl, run is LOG_SOFTMAX)
        if out is not None:
            return out
    _validate.check_softmax_args(name, input, dtype)
    input = _validate.resolved(input)
    dtype = _validate.autocast_softmax_dtype(input, dtype)
    if dtype is not None:
        input = input.to(dtype)
    ndim = input.dim()
    # (an in-range int, the usual dim=1 or dim=-1 of 2-d input, needs no call; torch checks
    # the dim before the dtype)
    d = dim if type(dim) is int and 0 <= dim < ndim else wrap_dim(softmax_dim(name, ndim, dim),
                                                                  ndim)
    if not input.is_floating_point():
        if input.numel() == 0:
            return torch.empty_like(input)  # torch's kernel never sees the dtype then
        raise NotImplementedError(
            f"{name} needs a floating-point input, got {input.dtype}: pass input.float() or "
            f"dtype=torch.float32"
        )
    if _composite.active():  # vmap, grad, jvp, ...: elementary ops (``_core.composite``)
        return _composite.log_softmax(input, d if ndim else 0, run is LOG_SOFTMAX)
    if ndim == 0:
        # A single value: torch gives 0 (log_softmax) / 1 (softmax), and NaN for inf or NaN.
        return run(input.reshape(1), 0, backend(impl, input)).reshape(())
    return run(input, d, backend(impl, input))


# The Functions' apply (``fast_apply``): what the public functions pass to ``apply``.
LOG_SOFTMAX, SOFTMAX = fast_apply(LogSoftmax), fast_apply(Softmax)
