"""softmax / log_softmax over any dim, nll_loss, and the identities the seed documents check."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent

from ._oracle import index_target, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,dim", [((5,), 0), ((3, 5), 1), ((3, 5), 0), ((2, 3, 4), -1),
                                       ((2, 3, 4), 1), ((2, 3, 4, 5), 2)])
def test_softmax_and_log_softmax_match_torch(dtype, shape, dim):
    gen = torch.Generator().manual_seed(len(shape) + dim)
    x = logits(shape, dtype, gen)
    up = torch.randn(shape, generator=gen).to(dtype)
    for ours_fn, torch_fn in [(crossent.softmax, F.softmax), (crossent.log_softmax, F.log_softmax)]:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours_fn(a, dim=dim), torch_fn(b, dim=dim)
        tol = {} if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(ya, yb, **tol)
        (ga,), (gb,) = torch.autograd.grad(ya, a, up), torch.autograd.grad(yb, b, up)
        torch.testing.assert_close(ga, gb, **tol)


def test_softmax_gradcheck_and_extremes():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: crossent.log_softmax(t, 1), (x,))
    assert torch.autograd.gradcheck(lambda t: crossent.softmax(t, 0), (x,))
    big = torch.tensor([[1e4, -1e4, 0.0], [float("-inf"), 0.0, 1.0]])
    torch.testing.assert_close(crossent.log_softmax(big, 1), F.log_softmax(big, 1))
    torch.testing.assert_close(crossent.softmax(big, 1), F.softmax(big, 1))


def test_implicit_dim_warns_like_torch():
    x = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        ours = crossent.softmax(x)
    with pytest.warns(UserWarning):
        theirs = F.softmax(x)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(crossent.log_softmax(x, 1, dtype=torch.float64),
                               F.log_softmax(x, 1, dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(6,), (8, 5), (4, 5, 3, 2)], ids=str)
def test_nll_loss_matches_torch(reduction, shape):
    gen = torch.Generator().manual_seed(len(shape))
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    logp = F.log_softmax(logits(shape, torch.float64, gen), 0 if len(shape) == 1 else 1)
    t = index_target(shape, n_classes, gen, ignore_fraction=0.0 if len(shape) == 1 else 0.3)
    w = torch.rand(n_classes, generator=gen, dtype=torch.float64)
    a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ya = crossent.nll_loss(a, t, w, reduction=reduction)
    yb = F.nll_loss(b, t, w, reduction=reduction)
    torch.testing.assert_close(ya, yb)
    up = torch.randn(yb.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(ya, a, up)[0], torch.autograd.grad(yb, b, up)[0])


def test_seed_identities():
    """Seeds 001/002: log(softmax(z)) == log_softmax(z); nll_loss(log_softmax(z)) == cross_entropy(z);
    the functional and the module give the same result."""
    z = torch.rand(3, 5, requires_grad=True)
    y = torch.tensor([1, 0, 4])
    torch.testing.assert_close(torch.log(crossent.softmax(z, dim=1)), crossent.log_softmax(z, dim=1))
    composed = crossent.nll_loss(crossent.log_softmax(z, dim=1), y)
    fused = crossent.cross_entropy(z, y)
    torch.testing.assert_close(composed, fused)
    torch.testing.assert_close(crossent.CrossEntropyLoss()(z, y), fused)
    (g1,), (g2,) = torch.autograd.grad(composed, z), torch.autograd.grad(fused, z)
    torch.testing.assert_close(g1, g2)


def test_seed_hand_written_cross_entropy():
    """Seed 003's myCEE (exp, log-sum, one-hot product) equals reduction='sum'; seed 004's loop CELoss
    equals the mean. Both are the naive (unstable) forms, so moderate logits only."""
    outputs = torch.rand(10, 5)
    targets = torch.tensor([0, 2, 1, 3, 4, 3, 2, 1, 3, 1])
    exp = torch.exp(outputs)
    my_cee = torch.sum(torch.log(exp.sum(1)) - (F.one_hot(targets, 5).float() * outputs).sum(1))
    torch.testing.assert_close(crossent.cross_entropy(outputs, targets, reduction="sum"), my_cee)
    loop = sum(torch.log(torch.exp(outputs[i]).sum()) - outputs[i, targets[i]] for i in range(10)) / 10
    torch.testing.assert_close(crossent.cross_entropy(outputs, targets), loop)


def test_segmentation_and_stability():
    """Seed 003: (N, C, H, W) logits with (N, H, W) targets; finite result where naive exp overflows."""
    x = torch.randn(2, 4, 3, 3) * 1000
    t = torch.randint(0, 4, (2, 3, 3))
    ours = crossent.cross_entropy(x, t, reduction="none")
    assert ours.shape == (2, 3, 3) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, F.cross_entropy(x, t, reduction="none"))
    assert not torch.isfinite(torch.log(torch.exp(x).sum(1))).all()  # what the naive form gives
