"""torch.compile(fullgraph=True) through crossent: same values and grads as eager and torch.

impl="torch" is traced op by op; the numba kernel ("auto" on CPU) enters the graph as the
opaque custom ops ``crossent::numba_ce_forward[_inplace]``.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import crossent


NUMBA = pytest.mark.skipif(not crossent._core.dispatch.available("numba"), reason="numba not installed")


@pytest.mark.parametrize("impl,reduction", [
    ("torch", "mean"), ("torch", "none"), ("auto", "mean"),
    pytest.param("numba", "none", marks=NUMBA), pytest.param("numba", "sum", marks=NUMBA),
])
def test_compile_fullgraph_matches_torch(impl, reduction):
    torch._dynamo.reset()

    def loss_fn(x, t, w):
        return crossent.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, impl=impl)

    compiled = torch.compile(loss_fn, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 11, generator=gen)
    t = torch.randint(0, 11, (24,), generator=gen)
    t[::5] = -100
    w = torch.rand(11, generator=gen)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = compiled(a, t, w)
    theirs = F.cross_entropy(b, t, w, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs)
    up = torch.randn(theirs.shape, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(ours, a, up)[0], torch.autograd.grad(theirs, b, up)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_probability_targets(dtype, reduction):
    """Probability targets trace without a graph break (the loss dtype is promoted from the
    dtypes, not by ``torch.result_type``, which Dynamo cannot put in a graph)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 7, generator=gen).to(dtype)
    p = torch.randn(12, 7, generator=gen).softmax(1)  # float32 targets: promoted, as torch

    def loss_fn(x_, p_):
        return crossent.cross_entropy(x_, p_, reduction=reduction, label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = compiled(a, p)
    theirs = F.cross_entropy(b, p, reduction=reduction, label_smoothing=0.1)
    assert ours.dtype == theirs.dtype
    tol = {} if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(ours, theirs, **tol)
    up = torch.randn(theirs.shape, generator=gen, dtype=theirs.dtype)
    (ga,), (gb,) = torch.autograd.grad(ours, a, up), torch.autograd.grad(theirs, b, up)
    torch.testing.assert_close(ga, gb, **tol)


@NUMBA
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_calls_the_numba_op(inplace, dtype):
    """A compiled training step (logits from a matmul, options, in-place gradient) runs the numba
    kernel as one op, and matches the eager step."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(12, 16, generator=gen, dtype=dtype)
    y = torch.randint(0, 40, (12,), generator=gen)
    y[::4] = -100
    options = dict(impl="numba", label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                   inplace_backward=inplace)

    def step(w):
        return crossent.cross_entropy(h @ w, y, **options)  # (12, 40) logits, not a leaf

    graphs = []

    def inductor_seeing(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))  # with subgraphs
        return torch._inductor.compile(gm, example_inputs)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=inductor_seeing)):
        w = torch.randn(16, 40, generator=torch.Generator().manual_seed(5), dtype=dtype)
        w.requires_grad_()
        loss = fn(w)
        loss.backward()
        results.append((loss.detach(), w.grad))
    op = "numba_ce_forward_inplace" if inplace else "numba_ce_forward"
    assert set(re.findall(r"crossent\.(numba_ce_forward\w*)", "".join(graphs))) == {op}, graphs
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_compile_fullgraph_linear_cross_entropy(reduction, bias):
    """The fused linear loss traces whole, ignored rows included (eager drops them before the
    products after reading the target on the host; compiled, every row goes through)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(10, 8, generator=gen), torch.randn(13, 8, generator=gen)
    b = torch.randn(13, generator=gen) if bias else None
    t = torch.randint(0, 13, (10,), generator=gen)
    t[::3] = -100

    def loss_fn(x_, w_, t_):
        return crossent.linear_cross_entropy(x_, w_, t_, linear_bias=b, reduction=reduction,
                                             label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    ref = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    ours = compiled(*leaves, t)
    theirs = F.cross_entropy(F.linear(ref[0], ref[1], b), t, reduction=reduction,
                             label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs)
    up = torch.randn(theirs.shape, generator=gen)
    for ga, gb in zip(torch.autograd.grad(ours, leaves, up), torch.autograd.grad(theirs, ref, up)):
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("dim", [1, 0, -1])
def test_compile_fullgraph_softmax_family_and_nll(dim):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 4, generator=gen)
    t = torch.randint(0, 5, (6, 4), generator=gen)
    w = torch.rand(5, generator=gen)

    def both(ls, sm, nll):
        def f(x_):
            return ls(x_, dim).sum() + sm(x_, dim).square().sum() + nll(ls(x_, 1), t, w)
        return f

    compiled = torch.compile(both(crossent.log_softmax, crossent.softmax, crossent.nll_loss),
                             fullgraph=True, backend="aot_eager")
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = compiled(a), both(F.log_softmax, F.softmax, F.nll_loss)(b)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, a)[0], torch.autograd.grad(theirs, b)[0])
