"""autograd.Functions of the vocab-parallel losses: they save gradients made in forward, no math.

The gradient of the local logits is complete after the forward's one collective, so the
backward of :class:`VocabParallelCrossEntropy` only multiplies by the upstream gradient. The
fused linear variant also finishes the weight, bias and input gradients in forward and starts
the input gradient's all-reduce there (asynchronously); backward waits for it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import vocab_parallel as vp
from .autograd import _times_upstream, refuse_double_backward, retained
from .params import CEParams
from ..backends.torch_fused import _rows_per_chunk, acc_dtype, prob_target_grad


def _keep(rows: slice, g: Tensor) -> None:
    """Sink for a gradient made in place in its final buffer."""


def _reduce(out: vp.Result, reduction: str) -> Tensor:
    if reduction == "sum":
        return out.loss.sum()
    if reduction == "mean":
        return out.loss.sum() / out.denominator
    return out.loss


class VocabParallelCrossEntropy(torch.autograd.Function):
    """``(local logits (R, V_local), target, weight (V,), shard, params) -> reduced loss``."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Tensor | None, shard: vp.Shard,
                params: CEParams) -> Tensor:
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None  # (R, V_local)
        step = _rows_per_chunk(logits.shape[0], max(1, logits.shape[1]), logits.device)
        sink, scratch = None, None
        if grad is not None and logits.dtype == acc_dtype(logits.dtype):
            # float32/float64: the gradient buffer holds the first pass's exponentials and
            # becomes the gradient in place (no second exp over the logits)
            sink, scratch = _keep, grad
        elif grad is not None:
            sink = grad.__setitem__  # low precision: recompute per chunk, bounded fp32 temporaries
        out = vp.forward(lambda rows: logits[rows], logits.shape, logits.dtype, target, weight,
                         shard, params, step, sink, scratch)
        ctx.scale, ctx.params = out.scale, params
        # Saved (not a ctx attribute) so the gradient is freed after backward, not with the loss.
        # Probability targets that require grad: d loss / d t = -(1 - eps) w log p, made in
        # backward from the logits and the global M and log S (local: no communication).
        extra = (logits, *out.lse_parts, out.weight_local) if ctx.needs_input_grad[1] else ()
        ctx.save_for_backward(grad, *extra)
        return _reduce(out, params.reduction)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        refuse_double_backward("cross_entropy")
        grad_logits = grad_target = None
        grad, *extra = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            grad_logits = _times_upstream(grad, grad_loss)
        if ctx.needs_input_grad[1]:
            logits, top, log_s, weight_local = extra
            g = prob_target_grad(logits, weight_local, ctx.params, (top, log_s)) * ctx.scale
            grad_target = g * (grad_loss.unsqueeze(1) if grad_loss.dim() else grad_loss)
        return grad_logits, grad_target, None, None, None


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """``(input (R, H), local_weight (V_local, H), bias, target, weight, shard, params) -> loss``.

    For "mean"/"sum" only (a scalar upstream gradient scales every gradient after the fact).
    At most ``chunk`` rows of logits ``(chunk, V_local)`` exist at a time, during forward only;
    what survives to backward is the gradients of input, local weight and bias. One chunk
    (the default when it fits) computes the logits once; several recompute them for the
    gradient pass, since the statistics of all rows must be merged before any gradient.
    """

    @staticmethod
    def forward(ctx, input: Tensor, local_weight: Tensor, bias: Tensor | None, target: Tensor,
                weight: Tensor | None, shard: vp.Shard, params: CEParams, chunk: int) -> Tensor:
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        n_rows, n_local = input.shape[0], local_weight.shape[0]
        acc = acc_dtype(input.dtype)
        scratch = None
        if chunk >= n_rows:  # one chunk: the logits are computed once
            logits = F.linear(input, local_weight, bias)  # (R, V_local)
            if input.dtype == acc and params.softcap is None:
                scratch = logits  # the exponentials, then the gradient, overwrite the logits

            def logits_of(rows: slice) -> Tensor:
                return logits[rows]
        else:

            def logits_of(rows: slice) -> Tensor:  # (r, V_local), computed twice
                return F.linear(input[rows], local_weight, bias)

        # input (R, H), local weight (V_local, H) and bias (V_local,) gradients; the latter two
        # summed over chunks in the accumulation dtype
        grads: list[Tensor | None] = [None, None, None]
        if need_input:
            grads[0] = torch.empty_like(input)

        def sink(rows: slice, g: Tensor) -> None:
            g_low = g.to(input.dtype)  # the matmuls run in the input's dtype, as autograd's would
            if need_input:
                torch.mm(g_low, local_weight, out=grads[0][rows])  # this rank's classes' share
            if need_weight and rows.start == 0:
                grads[1] = (g_low.t() @ input[rows]).to(acc)
            elif need_weight and acc == input.dtype:
                grads[1].addmm_(g_low.t(), input[rows])
            elif need_weight:
                grads[1] += g_low.t() @ input[rows]
            if need_bias:
                grads[2] = g.sum(0) if rows.start == 0 else grads[2] + g.sum(0)

        want = need_input or need_weight or need_bias
        out = vp.forward(logits_of, (n_rows, n_local), input.dtype, target, weight, shard, params,
                         chunk, sink if want else None, scratch if want else None)
        ctx.work = None
        if need_input and shard.distributed:
            # Every rank's share sums to the full input gradient; the all-reduce overlaps with
            # whatever runs before backward.
            ctx.work = dist.all_reduce(grads[0], group=shard.group, async_op=True)
        ctx.grads = [None if g is None else g.to(input.dtype) for g in grads]
        return _reduce(out, params.reduction)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        refuse_double_backward("linear_cross_entropy")
        if ctx.grads is None:
            raise RuntimeError(
                "crossent: backward ran twice through a vocab_parallel_linear_cross_entropy call, "
                "the first time without retain_graph=True; its gradients are made in forward and "
                "were handed to autograd then. Pass retain_graph=True to every backward but the "
                "last, or call it again."
            )
        if ctx.work is not None:
            ctx.work.wait()
            ctx.work = None
        keep = retained()  # copies for the next backward; else released, so that autograd can
        grads = ctx.grads  # take the tensors as .grad without copying them
        if not keep:
            ctx.grads = None
        grads = [None if g is None else _times_upstream(g, grad_loss, keep) for g in grads]
        return (*grads, None, None, None, None, None)


class ReduceGradInput(torch.autograd.Function):
    """Identity in forward; all-reduce (SUM) of the gradient over ``group`` in backward.

    Marks where a replicated tensor enters vocab-parallel computation (Megatron's
    "copy to tensor-parallel region"), for the unfused linear path.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
