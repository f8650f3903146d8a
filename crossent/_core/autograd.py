"""autograd.Function wrapping a backend kernel: it saves the gradient the forward made, no math.

The Function returns the *reduced* loss (a scalar for "mean"/"sum", ``(R,)`` for "none"),
because the kernel already folded the reduction's scale (1 / denominator for "mean") into the
gradient: backward then only multiplies by the upstream gradient, and skips even that when
the upstream gradient is exactly 1 (the usual ``loss.backward()``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .params import CEParams

_C_APPLY = torch._C._FunctionBase.__dict__["apply"]  # the C entry behind Function.apply
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_keep_graph = torch._C._autograd._get_current_graph_task_keep_graph


def retained() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``; traced backward
    counts as kept). A gradient made in forward and saved is then handed out as a copy: the
    caller may change what it gets in place (clipping, a hook), and the next backward must still
    read the saved one, as torch's own backward, which returns a fresh tensor each time. Without
    it autograd frees the saved tensor after this backward, so backward hands out the buffer."""
    return torch.compiler.is_compiling() or _keep_graph()


def c_apply(cls: type[torch.autograd.Function]) -> Callable[..., Any]:
    """The C entry behind ``cls.apply``: for eager calls (``eager``) of Functions without
    ``setup_context``, whose ``apply`` then only adds the Python prologue ``fast_apply``
    describes."""
    return _C_APPLY.__get__(None, cls)


def eager(*tensors: Tensor) -> bool:
    """Whether a call on ``tensors`` may take ``c_apply``: not traced, no functorch transform
    active, and none of them a functorch tensor that escaped its transform."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    for a in tensors:
        if type(a) is Tensor and _wrapped(a):
            return False
    return True


def fast_apply(cls: type[torch.autograd.Function]) -> Callable[..., Any]:
    """``cls.apply`` without its Python prologue in eager calls, same result.

    ``Function.apply`` binds default arguments (only for Functions with ``setup_context``,
    which keep it), routes functorch transforms (vmap, grad, ...) to their own
    machinery, and maps every argument through a pytree to unwrap functorch tensors that
    escaped their transform: ~1.4 us a call at 6 arguments, a tenth of a (64, 10) forward.
    The C entry does the rest of the work. Eager calls (``eager``) take it; the others, and
    every traced call (Dynamo inlines ``cls.apply``), go through ``cls.apply``."""
    apply = cls.apply
    if torch.autograd.function._is_setup_context_defined(cls.setup_context):
        return apply  # its apply binds default arguments first
    entry = c_apply(cls)

    def run(*args: Any) -> Any:
        return entry(*args) if eager(*args) else apply(*args)

    run.__doc__ = f"``{cls.__name__}.apply``, through ``fast_apply``."
    return run

Kernel = Callable[..., tuple[Tensor, Tensor, "Tensor | None"]]  # ce_forward
Call = Callable[..., tuple[Tensor, Tensor, "Tensor | None", "Tensor | float", "bool | None"]]


class CrossEntropyFunction(torch.autograd.Function):
    """``(logits (R, C), target, weight) -> (reduced loss, lse (R,) or None when
    ``params.want_lse`` is false, probs)`` through a
    backend's whole-call ``cross_entropy`` (``crossent.backends``), which folds the reduction's
    scale into the gradient it makes in forward; ``probs`` is the backend's misuse-probe verdict
    (a bool, or None when it did not probe), passed through for the public layer. The loss is
    cast to ``out_dtype`` here, where autograd does not record it: a cast outside would add a
    node to every backward (~3 us at (64, 10) bfloat16)."""

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        params: CEParams,
        call: Call,
        out_dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor, bool | None]:
        loss, lse, grad, scale, probs = call(logits, target, weight, ctx.needs_input_grad[0],
                                             params)
        if loss.dtype != out_dtype:
            loss = loss.to(out_dtype)
        if grad is not None and params.inplace_backward:
            # The logits now hold the gradient: any other autograd node that saved them must
            # fail loudly on backward instead of silently reading the gradient.
            torch.autograd.graph.increment_version(logits)
        ctx.state = (params, scale)  # one attribute: each costs a small call ~0.1 us
        # Saved tensors (not ctx attributes) are freed right after backward, so the (R, C)
        # gradient does not live on as long as the loss does; and an in-place gradient that
        # backward has scaled fails the version check on a second backward instead of being
        # reused. Probability targets that require grad also need the logits: d loss /
        # d target needs log p, recomputed in backward (never stored as (R, C) in forward).
        extra = (logits, weight) if ctx.needs_input_grad[1] else ()
        ctx.save_for_backward(grad, *extra)
        if not params.want_lse:  # one tensor output less for apply to wrap (~0.8 us a call)
            return loss, None, probs
        ctx.mark_non_differentiable(lse)
        return loss, lse, probs

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_lse: Tensor | None, _grad_probs: None):
        refuse_double_backward("cross_entropy")
        grad_logits = grad_target = None
        grad, *extra = ctx.saved_tensors
        params, scale = ctx.state
        needs = ctx.needs_input_grad
        if needs[0]:
            grad_logits = _times_upstream(grad, grad_loss)
        if needs[1]:
            from ..backends.torch_fused import prob_target_grad

            logits, weight = extra
            g = prob_target_grad(logits, weight, params) * scale
            grad_target = g * (grad_loss.unsqueeze(1) if grad_loss.dim() else grad_loss)
        return grad_logits, grad_target, None, None, None, None


class CrossEntropyLane(torch.autograd.Function):
    """``(logits (R, C), target (R,), launch, their addresses, R) -> (0-d loss, probs)`` for
    ``crossent._core.lane``'s calls, through a backend's ``lane_launch`` (the loss made and
    its gradient scaled in forward, as ``CrossEntropyFunction``). Its own Function, not that
    one: a lane call's loss is a CPU scalar of the logits' dtype, so backward only reads the
    upstream factor, and neither direction carries options it does not use (each step here is
    paid by every small call)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, launch: Callable, xa: int, ta: int,
                n_rows: int) -> tuple[Tensor, bool]:
        loss, grad, probs = launch(logits, target, xa, ta, n_rows, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)  # freed after backward (see CrossEntropyFunction)
        return loss, probs

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_probs: None):
        refuse_double_backward("cross_entropy")
        grad, = ctx.saved_tensors
        # grad_loss is a CPU scalar of grad's dtype (autograd checks it against the loss)
        if torch.compiler.is_compiling() or grad_loss.item() != 1.0:
            grad = grad * grad_loss
        elif _keep_graph():  # retain_graph: a copy (see ``retained``)
            grad = grad.clone()
        return grad, None, None, None, None, None


def refuse_double_backward(name: str) -> None:
    """Raise when a backward runs with ``create_graph=True`` (grad mode is on only then).

    The gradient these Functions return was made in forward as a constant: differentiating it
    again would silently give a wrong second derivative (MAML inner steps, gradient penalties).
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"crossent.{name} does not support double backward (create_graph=True, e.g. "
            "torch.autograd.grad(..., create_graph=True) for MAML or a gradient penalty): its "
            "gradient is computed in forward by a fused kernel and is not differentiable. Use "
            f"torch.nn.functional.{name} for higher-order gradients."
        )


def _times_upstream(grad: Tensor, upstream: Tensor, keep: bool | None = None) -> Tensor:
    """The saved gradient times the upstream gradient (scalar, or one value per row).

    Unless the graph is kept (``keep``, by default ``retained()``: then a new tensor), the
    gradient is the Function's own buffer, freed after this backward, and is scaled in place:
    no second ``(R, C)`` buffer.
    On CUDA (eager) a scalar factor is read by a Triton kernel on the device, which touches
    nothing when it is 1 (the usual ``loss.backward()``): no host sync and no pass over the
    gradient. Elsewhere a host read of a CPU scalar is free.
    """
    if retained() if keep is None else keep:
        return grad.clone() if is_one(upstream) else grad * _per_row(upstream.to(grad.dtype), grad)
    if grad.is_cuda:
        if upstream.dim() == 0 and _scale_on_device(grad, upstream):
            return grad
        return grad.mul_(_per_row(upstream.to(grad.dtype), grad))
    if is_one(upstream):
        return grad
    return grad.mul_(_per_row(upstream.to(grad.dtype), grad))


def is_one(upstream: Tensor) -> bool:
    """Whether ``upstream`` is a CPU scalar 1 (read on the host only where that is free)."""
    return (upstream.dim() == 0 and upstream.is_cpu and not torch.compiler.is_compiling()
            and upstream.item() == 1.0)


def _per_row(factor: Tensor, grad: Tensor) -> Tensor:
    """A scalar factor as is; one per row broadcast over the class dim of ``grad``: ``(R, 1)``
    for ``(R, C)``, ``(N, 1, S)`` for K-dimensional ``(N, C, S)`` (rows in ``(n, s)`` order)."""
    if factor.dim() == 0:
        return factor
    if grad.dim() == 3:
        return factor.reshape(grad.shape[0], 1, grad.shape[2])
    return factor.unsqueeze(1)


def _scale_on_device(grad: Tensor, factor: Tensor) -> bool:
    """``grad *= factor`` by the Triton kernel when Triton is importable and the layout fits."""
    try:
        from ..backends.triton.scale import scale_inplace
    except ImportError:
        return False
    return scale_inplace(grad, factor.to(grad.device))
