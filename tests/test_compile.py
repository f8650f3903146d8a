"""torch.compile(fullgraph=True) traces through crossent's PyTorch path: same values and grads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent


@pytest.mark.parametrize("impl,reduction", [("torch", "mean"), ("torch", "none"), ("auto", "mean")])
def test_compile_fullgraph_matches_torch(impl, reduction):
    """impl="auto" compiles too: it picks the traceable torch path over opaque numba kernels."""
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
