"""autograd.Functions of the vocab-parallel losses: they save gradients made in forward, no math.

The gradient of the local logits is complete after the forward's one collective, so the
backward of :class:`VocabParallelCrossEntropy` only multiplies by the upstream gradient. The
fused linear variant also finishes the weight, bias and input gradients in forward and starts
the input gradient's all-reduce there (asynchronously); backward waits for it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import _vocab_parallel as vp
from ._autograd import _times_upstream
from ._params import CEParams
from .backends.torch_fused import prob_target_grad


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
        out = vp.forward(logits, target, weight, shard, params, want_grad=ctx.needs_input_grad[0])
        ctx.grad, ctx.scale, ctx.params = out.grad, out.scale, params
        if ctx.needs_input_grad[1]:
            # Probability targets that require grad: d loss / d t = -(1 - eps) w log p, made
            # in backward from the logits and the global lse (local: no communication).
            ctx.save_for_backward(logits, out.lse, out.weight_local)
        return _reduce(out, params.reduction)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_logits = _times_upstream(ctx.grad, grad_loss, in_place=False)
        if ctx.needs_input_grad[1]:
            logits, lse, weight_local = ctx.saved_tensors
            g = prob_target_grad(logits, lse, weight_local, ctx.params) * ctx.scale
            grad_target = g * (grad_loss.unsqueeze(1) if grad_loss.dim() else grad_loss)
        return grad_logits, grad_target, None, None, None


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """``(input (R, H), local_weight (V_local, H), bias, target, weight, shard, params) -> loss``.

    For "mean"/"sum" only (a scalar upstream gradient scales every gradient after the fact).
    The whole local logits ``(R, V_local)`` exist during forward only; what survives to
    backward is the gradients of input, local weight and bias.
    """

    @staticmethod
    def forward(ctx, input: Tensor, local_weight: Tensor, bias: Tensor | None, target: Tensor,
                weight: Tensor | None, shard: vp.Shard, params: CEParams) -> Tensor:
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        logits = torch.nn.functional.linear(input, local_weight, bias)  # (R, V_local)
        out = vp.forward(logits, target, weight, shard, params,
                         want_grad=need_input or need_weight or need_bias)
        del logits
        grads: list[Tensor | None] = [None, None, None]
        ctx.work = None
        if out.grad is not None:
            g = out.grad  # (R, V_local), input dtype
            if need_input:
                grads[0] = g @ local_weight  # (R, H): this rank's classes' share
                if shard.distributed:
                    # Every rank's share sums to the full input gradient; overlap the
                    # all-reduce with whatever runs before backward.
                    ctx.work = dist.all_reduce(grads[0], group=shard.group, async_op=True)
            if need_weight:
                grads[1] = g.t() @ input  # (V_local, H)
            if need_bias:
                grads[2] = g.sum(0, dtype=out.scale.dtype).to(bias.dtype)  # (V_local,)
        ctx.grads = grads
        return _reduce(out, params.reduction)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if ctx.work is not None:
            ctx.work.wait()
            ctx.work = None
        grads = [None if g is None else _times_upstream(g, grad_loss, in_place=False)
                 for g in ctx.grads]
        return (*grads, None, None, None, None)


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
        grad = grad.contiguous().clone()  # all_reduce works in place; never write autograd's buffer
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
