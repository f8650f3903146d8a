"""No silent wrong answer and no unsafe memory access: the defects of issue 15, each at its root.

Values are checked against torch (and the float64 reference where torch has no path); each
test here failed before its fix.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent._core.params import CEParams
from crossent.backends import torch_fused

from ._oracle import cpu_backends

BACKENDS = cpu_backends()


def _kernels():
    kernels = {"torch": torch_fused}
    if "numba" in BACKENDS:
        from crossent.backends import numba_cpu

        kernels["numba"] = numba_cpu
    return kernels


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("n_classes", [2, 40])
def test_uint8_target_with_negative_ignore_index_raises_like_torch(impl, n_classes):
    """ignore_index=-1 must not match a uint8 255 (compared in int64, as the kernels index)."""
    x = torch.randn(5, n_classes)
    t = torch.tensor([0, 255, 1, 0, 1], dtype=torch.uint8)
    with pytest.raises(IndexError, match="Target 255 is out of bounds"):
        crossent.cross_entropy(x, t, ignore_index=-1, impl=impl)
    with pytest.raises((IndexError, UnicodeDecodeError)):  # torch's own message fails to decode
        F.cross_entropy(x, t, ignore_index=-1)


@pytest.mark.parametrize("name", sorted(_kernels()))
@pytest.mark.parametrize("bad", [-1, 2, 255, 10**9, -(10**9)])
def test_kernels_never_read_outside_a_row(name, bad):
    """Called directly with an out-of-range index (validation bypassed), every kernel treats the
    row as ignored: loss 0, gradient 0, the other rows untouched and exact."""
    kernel = _kernels()[name].ce_forward
    gen = torch.Generator().manual_seed(bad % 1000)
    x = torch.randn(3, 2, generator=gen)
    good = torch.tensor([0, 1, 1])
    t = good.clone()
    t[1] = bad
    loss, _, grad = kernel(x, t, None, torch.tensor(1.0), CEParams(reduction="none"))
    ref_loss, _, ref_grad = kernel(x, good, None, torch.tensor(1.0), CEParams(reduction="none"))
    assert loss[1] == 0 and torch.equal(grad[1], torch.zeros(2))
    assert torch.equal(loss[[0, 2]], ref_loss[[0, 2]]) and torch.equal(grad[[0, 2]], ref_grad[[0, 2]])


@pytest.mark.parametrize("impl", BACKENDS)
def test_double_backward_refuses_instead_of_a_wrong_answer(impl):
    """MAML inner step / gradient penalty: create_graph=True must raise, naming torch's path."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    loss = crossent.cross_entropy(lin(x), y, impl=impl)
    with pytest.raises(RuntimeError, match="double backward.*torch.nn.functional.cross_entropy"):
        torch.autograd.grad(loss, lin.weight, create_graph=True)
    # First-order gradients are unaffected, and equal torch's.
    ours = torch.autograd.grad(crossent.cross_entropy(lin(x), y, impl=impl), lin.weight)[0]
    theirs = torch.autograd.grad(F.cross_entropy(lin(x), y), lin.weight)[0]
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("view", ["view", "slice", "transpose"])
def test_inplace_backward_refuses_views_of_leaves(impl, view):
    leaf = torch.randn(4, 3, requires_grad=True)
    x = {"view": lambda: leaf.view(-1, 3), "slice": lambda: leaf[:],
         "transpose": lambda: leaf.t().t()}[view]()
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="view of a leaf"):
        crossent.cross_entropy(x, torch.tensor([0, 1, 2, 0]), impl=impl, inplace_backward=True)
    assert torch.equal(leaf.detach(), before)
    # A non-leaf's view is fine: the gradient still reaches the leaf, equal to torch's.
    loss = crossent.cross_entropy((leaf * 2)[:], torch.tensor([0, 1, 2, 0]), impl=impl,
                                  inplace_backward=True)
    loss.backward()
    ours, leaf.grad = leaf.grad, None
    F.cross_entropy(leaf * 2, torch.tensor([0, 1, 2, 0])).backward()
    torch.testing.assert_close(ours, leaf.grad)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_inf_class_weight_of_an_absent_class_keeps_gradients_finite(impl, smoothing):
    """Inverse-frequency weights 1 / counts with a zero count: torch's loss and gradient."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=gen, requires_grad=True)
    t = torch.tensor([0, 1, 2, 0, 1, 2])  # class 3 absent
    counts = torch.bincount(t, minlength=4).float()
    w = 1 / counts  # inf for class 3
    ours = crossent.cross_entropy(x, t, weight=w, impl=impl, label_smoothing=smoothing)
    (g_ours,) = torch.autograd.grad(ours, x)
    theirs = F.cross_entropy(x, t, weight=w, label_smoothing=smoothing)
    (g_theirs,) = torch.autograd.grad(theirs, x)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    torch.testing.assert_close(g_ours, g_theirs, equal_nan=True)
    if smoothing == 0:
        assert torch.isfinite(g_ours).all()


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e19, 1e30, 3e38])
def test_huge_finite_logits_give_a_finite_loss(impl, dtype, magnitude):
    """|lse| > 1.8e19 squares to inf in float32: with z_loss = 0 that term must not exist."""
    x = torch.tensor([[magnitude, -magnitude, 0.0], [0.0, magnitude, 1.0]]).to(dtype)
    t = torch.tensor([1, 1])
    for reduction in ("none", "sum"):
        ours = crossent.cross_entropy(x, t, impl=impl, reduction=reduction)
        theirs = F.cross_entropy(x, t, reduction=reduction)
        assert torch.equal(ours.isnan(), theirs.isnan()) and not ours.isnan().any()
        torch.testing.assert_close(ours, theirs, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6,
                                   atol=0, equal_nan=True)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("weights", [[-1.0, -0.5, -2.0], [1.0, -1.0, 0.5], [0.0, 1.0, 1.0]])
def test_mean_over_weight_sums_at_or_below_zero_is_torchs(impl, weights):
    """torch divides by the counted weight sum whatever its sign: negative, zero (inf / NaN)."""
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    t = torch.tensor([0, 1]) if weights[2] != 1.0 else torch.tensor([0, 0])
    w = torch.tensor(weights)
    ours = crossent.cross_entropy(x, t, weight=w, impl=impl)
    (g_ours,) = torch.autograd.grad(ours, x)
    theirs = F.cross_entropy(x, t, weight=w)
    (g_theirs,) = torch.autograd.grad(theirs, x)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    torch.testing.assert_close(g_ours, g_theirs, equal_nan=True)


def test_label_smoothing_nan_is_ignored_like_torch():
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    torch.testing.assert_close(crossent.cross_entropy(x, t, label_smoothing=math.nan),
                               F.cross_entropy(x, t, label_smoothing=math.nan))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("w_dtype,x_dtype", [(torch.float64, torch.float32),
                                             (torch.float32, torch.bfloat16),
                                             (torch.float32, torch.float64)])
def test_probability_targets_promote_with_the_weight_like_torch(impl, w_dtype, x_dtype):
    """Issue 12.5: a weight of another floating dtype is promoted with probability targets (the
    result has torch's dtype and value); with class indices torch's RuntimeError stands."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, generator=gen).to(x_dtype).requires_grad_(True)
    p = torch.randn(4, 6, generator=gen).softmax(1).to(x_dtype)
    w = (torch.rand(6, generator=gen) + 0.5).to(w_dtype)
    ours = crossent.cross_entropy(x, p, weight=w, impl=impl)
    theirs = F.cross_entropy(x, p, weight=w)
    assert ours.dtype == theirs.dtype
    tol = 2**-7 if x_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    (g_ours,) = torch.autograd.grad(ours, x)
    (g_theirs,) = torch.autograd.grad(theirs, x)
    assert g_ours.dtype == x_dtype
    torch.testing.assert_close(g_ours.double(), g_theirs.double(), rtol=tol, atol=tol)
    with pytest.raises(RuntimeError):
        crossent.cross_entropy(x, torch.tensor([0, 1, 2, 3]), weight=w, impl=impl)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 2), (2, 5, 3)], ids=str)
@pytest.mark.parametrize("by", ["target", "weight"])
def test_a_float64_result_sums_in_float64(impl, shape, by):
    """float32 logits with float64 probabilities (or class weights): torch's loss is float64,
    its row terms summed in float64. Rows of loss 3e38 fit in float32; their sum does not (it
    was inf), and the gradient stays float32."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(shape, generator=gen)
    x[:, 0] = 3e38
    x.requires_grad_()
    p = torch.randn(shape, generator=gen, dtype=torch.float64).softmax(1)
    p[:, 0] = 0  # the loss is about 3e38 in every row
    p = p / p.sum(1, keepdim=True)
    w = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 1
    if by == "weight":
        p = p.float()
    for reduction in ("sum", "mean", "none"):
        kw = dict(weight=w if by == "weight" else None, reduction=reduction)
        ours, theirs = crossent.cross_entropy(x, p, impl=impl, **kw), F.cross_entropy(x, p, **kw)
        assert ours.dtype == theirs.dtype == torch.float64
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        (g_ours,), (g_theirs,) = torch.autograd.grad(ours.sum(), x), torch.autograd.grad(
            theirs.sum(), x)
        assert g_ours.dtype == torch.float32
        torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("impl", cpu_backends())
@pytest.mark.parametrize("n_classes", [2, 20, 300])  # few-class (K-dim kernel) and row paths
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_row_beyond_float32_does_not_make_the_reduction_nan(impl, n_classes, probs, reduction):
    """Row 0 has loss -inf (its target at a -inf logit, a negative class weight), row 1 a
    z_loss term of ~1e57: finite in float64, +inf in float32. The reduction is -inf (sum) or
    +inf (mean over a negative weight sum), the float64 answer; per-row float32 losses made it
    inf - inf = NaN."""
    from crossent._core import reference

    x = torch.zeros(2, n_classes)
    x[0, 1], x[0, 0], x[1, 0] = -math.inf, 1e30, 1e30
    w = -torch.linspace(0.2, 0.9, n_classes)
    t = torch.eye(n_classes)[[1, 0]] if probs else torch.tensor([1, 0])
    ours = crossent.cross_entropy(x, t, weight=w, z_loss=1e-3, reduction=reduction, impl=impl)
    ref = reference.cross_entropy(x.double(), t.double() if probs else t, w.double(),
                                  ignore_index=-100, reduction=reduction, label_smoothing=0.0,
                                  z_loss=1e-3, softcap=None)
    torch.testing.assert_close(ours, ref.float(), equal_nan=False)


def _negative_bit_view(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x``'s values in a view with the negative bit set (memory holds ``-x``): ``z.conj().imag``
    of a complex ``z`` (public API, strided) or ``_neg_view`` (contiguous); differentiable."""
    if kind == "conj().imag":
        return torch.complex(torch.zeros_like(x), -x).conj().imag
    return (-x)._neg_view()


_NEG_CALLS = {
    "cross_entropy": (lambda a, t, p, w, i: crossent.cross_entropy(a, t, impl=i),
                      lambda a, t, p, w: F.cross_entropy(a, t), (8, 10)),
    "cross_entropy weight none": (
        lambda a, t, p, w, i: crossent.cross_entropy(a, t, w, reduction="none", impl=i),
        lambda a, t, p, w: F.cross_entropy(a, t, w, reduction="none"), (8, 10)),
    "cross_entropy probabilities": (lambda a, t, p, w, i: crossent.cross_entropy(a, p, impl=i),
                                    lambda a, t, p, w: F.cross_entropy(a, p), (8, 10)),
    "cross_entropy k-dim": (lambda a, t, p, w, i: crossent.cross_entropy(a, t, impl=i),
                            lambda a, t, p, w: F.cross_entropy(a, t), (2, 5, 3, 4)),
    "log_softmax": (lambda a, t, p, w, i: crossent.log_softmax(a, 1, impl=i),
                    lambda a, t, p, w: F.log_softmax(a, 1), (8, 10)),
    "softmax k-dim": (lambda a, t, p, w, i: crossent.softmax(a, 1, impl=i),
                      lambda a, t, p, w: F.softmax(a, 1), (2, 5, 3, 4)),
    "nll_loss": (lambda a, t, p, w, i: crossent.nll_loss(a, t, impl=i),
                 lambda a, t, p, w: F.nll_loss(a, t), (8, 10)),
    "nll_loss k-dim weight": (lambda a, t, p, w, i: crossent.nll_loss(a, t, w, impl=i),
                              lambda a, t, p, w: F.nll_loss(a, t, w), (2, 5, 3, 4)),
}


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("kind", ["conj().imag", "_neg_view"])
@pytest.mark.parametrize("call", sorted(_NEG_CALLS))
def test_negative_bit_views_are_read_as_their_values(call, kind, impl):
    """A real view whose memory holds the negated values (the negative bit) gives torch's loss
    and gradient: the kernels read memory through addresses, so such input is resolved first
    (it was read raw: a silently wrong loss)."""
    ours, ref, shape = _NEG_CALLS[call]
    gen = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=gen)
    t = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen)
    p = torch.softmax(torch.randn(shape, generator=gen), 1)
    w = torch.rand(shape[1], generator=gen)
    results = []
    for view in (True, False):
        x = base.clone().requires_grad_()
        out = ours(_negative_bit_view(x, kind), t, p, w, impl) if view else ref(x, t, p, w)
        up = torch.linspace(-1, 1, out.numel()).view(out.shape)
        (grad,) = torch.autograd.grad(out, x, up)
        results.append((out.detach(), grad))
    (got, got_grad), (want, want_grad) = results
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["indices", "smoothing", "probabilities", "k-dim", "weights"])
@pytest.mark.parametrize("n_cls", [3, 50])  # few-class rows side by side, and the row kernel
@pytest.mark.parametrize("magnitude", [1e4, 1e10, 1e20, 1e30, 3e38], ids=str)
def test_equal_large_logits_keep_their_log_c(magnitude, n_cls, case, dtype, impl):
    """Rows of equal logits far from 0 have the loss log C whatever their magnitude (torch's,
    and the float64 reference's). The kernels compute it as (m - x_y) + log s; reassociated
    into (m + log s) - x_y, log s vanished next to m: a loss of 0 from about 1e20 on (and
    1.098611 instead of 1.098612 at 1e10)."""
    gen = torch.Generator().manual_seed(n_cls)
    x = torch.full((6, n_cls), magnitude).to(dtype)
    x[3:, 0] = x[3, 0] * 0.5  # rows whose target is not at the max too
    t = torch.randint(0, n_cls, (6,), generator=gen)
    w = torch.rand(n_cls, generator=gen).to(dtype) + 0.5
    kw = {"indices": dict(reduction="none"),
          "smoothing": dict(reduction="none", label_smoothing=0.1),
          "probabilities": dict(reduction="none"), "k-dim": dict(reduction="none"),
          "weights": dict(reduction="none", weight=w)}[case]
    if case == "probabilities":
        t = torch.softmax(torch.randn(6, n_cls, generator=gen), 1).to(dtype)
    if case == "k-dim":
        x, t = x.t().unsqueeze(0).contiguous(), t.unsqueeze(0)  # (1, C, 6)
    got = crossent.cross_entropy(x, t, impl=impl, **kw)
    want = F.cross_entropy(x.double(), t.double() if case == "probabilities" else t,
                           **{k: v.double() if k == "weight" else v for k, v in kw.items()})
    # bf16 losses are rounded once, from float32 work: ~3 significant digits
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want.to(got.dtype).double(), **tol)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("call", ["rows", "few classes", "k-dim", "nll_loss"])
def test_a_loss_beyond_float32_is_inf_without_a_numpy_warning(call, reduction, impl):
    """A float32 loss beyond float32's range (z-loss of 1e30 logits, sums of -3e38) is inf, as
    torch's, and the float64 totals' cast raised numpy's "overflow encountered in cast"
    RuntimeWarning to the user (an error under ``-W error``)."""
    import warnings

    t = torch.tensor([0, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if call == "nll_loss":
            out = crossent.nll_loss(torch.full((4, 5), -3e38), t, reduction="sum", impl=impl)
            assert out.isinf().all()
            return
        x = torch.full((4, 50 if call == "rows" else 3), 1e30)
        if call == "k-dim":
            x, t = x.t().unsqueeze(0).contiguous(), t.unsqueeze(0)
        out = crossent.cross_entropy(x, t, reduction=reduction, z_loss=1e-4, impl=impl)
    assert out.isinf().all()
