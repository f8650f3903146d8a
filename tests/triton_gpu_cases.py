"""Triton backend on a GPU at real widths: run by ``tests/test_triton_backend.py`` (skipped
without CUDA) and by ``benchmarks/gpu_check.sh``. Not collected on its own (no ``test_`` prefix).

The interpreter cases (``triton_cases.py``) cover every option on small rows with forced small
blocks; these cover what only full-size rows on real hardware show: the looped path at
vocabulary widths around a block boundary (16384 / 16385), odd (50257) and Llama-3 (128256)
widths, the in-place race between warps of one program (loss compared in place and not, bit
for bit), misaligned target and logits pointers, strided logits, and the memory each path holds.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import crossent

from ._oracle import assert_close_to_reference, index_target, logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
WIDTHS = [16384, 16385, 50257, 128256]
OPTIONS = {
    "plain": {},
    "weight+smoothing": {"label_smoothing": 0.1, "weight": True},
    "z+softcap": {"z_loss": 1e-3, "softcap": 30.0},
}


def _data(n_rows: int, n_classes: int, what: str, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(zlib.crc32(what.encode()))
    x = logits((n_rows + 1, n_classes), dtype, gen)
    y = index_target((n_rows + 1, n_classes), n_classes, gen)
    w = torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.1
    return x, y, w


@pytest.mark.parametrize("n_classes", WIDTHS)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_real_widths(n_classes, name):
    """Loss and gradient vs float64 and torch; in place equals out of place bit for bit (the
    race: another warp overwriting x_y with its gradient before the loss reads it); targets and
    logits one element off their allocation's alignment (``[1:]``)."""
    options = dict(OPTIONS[name])
    x, y, w = _data(24, n_classes, f"{n_classes} {name}")
    weight = w.float() if options.pop("weight", False) else None
    x_cuda, y_cuda = x.cuda()[1:], y.cuda()[1:]  # misaligned: 2 bytes / 8 bytes past the start
    results = []
    for inplace in (False, True):
        leaf = x_cuda.clone().requires_grad_()
        h = leaf * 1
        loss = crossent.cross_entropy(h, y_cuda, None if weight is None else weight.cuda(),
                                      impl="triton", reduction="none", inplace_backward=inplace,
                                      **options)
        (g,) = torch.autograd.grad(loss, leaf, torch.linspace(0.5, 1.5, 24, device="cuda").to(loss.dtype))
        results.append((loss, g))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    x_ref = x[1:].double().requires_grad_()
    kw = {k: v for k, v in options.items() if k in ("label_smoothing",)}
    ref = crossent.cross_entropy(x_ref, y[1:], None if weight is None else weight.double(),
                                 impl="torch", reduction="none", **options)
    (g_ref,) = torch.autograd.grad(ref, x_ref, torch.linspace(0.5, 1.5, 24, dtype=torch.float64))
    x_t = x[1:].clone().requires_grad_()
    if "z_loss" in options:
        theirs, g_theirs = ref.to(x.dtype), g_ref.to(x.dtype)
    else:
        theirs = F.cross_entropy(x_t, y[1:], weight, reduction="none", **kw)
        (g_theirs,) = torch.autograd.grad(theirs, x_t, torch.linspace(0.5, 1.5, 24).to(theirs.dtype))
    assert_close_to_reference(results[0][0].cpu(), theirs.detach(), ref.detach(), x.dtype, f"{name} loss")
    assert_close_to_reference(results[0][1].cpu(), g_theirs, g_ref, x.dtype, f"{name} grad")


@pytest.mark.parametrize("inplace", [False, True])
def test_strided_and_ignored_rows(inplace):
    """``wide[:, :V]`` logits (row stride 2V) with ignored rows: same values as contiguous; in
    place the gradient lands in ``wide`` at its stride, the columns past V untouched."""
    n_classes = 50257
    x, y, _ = _data(16, n_classes, "strided")
    y[::3] = -100
    src = torch.full((17, 2 * n_classes), 7.0, dtype=x.dtype, device="cuda")
    src[:, :n_classes] = x.cuda()
    out = []
    for strided in (True, False):
        leaf = (src if strided else x.cuda()).clone().requires_grad_()
        made = leaf * 1  # logits made by an op (in place may not overwrite a leaf)
        logits_ = made[:, :n_classes] if strided else made
        loss = crossent.cross_entropy(logits_, y.cuda(), impl="triton", inplace_backward=inplace)
        (g,) = torch.autograd.grad(loss, made)
        if strided:
            assert (g[:, n_classes:] == 0).all()
            if inplace:
                assert (made.detach()[:, n_classes:] == 7.0).all()
        out.append((loss, g[:, :n_classes]))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert (out[0][1][::3] == 0).all()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("upstream", [1.0, 2.0])
def test_memory(inplace, upstream):
    """fwd+bwd holds at most one logits-sized buffer beyond the logits out of place (the
    gradient, scaled in place by the upstream factor), none in place."""
    n_rows, n_classes = 2048, 128256
    x = torch.randn(n_rows, n_classes, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, n_classes, (n_rows,), device="cuda")
    leaf = x.requires_grad_()
    for measure in (False, True):  # the first call compiles and warms the allocator
        h = leaf * 1  # (N, V) logits made by an op, before the measurement starts
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = crossent.cross_entropy(h, y, impl="triton", inplace_backward=inplace) * upstream
        (g,) = torch.autograd.grad(loss, h)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        del g, loss, h
    logit_bytes = x.numel() * x.element_size()
    small = 1 << 20  # per-row loss and lse, scalars
    assert extra <= (0 if inplace else logit_bytes) + small, (extra, logit_bytes)


def test_linear_several_chunks_memory_and_values():
    """bf16 linear CE in several chunks: the weight gradient summed as a 16-bit (hi, lo) pair,
    no float32 (V, H) buffer (which alone would be 4 bytes per weight), values as one chunk."""
    n, h, v = 2048, 2048, 65536
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(n, h, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    grads = []
    for chunk in (n, 256):
        for measure in (False, True):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            got = torch.autograd.grad(crossent.linear_cross_entropy(x, w, t, chunk_size=chunk), (x, w))
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base - (x.numel() + w.numel()) * 2
        grads.append(got)
        if chunk < n:  # lo (2 B/weight) + a 256-row chunk + a 64 MiB float32 slab: less than
            # a float32 (V, H) accumulator alone (4 B/weight)
            assert extra < 2 * v * h + 256 * v * 2 + (80 << 20) < 4 * v * h, extra
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = torch.autograd.grad(F.cross_entropy(xf @ wf.T, t), (xf, wf))
    for one, several, r in zip(*grads, ref):
        err_one, err_several = (one.float() - r).abs().mean(), (several.float() - r).abs().mean()
        assert err_several <= 1.05 * err_one, (err_several, err_one)
