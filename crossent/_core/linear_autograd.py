"""autograd.Function for the fused linear + cross-entropy: a loop over row chunks.

Each chunk of ``r`` rows makes its logits ``x_c @ W.T + b`` in one reused ``(r, V)`` buffer,
hands them to the backend kernel (which writes the gradient back into that buffer) and folds
the gradient into ``grad_input``, ``grad_weight`` and ``grad_bias`` straight away, so no
``(N, V)`` tensor ever exists and backward does no matmul for "mean"/"sum".

"none" is different: the upstream gradient is a per-row vector known only in backward, and
``grad_weight = sum_r u_r * dlogits_r^T x_r`` cannot be rescaled afterwards. Its forward makes
the losses only (one matmul per chunk); backward runs the loop again with ``u`` folded into the
rows of ``x`` (cheaper than scaling the ``(r, V)`` gradient): four matmuls in all instead of three.
"""
from __future__ import annotations

import functools
import os
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import Tensor

from .autograd import Kernel, _times_upstream, retained
from .dispatch import stats_sink
from .params import CEParams
from ..backends._cpu_alloc import empty_huge
from ..backends.torch_fused import acc_dtype

# Devices whose ignored rows are dropped before any matmul (see _row_chunks). On CPU finding them
# (a host read of the target) costs nothing. On CUDA it is opt-in, CROSSENT_COMPACT_IGNORED=1:
# counting and gathering the rows is a host sync once per call, which stalls the launch queue and
# breaks CUDA-graph capture; it pays when many rows are ignored (padding, prompt tokens), since
# each ignored row otherwise costs its share of all three matmuls.
SKIP_IGNORED_ON = ("cpu", "cuda") if os.environ.get("CROSSENT_COMPACT_IGNORED") == "1" else ("cpu",)
# Bytes of W one slab spans on CPU (see _slabs): well inside L3 (32 MiB here) beside the
# slab of grad_weight it updates.
_SLAB_BYTES = 8 << 20


def _has_mixed_mm() -> bool:
    """Whether this torch has ``mm``/``addmm`` with ``out_dtype`` (16-bit in, float32 out; torch
    >= 2.8, CUDA kernels only)."""
    try:
        torch.ops.aten.mm.dtype_out, torch.ops.aten.addmm.dtype_out
    except AttributeError:
        return False
    return True


_MIXED_MM = {"cuda": _has_mixed_mm()}  # device type -> use out_dtype products


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``(x (N, H), W (V, H), b (V,) | None, target, ...) -> (reduced loss, lse (N,))``.

    ``target`` is ``(N,)`` int64 or ``(N, V)`` probabilities in the accumulation dtype;
    ``scale`` is the gradient factor of the reduction (``1 / denominator`` for "mean"), or
    ``None``: then ``kernel`` is a backend's whole call, run by ``whole_linear_ce``, and the
    lse is ``None``;
    ``logit_scale`` multiplies the logits (``None``: 1); ``retain`` keeps the gradients made in
    forward so that a second backward (``retain_graph=True``) can use them again.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        class_weight: Tensor | None,
        denominator: Tensor | None,
        scale: Tensor,
        params: CEParams,
        kernel: Kernel,
        chunk_size: int,
        logit_scale: float | None,
        retain: bool,
    ) -> tuple[Tensor, Tensor]:
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.params, ctx.kernel, ctx.chunk_size = params, kernel, chunk_size
        ctx.logit_scale, ctx.retain = logit_scale, retain
        if scale is None:  # one product of all rows on the backend's whole call (see whole_linear_ce)
            loss, ctx.grads = whole_linear_ce(x, weight, bias, target, class_weight, params,
                                              kernel, needs)
            return loss, None
        eager = any(needs) and params.reduction != "none"
        loss, lse, grads = chunked_linear_ce(
            x, weight, bias, target, class_weight, scale, params, kernel, chunk_size,
            needs if eager else (False, False, False), logit_scale=logit_scale,
        )
        ctx.grads = grads
        if any(needs) and params.reduction == "none":
            ctx.save_for_backward(x, weight, bias, target, class_weight)
        ctx.mark_non_differentiable(lse)
        # Reduced in the rows' dtype (float64 but on Triton), returned in the accumulation dtype.
        if params.reduction == "sum":
            loss = loss.sum()
        elif params.reduction == "mean":
            loss = loss.sum() / denominator
        return loss.to(lse.dtype), lse

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_lse: Tensor | None):
        # The engine runs backward with grad mode on exactly when create_graph=True. The
        # gradients below come from a fused kernel and carry no graph, so a second
        # differentiation (gradient penalty, MAML, Hessian) would silently read zero: refuse.
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        if ctx.params.reduction == "none":
            needs = tuple(ctx.needs_input_grad[:3])
            x, weight, bias, target, class_weight = ctx.saved_tensors
            one = torch.ones((), dtype=acc_dtype(x.dtype), device=x.device)
            _, _, grads = chunked_linear_ce(
                x, weight, bias, target, class_weight, one, ctx.params, ctx.kernel,
                ctx.chunk_size, needs, row_scale=grad_loss, logit_scale=ctx.logit_scale,
            )
        else:
            grads = ctx.grads
            if grads is None:
                raise RuntimeError(
                    "crossent: backward ran twice through a linear_cross_entropy call with "
                    "reduction='mean'/'sum', the first time without retain_graph=True; its "
                    "gradients are made in forward and were handed over then. Pass "
                    "retain_graph=True to every backward but the last (as torch asks), or call "
                    "it again."
                )
            # Kept for another backward: copies (autograd may adopt a returned tensor as .grad
            # and add into it later). Else handed over (no reference kept), so autograd can
            # adopt them as .grad instead of copying a (V, H) gradient.
            keep = ctx.retain or retained()
            if not keep:
                ctx.grads = None
            grads = tuple(None if g is None else _times_upstream(g, grad_loss, keep)
                          for g in grads)
        return (*grads, None, None, None, None, None, None, None, None, None)


DOUBLE_BACKWARD_MESSAGE = (
    "crossent.linear_cross_entropy does not support double backward (create_graph=True, as in "
    "gradient penalties, MAML inner steps or Hessian products): its gradients are made by a "
    "fused kernel and carry no graph, so second derivatives would be wrong. Materialise the "
    "logits and use torch's cross-entropy, which supports it: "
    "torch.nn.functional.cross_entropy(torch.nn.functional.linear(input, linear_weight, "
    "linear_bias), target, ...), or torch.nn.functional.linear_cross_entropy(..., options=None)."
)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised buffer; on CPU huge-page backed, as fresh 4 KiB pages fault in slowly."""
    if device.type == "cpu":
        return empty_huge(tuple(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)


_in_place = functools.lru_cache(maxsize=64)(lambda params: replace(params, inplace_backward=True))


# Logits up to this many run as one product on the backend's whole call (whole_linear_ce):
# below it the chunk loop's bookkeeping costs more than skipping ignored rows' products saves.
_WHOLE_MAX = 1 << 20


def whole_call_fits(x: Tensor, weight: Tensor, chunk_size: int) -> bool:
    """Whether a call of ``x (N, H)`` through ``weight (V, H)`` takes ``whole_linear_ce``: on
    CPU, one chunk of at most ``_WHOLE_MAX`` logits, ``W`` in one slab (its three products each
    stream it; see ``_slabs``), eager (``torch.compile`` traces the chunked path's custom ops)
    and no ``*_with_stats`` sink (it observes the chunked path's kernel)."""
    n_rows, n_classes = x.shape[0], weight.shape[0]
    return (x.is_cpu and 0 < n_rows <= chunk_size and n_rows * n_classes <= _WHOLE_MAX
            and weight.numel() * weight.element_size() <= _SLAB_BYTES
            and not torch.compiler.is_compiling() and stats_sink.get() is None)


def whole_linear_ce(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    params: CEParams,
    call: Callable[..., Any],
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """The reduced loss (0-d: the accumulation dtype, or already the input's) and the gradients
    of ``(x, weight, bias)`` flagged in ``needs``, for a call that is one chunk of all rows with
    class indices and a reduced loss: the ``(N, V)`` logits are made by one product (ignored
    rows included), and the backend's whole call
    ``call`` (``crossent.backends``' ``cross_entropy``) checks the targets, sums the "mean"
    denominator, writes the scaled gradient over the logits and reduces the loss, in one pass;
    then one product per gradient. The chunk loop's bookkeeping (a separate target pass, row
    selection, slabs, the reduction in torch ops) costs more than the products below ~10^6
    logits (measured (64, 64, 1000) fwd+bwd: 0.42 -> 0.24 ms, torch 0.30 ms)."""
    logits = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())  # (N, V)
    loss, _, g, _, _ = call(logits, target, class_weight, any(needs), _in_place(params))
    grads = (
        torch.mm(g, weight) if needs[0] else None,  # (N, H)
        torch.mm(g.t(), x) if needs[1] else None,  # (V, H)
        g.sum(0, dtype=acc_dtype(x.dtype)).to(bias.dtype) if needs[2] else None,  # (V,)
    )
    return loss, grads


def _row_chunks(target: Tensor, params: CEParams, n_rows: int, chunk_size: int):
    """Yield ``(rows, index)`` per chunk: a slice of rows, or the int64 indices of counted rows.

    On CPU, rows whose target is ignored are dropped before any matmul (their loss and gradient
    are 0). Finding them reads the target on the host, which would be a sync on accelerators:
    there every row goes through the kernel, which zeroes ignored rows itself, and so does
    every row while compiling (the count of counted rows would be a data-dependent shape).
    """
    if (target.dim() == 1 and target.device.type in SKIP_IGNORED_ON
            and not torch.compiler.is_compiling()):
        valid = target != params.ignore_index  # (N,)
        if not bool(valid.all()):
            index = valid.nonzero().squeeze(1)  # (N_valid,)
            for start in range(0, index.numel(), chunk_size):
                yield None, index[start:start + chunk_size]
            return
    for start in range(0, n_rows, chunk_size):
        yield slice(start, min(start + chunk_size, n_rows)), None


def _slabs(n_classes: int, n_features: int, dtype: torch.dtype, device: torch.device):
    """Column ranges ``(p, q)`` of the vocabulary that one pass over ``W`` visits in turn.

    On CPU, ``W[p:q]`` of about ``_SLAB_BYTES`` stays in cache while three products use it
    (grad of input and of weight for this chunk, logits of the next): ``W`` then streams from
    memory once per chunk instead of twice, which is what bounds small chunks. bf16/fp16 keep
    one slab: their grad-of-input partials would be summed in 8/11 bits.
    """
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return [(0, n_classes)]
    width = max(64, _SLAB_BYTES // (n_features * dtype.itemsize))
    return [(p, min(p + width, n_classes)) for p in range(0, n_classes, width)]


# Devices that sum a 16-bit weight gradient over several chunks as a 16-bit (hi, lo) pair
# (backends/triton/accumulate.py) instead of in a float32 (V, H) buffer cast at the end: 2 bytes
# per weight beside the returned gradient instead of 4 (+ 2 during the cast). The partials come
# in float32 slabs of _PART_BYTES, and the chunk buffer is capped at _PAIR_CHUNK_BYTES, so a
# 128256 x 4096 head needs lo (0.98 GiB) + chunk + slab < 1.8 GiB beyond the gradients it returns.
PAIR_ACC_ON = ("cuda",)
_PART_BYTES = 64 << 20
_PAIR_CHUNK_BYTES = 768 << 20
# Devices whose chunk buffer rows start 32-byte aligned (row stride a multiple of 16 elements):
# the kernel's vector loads and stores need it, and a vocabulary such as 50257 breaks it.
PAD_ROWS_ON = ("cuda",)


def _pair_chunk_rows(chunk_size: int, n_rows: int, n_classes: int, dtype: torch.dtype,
                     dev: torch.device, needs_w: bool) -> int:
    """The chunk size, capped at ``_PAIR_CHUNK_BYTES`` of logits when the weight gradient will be
    summed as a (hi, lo) pair (16-bit, more than one chunk, a ``PAIR_ACC_ON`` device)."""
    pair = (needs_w and n_rows > chunk_size and dev.type in PAIR_ACC_ON
            and dtype in (torch.float16, torch.bfloat16))
    if not pair:
        return chunk_size
    rows = _PAIR_CHUNK_BYTES // (dtype.itemsize * max(1, n_classes))
    return max(16, min(chunk_size, rows - rows % 16))


def chunked_linear_ce(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    scale: Tensor,
    params: CEParams,
    kernel: Kernel,
    chunk_size: int,
    needs: tuple[bool, bool, bool],
    row_scale: Tensor | None = None,
    logit_scale: float | None = None,
) -> tuple[Tensor, Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """Per-row loss ``(N,)`` and lse ``(N,)`` (accumulation dtype, 0 / NaN for skipped rows) and
    the gradients of ``(x, weight, bias)`` flagged in ``needs``, each times ``scale`` and, when
    ``row_scale`` ``(N,)`` is given, times that row's entry (the upstream gradient of "none").
    ``logit_scale`` ``s`` multiplies the logits inside the matmul (its ``alpha``; the bias by
    ``beta``); by the chain rule the logits' gradient is ``s`` times the kernel's, which the
    kernel's gradient factor absorbs at no cost.

    Pipeline: chunk ``i``'s logits fill the buffer, the kernel turns them into the gradient in
    place, then one walk over the vocabulary slabs folds slab ``s`` of that gradient into the
    weight / input / bias gradients and overwrites it with slab ``s`` of chunk ``i + 1``'s logits.
    """
    n_rows, n_features = x.shape
    n_classes = weight.shape[0]
    acc = acc_dtype(x.dtype)
    dev = x.device
    want_grad = any(needs)
    # The kernel writes the gradient over the logits: the chunk buffer is ours, reused.
    kparams = _in_place(params)
    grad_scale = None
    if want_grad:
        grad_scale = scale if logit_scale is None else scale * logit_scale
    chunk_size = _pair_chunk_rows(chunk_size, n_rows, n_classes, x.dtype, dev, needs[1])
    width = n_classes
    if dev.type in PAD_ROWS_ON:
        width = -(-n_classes // 16) * 16
    buf = _empty((min(chunk_size, n_rows), width), x.dtype, dev)[:, :n_classes]  # (r, V)
    chunks = list(_row_chunks(target, params, n_rows, chunk_size))
    skipping = bool(chunks) and chunks[0][1] is not None
    whole = len(chunks) == 1 and not skipping  # one chunk of all rows: its results are the call's
    if not whole:
        loss = torch.zeros(n_rows, dtype=torch.float64, device=dev)  # (N,) ignored rows stay 0
        lse = torch.full((n_rows,), float("nan"), dtype=acc, device=dev)  # (N,) skipped: NaN
    grad_x = None
    if needs[0]:  # (N, H); rows skipped as ignored must read 0
        grad_x = torch.zeros_like(x) if skipping or not chunks else _empty(x.shape, x.dtype, dev)
    # grad_weight / grad_bias accumulate over chunks in float32 for bf16/fp16 inputs: summing
    # per-chunk partials in 8 or 11 bits loses the small contributions (the field's usual bug).
    # One chunk has nothing to sum: its product (float32 inside BLAS) is rounded once, straight
    # into the returned dtype, with no (V, H) float32 buffer. On PAIR_ACC_ON devices several
    # chunks sum into the returned 16-bit tensor plus a 16-bit remainder (see PAIR_ACC_ON).
    # The first chunk writes grad_weight (no zero-fill pass over (V, H)); later ones add.
    pair = needs[1] and len(chunks) > 1 and dev.type in PAIR_ACC_ON and x.dtype != acc
    mixed = pair and _MIXED_MM.get(dev.type, False)
    if pair and dev.type == "cuda" and not mixed:
        raise RuntimeError(
            "crossent: linear_cross_entropy with bf16/fp16 inputs in more than one chunk needs "
            f"torch >= 2.8 on CUDA (matmuls with a float32 out_dtype; this is torch "
            f"{torch.__version__}): without them the weight gradient would need float32 "
            "upcasts of every chunk and a float32 (V, H) product, ~10x slower. Upgrade torch, "
            "or pass chunk_size >= the number of rows (one chunk), or use float32 inputs."
        )
    w_dtype = acc if len(chunks) > 1 and not pair else weight.dtype
    grad_w = _empty((n_classes, n_features), w_dtype, dev) if needs[1] else None  # (V, H)
    grad_w_lo = _empty((n_classes, n_features), w_dtype, dev) if pair else None  # (V, H)
    part_rows = max(1, _PART_BYTES // (4 * n_features))
    part = torch.empty((min(part_rows, n_classes), n_features), dtype=torch.float32,
                       device=dev) if pair else None  # (slab, H) float32 partial
    grad_b = torch.zeros(n_classes, dtype=acc, device=dev) if needs[2] else None  # (V,)
    if grad_w is not None and not chunks:
        grad_w.zero_()
    slabs = _slabs(n_classes, n_features, x.dtype, dev)

    def rows_of(chunk) -> Tensor:  # (r, H)
        rows, index = chunk
        return x[rows] if index is None else x.index_select(0, index)

    def project(x_c: Tensor, p: int, q: int) -> None:
        """Logits of ``x_c``'s rows for classes ``[p, q)`` into the buffer (a strided view:
        BLAS writes it in place with the buffer's row stride)."""
        out = buf[: x_c.shape[0], p:q]
        if logit_scale is None:
            if bias is None:
                torch.mm(x_c, weight[p:q].t(), out=out)
            else:
                torch.addmm(bias[p:q], x_c, weight[p:q].t(), out=out)
        elif bias is None:  # beta=0: the buffer's stale contents are not read
            out.addmm_(x_c, weight[p:q].t(), beta=0, alpha=logit_scale)
        else:
            torch.addmm(bias[p:q], x_c, weight[p:q].t(), beta=logit_scale, alpha=logit_scale, out=out)

    def pair_add(g_s: Tensor, x_c: Tensor, p: int, q: int, first: bool) -> None:
        """``grad_w[p:q] (+)= g_s^T x_c`` into the (hi, lo) pair, in float32 slabs of ``part``."""
        from ..backends.triton.accumulate import pair_add_

        for a in range(p, q, part.shape[0]):
            b = min(a + part.shape[0], q)
            g_t, out = g_s[:, a - p:b - p].t(), part[: b - a]  # (b - a, r), (b - a, H)
            if mixed:
                torch.mm(g_t, x_c, out_dtype=torch.float32, out=out)
            else:  # devices without 16-bit -> float32 products: slab-sized upcasts
                torch.mm(g_t.float(), x_c.float(), out=out)
            pair_add_(grad_w[a:b], grad_w_lo[a:b], out, first)

    x_next = rows_of(chunks[0]) if chunks else None
    for p, q in slabs if chunks else ():
        project(x_next, p, q)
    for i, (rows, index) in enumerate(chunks):
        sel = rows if index is None else index
        x_c = x_next
        r = x_c.shape[0]
        t_c = target[sel]
        if t_c.is_floating_point():
            t_c = t_c.to(acc)  # (r, V) probabilities, the kernel's dtype
        loss_c, lse_c, g = kernel(buf[:r], t_c, class_weight, grad_scale, kparams)  # g: (r, V)
        if whole:
            loss, lse = loss_c, lse_c
        else:
            loss[sel] = loss_c.to(loss.dtype)  # float64, or Triton's float32 rows
            lse[sel] = lse_c
        x_next = rows_of(chunks[i + 1]) if i + 1 < len(chunks) else None
        u = None
        if want_grad and row_scale is not None:
            # each row's upstream factor multiplies its logits' gradient, slab by slab below, as
            # torch's backward does; scaling x's rows instead overflowed 16-bit (or near-3e38)
            # inputs where the products stay finite
            u = row_scale[sel].to(g.dtype).unsqueeze(1)  # (r, 1)
        gx_c = None  # (r, H): straight into grad_x when the rows are a plain slice
        direct = index is None
        if want_grad and grad_x is not None:
            gx_c = grad_x[rows] if direct else torch.empty((r, n_features), dtype=x.dtype, device=dev)
        same = True
        if want_grad and grad_w is not None and not pair:
            # bf16/fp16 into a float32 weight gradient (CPU, or devices outside PAIR_ACC_ON):
            # upcast, as CPUs have no matmul taking 16-bit operands that writes float32.
            same = g.dtype == w_dtype
            x_w = x_c if same else x_c.to(w_dtype)
        for j, (p, q) in enumerate(slabs):
            if want_grad:
                g_s = g[:, p:q] if u is None else g[:, p:q] * u  # (r, q - p)
                if pair:
                    pair_add(g_s, x_c, p, q, first=i == 0)
                elif grad_w is not None:
                    g_t = g_s.t() if same else g_s.t().to(w_dtype)
                    if i == 0:
                        torch.mm(g_t, x_w, out=grad_w[p:q])
                    else:
                        torch.addmm(grad_w[p:q], g_t, x_w, out=grad_w[p:q])
                if grad_b is not None:
                    grad_b[p:q] += g_s.sum(0, dtype=acc)
                if gx_c is not None:
                    if j == 0:
                        torch.mm(g_s, weight[p:q], out=gx_c)
                    else:
                        gx_c.addmm_(g_s, weight[p:q])
            if x_next is not None:
                project(x_next, p, q)  # slab s of this chunk's gradient is no longer needed
        if gx_c is not None and not direct:
            grad_x.index_copy_(0, index, gx_c)
    # Free the chunk buffer (and the last chunk's gradient view of it) before any final cast.
    buf = g = grad_w_lo = part = None
    grads = (
        grad_x,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )
    return loss, lse, grads
