"""softmax / log_softmax over any dim and nll_loss, on every backend, against torch and float64.

The Triton cases (``*_triton``) need ``TRITON_INTERPRET=1`` before Triton is imported, so
``test_triton_cases_in_interpreter`` runs them in a child pytest (see test_triton_backend.py).
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import crossent

from ._oracle import EPS, assert_close_to_reference, cpu_backends, index_target, logits

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FAMILIES = {"log_softmax": (crossent.log_softmax, F.log_softmax),
            "softmax": (crossent.softmax, F.softmax)}
TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
needs_triton = pytest.mark.skipif(not TRITON, reason="runs in the child of test_triton_cases_in_interpreter")


def _check_family(family, x, dim, impl, up_seed=0):
    """Values and gradients (random upstream) vs torch (same dtype) and the float64 reference."""
    ours_fn, torch_fn = FAMILIES[family]
    gen = torch.Generator().manual_seed(up_seed)
    up = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    a, b = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    r = x.detach().double().requires_grad_()
    ya, yb, yr = ours_fn(a, dim, impl=impl), torch_fn(b, dim), torch_fn(r, dim)
    what = f"{family} {impl} {x.dtype} {tuple(x.shape)} dim={dim}"
    assert ya.shape == yb.shape and ya.is_contiguous()
    assert_close_to_reference(ya, yb, yr.detach(), x.dtype, what)
    (ga,), (gb,) = torch.autograd.grad(ya, a, up.to(x.dtype)), torch.autograd.grad(yb, b, up.to(x.dtype))
    if x.dtype in EPS:
        # A 16-bit gradient is dominated by the rounding of the saved output (ours and torch's
        # differ by an ulp), so check the backward formula in float64 from our own output: one
        # rounding of the result, plus float32 sums.
        out, g = ya.detach().double(), up.to(x.dtype).double()
        sums = (g if family == "log_softmax" else g * out).sum(dim, keepdim=True)
        gr = g - out.exp() * sums if family == "log_softmax" else out * (g - sums)
        scale = float(gr.abs().max()) if gr.numel() else 0.0
        torch.testing.assert_close(ga.double(), gr, rtol=EPS[x.dtype], atol=1e-5 * max(1.0, scale),
                                   equal_nan=True, msg=what + " grad")
        return
    (gr,) = torch.autograd.grad(yr, r, up.to(x.dtype).double())
    assert_close_to_reference(ga, gb, gr, x.dtype, what + " grad")


SHAPES = [((7,), 0), ((3, 5), 1), ((3, 5), 0), ((2, 3, 4), -1), ((2, 3, 4), 1), ((2, 3, 4), -3),
          ((2, 3, 4, 5), 2), ((4, 1), 1), ((2, 1, 6), 1), ((5, 300), 1), ((3, 40, 300), 1),
          ((2, 17, 4100), 1), ((2, 3, 4200), 1),  # two runs of W inner positions, one ragged
          ((3, 1), 0), ((2, 3, 1), 1)]  # dim not last, but every dim after it of size 1


@pytest.mark.parametrize("impl", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SHAPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_families_any_dim(family, shape, dim, dtype, impl):
    """Every dim (negative too), C = 1, inner runs longer than the kernels' chunks (``W``
    positions side by side, ``_numba_softmax_kernels.width``)."""
    x = logits(shape, dtype, torch.Generator().manual_seed(len(shape) + dim))
    _check_family(family, x, dim, impl)


@pytest.mark.parametrize("impl", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_cls", range(1, 20))
def test_rows_of_every_short_length(n_cls, family, dtype, impl):
    """Rows of 1-19 values, where the row kernels switch loop forms (a masked loop for 5-15
    values, head and tail beyond): extreme and -inf values included."""
    gen = torch.Generator().manual_seed(n_cls)
    x = logits((37, n_cls), torch.float64, gen) * 30
    x[3, 0] = float("-inf")
    x[5] = 1e4 * torch.arange(n_cls)
    _check_family(family, x.to(dtype), 1, impl)


@pytest.mark.parametrize("impl", cpu_backends())
@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_split_and_large_rows(family, impl):
    """Above the single-thread threshold: rows split over threads, columns over (outer, chunk)."""
    gen = torch.Generator().manual_seed(1)
    _check_family(family, logits((70, 1500), torch.float32, gen), 1, impl)
    _check_family(family, logits((3, 21, 1300), torch.bfloat16, gen), 1, impl)


@pytest.mark.parametrize("impl", cpu_backends())
@pytest.mark.parametrize("family", FAMILIES)
def test_strided_and_empty_input(family, impl):
    gen = torch.Generator().manual_seed(2)
    base = logits((6, 8, 5), torch.float32, gen)
    for view in (base.transpose(0, 2), base[:, ::2], base.permute(1, 2, 0)[1:]):
        for dim in range(view.dim()):
            _check_family(family, view, dim, impl)
    for shape, dim in [((0, 5), 1), ((3, 0), 1), ((2, 0, 4), 1), ((0,), 0)]:
        x = torch.empty(shape, requires_grad=True)
        y = FAMILIES[family][0](x, dim, impl=impl)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


EXTREMES = torch.tensor([
    [float("-inf")] * 4,                          # all -inf: NaN, as torch
    [1.0, float("nan"), 2.0, 0.0],                # a NaN poisons its row
    [float("inf"), 0.0, 1.0, float("-inf")],      # +inf: NaN
    [3e38, -3e38, 0.0, 3e38],                     # differences overflow to -inf
    [-3e38, -3e38, -3e38, -3e38],                 # equal huge negatives: uniform
    [0.0, -100.0, -1e4, float("-inf")],           # exp underflow, far below -88
    [1e4, 1e4 - 1, 1e4 - 2, 1e4 - 200],           # large logits keep small differences
])


@pytest.mark.parametrize("impl", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("family", FAMILIES)
def test_extreme_values_match_torch_exactly_in_nans(family, dtype, impl):
    x = EXTREMES.to(dtype)
    for xx, dim in [(x, 1), (x.t().contiguous(), 0), (x.t().contiguous().unsqueeze(0), 1)]:
        ours_fn, torch_fn = FAMILIES[family]
        a, b = xx.clone().requires_grad_(), xx.clone().requires_grad_()
        ya, yb = ours_fn(a, dim, impl=impl), torch_fn(b, dim)
        torch.testing.assert_close(ya, yb, equal_nan=True, atol=1e-6, rtol=1e-2 if dtype != torch.float32 else 1e-6)
        up = torch.ones_like(ya)
        (ga,), (gb,) = torch.autograd.grad(ya, a, up), torch.autograd.grad(yb, b, up)
        assert torch.equal(ga.isnan(), gb.isnan()), f"{family} grad NaN pattern"


@pytest.mark.parametrize("impl", cpu_backends())
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_dim_input(family, impl):
    ours_fn, torch_fn = FAMILIES[family]
    for value in (2.5, float("inf"), float("nan")):
        for dim in (0, -1):
            a = torch.tensor(value, requires_grad=True)
            b = torch.tensor(value, requires_grad=True)
            ya, yb = ours_fn(a, dim, impl=impl), torch_fn(b, dim)
            assert ya.shape == () and ya.dtype == yb.dtype
            torch.testing.assert_close(ya, yb, equal_nan=True)
            (ga,), (gb,) = torch.autograd.grad(ya, a), torch.autograd.grad(yb, b)
            torch.testing.assert_close(ga, gb, equal_nan=True)
    with pytest.raises(IndexError, match=r"range of \[-1, 0\], but got 1"):
        ours_fn(torch.tensor(1.0), 1)
    with pytest.raises(IndexError, match=r"range of \[-2, 1\], but got -3"):
        ours_fn(torch.randn(2, 3), -3)


def test_dtype_argument_and_integer_input():
    x = torch.arange(6).reshape(2, 3)
    for family, (ours_fn, torch_fn) in FAMILIES.items():
        torch.testing.assert_close(ours_fn(x, 1, dtype=torch.float32), torch_fn(x, 1, dtype=torch.float32))
        torch.testing.assert_close(ours_fn(x.float(), 0, dtype=torch.bfloat16),
                                   torch_fn(x.float(), 0, dtype=torch.bfloat16))
        with pytest.raises(RuntimeError, match="floating-point"):
            ours_fn(x, 1)


def test_implicit_dim_warns_like_torch():
    x = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="Implicit dimension") as record:
        ours = crossent.softmax(x)
    assert record[0].filename == __file__  # points at the caller
    with pytest.warns(UserWarning):
        theirs = F.softmax(x)
    torch.testing.assert_close(ours, theirs)


def test_explicit_impl_that_cannot_run_raises():
    with pytest.raises(ValueError, match="not a crossent backend"):
        crossent.softmax(torch.randn(2, 3), 1, impl="cuda")
    if not TRITON and importlib.util.find_spec("triton") is not None:
        with pytest.raises(RuntimeError, match="cannot run here"):
            crossent.log_softmax(torch.randn(2, 3), 1, impl="triton")


@pytest.mark.parametrize("impl", cpu_backends())
def test_gradcheck_float64(impl):
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    for dim in (0, 1, 2):
        assert torch.autograd.gradcheck(lambda t: crossent.log_softmax(t, dim, impl=impl), (x,))
        assert torch.autograd.gradcheck(lambda t: crossent.softmax(t, dim, impl=impl), (x,))
    y = torch.tensor([1, 0, -100])
    w = torch.tensor([0.5, -2.0, 3.0, 1.0], dtype=torch.float64)
    for reduction in ("none", "mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda t: crossent.nll_loss(t, y, w, reduction=reduction, impl=impl), (x[:, :, 0],))


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data(),
       family=st.sampled_from(sorted(FAMILIES)), impl=st.sampled_from(cpu_backends()),
       dtype=st.sampled_from([torch.float32, torch.float64]), strided=st.booleans())
def test_second_derivative_matches_torch(shape, data, family, impl, dtype, strided):
    """create_graph=True (a gradient penalty): the gradient is differentiable and its own
    gradient is torch's, on every backend, contiguous input (the lane) or strided."""
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    gen = torch.Generator().manual_seed(sum(shape) + dim)
    x = logits(tuple(shape), dtype, gen)
    if strided:
        x = torch.cat([x, x], -1)[..., ::2]  # the same values at stride 2
    w = torch.randn(x.shape, generator=gen, dtype=dtype)
    ours_fn, torch_fn = FAMILIES[family]
    hessian_vectors = []
    for fn, kw in ((ours_fn, dict(impl=impl)), (torch_fn, {})):
        a = x.detach().clone().requires_grad_() if not strided else x.detach().requires_grad_()
        (g,) = torch.autograd.grad((fn(a, dim, **kw) * w).sum(), a, create_graph=True)
        assert g.requires_grad
        hessian_vectors.append(torch.autograd.grad((g * g).sum(), a)[0])
    torch.testing.assert_close(*hessian_vectors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,dim", [((64, 10), 1), ((3, 5), 0), ((2, 3, 4), 1), ((7,), 0),
                                       ((0, 4), 1), ((300, 70), 1), ((2, 40, 300), 1),
                                       ((64, 10), -1), ((2, 3, 4), -2), ((7,), -1)], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_softmax_lane_gives_the_general_paths_bits(family, shape, dim, dtype, monkeypatch):
    """The common call (contiguous CPU input, ``_core.softmax._lane``) gives the general
    path's output and gradient bit for bit; strided input is left to the general path."""
    from crossent._core import softmax as sm

    if "numba" not in cpu_backends():
        pytest.skip("the lane runs the numba kernels")
    x = logits(shape, dtype, torch.Generator().manual_seed(5))
    up = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    fn = FAMILIES[family][0]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert sm._lane(a, dim, "numba", family == "log_softmax") is not None
    strided = torch.cat([x, x], -1)[..., ::2]
    assert (sm._lane(strided, dim, "numba", True) is None) == (x.numel() > 0)
    got = fn(a, dim, impl="numba")
    monkeypatch.setattr(sm, "_lane", lambda *args: None)
    want = fn(b, dim, impl="numba")
    assert torch.equal(got, want)
    got.backward(up)
    want.backward(up)
    assert torch.equal(a.grad, b.grad)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data(),
       family=st.sampled_from(sorted(FAMILIES)), scale=st.sampled_from([0.1, 3.0, 300.0]))
def test_property_matches_torch(shape, data, family, scale):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = logits(tuple(shape), torch.float32, torch.Generator().manual_seed(sum(shape)), scale)
    _check_family(family, x, dim, "auto")


# ---- nll_loss ------------------------------------------------------------------------------


def _check_nll(x, t, weight, reduction, impl, ignore_index=-100):
    # torch's K-dim backward rejects strided input ("grad_input must be contiguous"): it gets a copy.
    a, b = x.clone().requires_grad_(), x.contiguous().requires_grad_()
    ya = crossent.nll_loss(a, t, weight, ignore_index=ignore_index, reduction=reduction, impl=impl)
    yb = F.nll_loss(b, t, weight, ignore_index=ignore_index, reduction=reduction)
    assert ya.shape == yb.shape and ya.dtype == yb.dtype
    tol = {} if x.dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ya, yb, equal_nan=True, **tol)
    up = torch.randn(yb.shape, generator=torch.Generator().manual_seed(3)).to(x.dtype)
    (ga,), (gb,) = torch.autograd.grad(ya, a, up), torch.autograd.grad(yb, b, up)
    torch.testing.assert_close(ga, gb, equal_nan=True, **tol)


@pytest.mark.parametrize("impl", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(6,), (8, 5), (4, 5, 3, 2), (2, 3, 7)], ids=str)
def test_nll_loss_matches_torch(shape, reduction, dtype, impl):
    gen = torch.Generator().manual_seed(len(shape))
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    x = F.log_softmax(logits(shape, torch.float64, gen), 0 if len(shape) == 1 else 1).to(dtype)
    t = index_target(shape, n_classes, gen, ignore_fraction=0.0 if len(shape) == 1 else 0.3)
    for weight in (None, torch.rand(n_classes, generator=gen, dtype=torch.float64).to(dtype)):
        _check_nll(x, t, weight, reduction, impl)
    if len(shape) > 1:
        strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # read in place, with strides
        assert not strided.is_contiguous()
        _check_nll(strided, t, None, reduction, impl)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 4), c=st.integers(1, 5), extra=st.lists(st.integers(0, 4), max_size=3),
       layout=st.sampled_from(["channels_last", "permuted", "expanded", "sliced"]),
       reduction=st.sampled_from(["none", "mean", "sum"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
@example(n=0, c=1, extra=[2, 2], layout="permuted", reduction="none", dtype=torch.float32)
@example(n=2, c=3, extra=[2, 0], layout="channels_last", reduction="mean", dtype=torch.float32)
def test_nll_loss_reads_any_layout(n, c, extra, layout, reduction, dtype):
    """The input is read at its own strides (extra dims merged into one stride where they
    allow it, a dense copy where not): every layout gives torch's loss and gradient, empty
    ones too (an extra dim of 0 once made the layout helper fail)."""
    gen = torch.Generator().manual_seed(n * 100 + c)
    shape = (n, c, *extra)
    base = F.log_softmax(logits(shape, torch.float32, gen), 1).to(dtype).requires_grad_()
    if layout == "channels_last":  # the class dim innermost in memory
        view = base.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "permuted":  # extra dims reversed: no single stride walks them
        view = base.permute(0, 1, *reversed(range(2, len(shape))))
    elif layout == "expanded":  # a batch of one, broadcast: stride 0
        view = base[:1].expand(shape)
    else:
        view = base[:, :, *(slice(None, None, 2) for _ in extra)]
    t = index_target(view.shape, c, gen)
    ya = crossent.nll_loss(view, t, reduction=reduction, impl="numba")
    yb = F.nll_loss(view.contiguous(), t, reduction=reduction)
    tol = {} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ya, yb, equal_nan=True, **tol)  # NaN: every target ignored
    up = torch.randn(yb.shape, generator=gen).to(dtype)
    (ga,), (gb,) = torch.autograd.grad(ya, base, up), torch.autograd.grad(yb, base, up)
    torch.testing.assert_close(ga, gb, equal_nan=True, **tol)


@pytest.mark.parametrize("impl", cpu_backends())
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_nll_loss_weights_ignore_and_uint8(reduction, impl):
    gen = torch.Generator().manual_seed(4)
    x = F.log_softmax(logits((6, 3), torch.float32, gen), 1)
    x[0, 2] = float("-inf")
    t = torch.tensor([2, 0, 1, 2, 1, 0])
    weights = [torch.tensor([1.0, -1.0, 0.0]),              # negative and zero (-inf * 0 = NaN)
               torch.tensor([1.0, 1.0, -2.0]),              # weight sum 0 under "mean"
               torch.tensor([float("inf"), 1.0, 2.0]),      # inf weight
               torch.tensor([0.0, 0.0, 0.0])]               # 0/0
    for w in weights:
        _check_nll(x, t, w, reduction, impl)
    _check_nll(x, torch.full((6,), -100), None, reduction, impl)  # all ignored: mean is NaN
    _check_nll(x, t.to(torch.uint8), torch.rand(3, generator=gen), reduction, impl)
    # uint8 class 156 is -100 as uint8: a class like any other, never ignore_index
    wide = F.log_softmax(logits((3, 200), torch.float32, gen), 1)
    t8 = torch.tensor([156, 3, 199], dtype=torch.uint8)
    for w in (None, torch.rand(200, generator=gen)):
        _check_nll(wide, t8, w, reduction, impl)
        _check_nll(wide[0], t8[0], w, reduction, impl)
    _check_nll(x, torch.tensor([2, 1, 1, 2, 1, 0]), None, reduction, impl, ignore_index=1)
    x4 = F.log_softmax(logits((2, 3, 4, 2), torch.float32, gen), 1)
    t4 = torch.randint(0, 3, (2, 4, 2), generator=gen)
    with pytest.raises(RuntimeError, match="expected scalar type Long but found Byte"):
        F.nll_loss(x4, t4.to(torch.uint8))  # torch's K-dim kernels take int64 only
    with pytest.raises(RuntimeError, match="expected scalar type Long but found Byte.*target.long"):
        crossent.nll_loss(x4, t4.to(torch.uint8), impl=impl)
    _check_nll(x4, t4, None, reduction, impl)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16),
       reduction=st.sampled_from(["none", "mean", "sum"]), weighted=st.booleans(),
       ignored=st.sampled_from([0.0, 0.3, 1.0]))
def test_property_nll_loss_matches_torch(shape, seed, reduction, weighted, ignored):
    gen = torch.Generator().manual_seed(seed)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    x = F.log_softmax(logits(tuple(shape), torch.float32, gen), 0 if len(shape) == 1 else 1)
    t = index_target(shape, n_classes, gen, ignore_fraction=0.0 if len(shape) == 1 else ignored)
    w = torch.randn(n_classes, generator=gen) if weighted else None  # negative weights too
    _check_nll(x, t, w, reduction, "auto")


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 70), c=st.integers(1, 40), reduction=st.sampled_from(["mean", "sum"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       target_dtype=st.sampled_from([torch.int64, torch.uint8]), strided=st.booleans(),
       ignored=st.booleans(), grad=st.booleans())
def test_the_nll_lane_gives_the_general_paths_bits(n, c, reduction, dtype, target_dtype, strided,
                                                   ignored, grad):
    """The common call (``_core.nll.lane``: (N, C) CPU input at any strides, no weight) gives
    the general path's loss and gradient bit for bit, with an upstream factor."""
    from crossent._core import nll

    if "numba" not in cpu_backends():
        pytest.skip("the lane runs the numba kernels")
    gen = torch.Generator().manual_seed(n * 100 + c)
    x = torch.randn(n, 2 * c if strided else c + 2, generator=gen).log_softmax(1).to(dtype)
    x = x[:, ::2] if strided else x[:, :c]  # a column stride, or rows c + 2 apart
    t = torch.randint(0, c, (n,), generator=gen).to(target_dtype)
    if ignored and n:
        t[::3] = 255 if target_dtype == torch.uint8 else -100
    ignore_index = 255 if target_dtype == torch.uint8 else -100
    results = []
    for take in (True, False):
        a = x.detach().clone() if not strided else x.detach()
        a.requires_grad_()
        with torch.set_grad_enabled(grad):
            if take:
                loss = nll.lane(a, t, ignore_index, reduction, "numba")
                assert loss is not None
            else:
                loss = nll.nll(a, t, None, ignore_index, reduction, "numba")  # (general)
        assert loss.requires_grad == grad
        if grad:
            loss.backward(torch.tensor(1.5, dtype=loss.dtype))
        results.append((loss.detach(), a.grad))
    (got, got_grad), (want, want_grad) = results
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want) or (got.isnan() & want.isnan()).all()
    if grad:
        assert torch.equal(got_grad.nan_to_num(), want_grad.nan_to_num())


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(4, 5), (2, 5, 3), (5,), (3, 5, 2, 2)]),
       reduction=st.sampled_from(["none", "mean", "sum"]), weighted=st.booleans(),
       impl=st.sampled_from(cpu_backends() + ["auto"]), seed=st.integers(0, 2**16))
def test_nll_loss_double_backward_through_the_upstream_gradient(shape, reduction, weighted, impl,
                                                                 seed):
    """create_graph=True with an upstream gradient that itself requires grad (a double-backward
    Jacobian-vector product): the input's gradient is differentiable in it, as torch's."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).log_softmax(0 if len(shape) == 1 else 1)
    t = torch.randint(0, 5, shape[:1] + shape[2:], generator=gen) if len(shape) > 1 else \
        torch.tensor(3)
    t.view(-1)[-1] = -100
    weight = torch.rand(5, generator=gen) if weighted else None
    u = torch.randn(shape, generator=gen)
    results = []
    for fn in (lambda a: crossent.nll_loss(a, t, weight, reduction=reduction, impl=impl),
               lambda a: F.nll_loss(a, t, weight, reduction=reduction)):
        a = x.clone().requires_grad_()
        loss = fn(a)
        v = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        (g,) = torch.autograd.grad(loss, a, v, create_graph=True)
        assert g.requires_grad
        results.append(torch.autograd.grad((g * u).sum() + (v * v).sum(), v)[0])
    torch.testing.assert_close(*results, equal_nan=True)


@pytest.mark.parametrize("impl", [b for b in cpu_backends() if b != "torch"] + ["auto"])
@pytest.mark.parametrize("shape", [(4, 5), (2, 5, 3), (5,)])
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss_second_derivative_in_the_input(shape, weighted, impl):
    """d/dx of nll_loss's gradient (a Hessian, a gradient penalty on the log-probabilities):
    torch's first gradient requires grad and the second is zeros (the loss is linear);
    crossent's first gradient had no graph, so the second raised. -inf log-probabilities stay
    NaN-free. (The torch backend's gather has torch's gather backward: a gradient free of the
    input, as before.)"""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=gen).log_softmax(0 if len(shape) == 1 else 1)
    x.view(-1)[0] = -math.inf
    t = torch.randint(0, 5, shape[:1] + shape[2:], generator=gen) if len(shape) > 1 else \
        torch.tensor(3)
    weight = torch.rand(5, generator=gen) if weighted else None
    out = []
    for fn in (crossent.nll_loss, F.nll_loss):
        a = x.clone().requires_grad_()
        kw = dict(impl=impl) if fn is crossent.nll_loss else {}
        (g,) = torch.autograd.grad(fn(a, t, weight, **kw), a, create_graph=True)
        assert g.requires_grad
        out.append((g, torch.autograd.grad((g * g).sum(), a)[0]))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])


def test_the_nll_lane_raises_the_general_paths_errors():
    """An out-of-range index raises torch's class with the general path's message."""
    x = torch.randn(3, 4).log_softmax(1)
    t = torch.tensor([0, 9, 1])
    with pytest.raises(IndexError) as lane_error:
        crossent.nll_loss(x, t)
    with pytest.raises(IndexError) as general_error:
        crossent.nll_loss(x, t, torch.ones(4))
    assert str(lane_error.value) == str(general_error.value)


def test_nll_loss_errors():
    with pytest.raises(ValueError, match="Expected 1 or more dimensions.*shape \\(C,\\)"):
        crossent.nll_loss(torch.tensor(0.5), torch.tensor(0))
    for impl in cpu_backends():  # the shared check names the offender on every backend
        with pytest.raises(IndexError, match="Target 3 is out of bounds.*position 1"):
            crossent.nll_loss(torch.randn(2, 3), torch.tensor([0, 3]), impl=impl)


def test_nll_kernel_guards_its_indices():
    """The kernels never read or write outside a row, even when handed unvalidated targets."""
    from crossent.backends import numba_nll

    x = np.zeros((2, 3, 1), np.float32)
    loss = np.empty((2, 1), np.float32)
    for bad in (3, -1, 255):
        t = np.array([[0], [bad]], np.int64)
        loss[:] = 7.0
        *_, at = numba_nll._nll_forward(x, t, np.empty(0, np.float32), -100, loss)
        assert at == 1 and loss[1, 0] == 7.0  # the offender's position; its row not read
    grad = np.zeros((2, 3, 1), np.float32)
    t = np.array([[0], [7]], np.int64)
    grad[:] = np.nan  # the kernel zeroes its rows itself
    numba_nll._nll_backward(t, np.empty(0, np.float32), -100, np.empty((0, 0), np.float32), 1.0,
                            1.0, False, grad, 0, 2)
    assert grad[0, 0, 0] == -1.0 and np.count_nonzero(grad) == 1


def test_torch_compile_fullgraph():
    """Under torch.compile, impl="auto" takes the traceable torch path: one graph, same values."""
    x = torch.randn(4, 5, 3, requires_grad=True)
    t = torch.tensor([[0, 1, 2], [4, -100, 3], [0, 0, 1], [2, 2, 2]])

    def chain(lib, z):
        return lib.nll_loss(lib.log_softmax(z, 1), t) + lib.softmax(z, -1).square().sum()

    compiled = torch.compile(lambda z: chain(crossent, z), fullgraph=True, backend="aot_eager")
    ours, theirs = compiled(x), chain(F, x)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, x)[0])


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
    ours = crossent.nll_loss(crossent.log_softmax(x, 1), t, reduction="none")
    assert ours.shape == (2, 3, 3) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, F.cross_entropy(x, t, reduction="none"))
    assert not torch.isfinite(torch.log(torch.exp(x).sum(1))).all()  # what the naive form gives


# ---- Triton (child process) ----------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((3, 5), 1), ((3, 5), 0), ((2, 3, 4, 5), 1), ((4, 37, 3), -2),
                                       ((2, 3, 70), 1), ((5,), 0), ((2, 1, 3), 1)], ids=str)
@pytest.mark.parametrize("tile", [None, 8], ids=["one tile", "tiles of 8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_families_triton(family, tile, shape, dim, dtype, monkeypatch):
    from crossent.backends.triton import softmax as triton_softmax

    if tile:
        monkeypatch.setattr(triton_softmax, "_TILE_DEFAULT", tile)
        monkeypatch.setitem(triton_softmax.TILE, torch.float64, tile)
    x = logits(shape, dtype, torch.Generator().manual_seed(len(shape))).to(DEVICE)
    _check_family(family, x, dim, "triton")


@needs_triton
@pytest.mark.parametrize("family", FAMILIES)
def test_extremes_and_empty_triton(family):
    x = EXTREMES.to(DEVICE)
    ours_fn, torch_fn = FAMILIES[family]
    for xx, dim in [(x, 1), (x.t().contiguous(), 0)]:
        torch.testing.assert_close(ours_fn(xx, dim, impl="triton"), torch_fn(xx, dim), equal_nan=True)
    empty = torch.empty(0, 4, device=DEVICE)
    assert ours_fn(empty, 1, impl="triton").shape == (0, 4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(TRITON, reason="this process runs the Triton cases itself")
def test_triton_cases_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pytest", "tests/test_softmax_nll.py", "-q", "-x", "-k", "triton",
           "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_softmax_family_under_autocast_follows_the_devices_rule(family, monkeypatch):
    """torch's CUDA autocast runs softmax / log_softmax of 16-bit input in float32 (no dtype
    given); its CPU autocast keeps the 16-bit dtype. CPU: as torch. The CUDA rule, checked
    here by applying it to CPU (impl="torch": the numba lane is CPU's own path)."""
    from crossent._core import validate

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ours_fn, torch_fn = FAMILIES[family]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs, ours = torch_fn(x, 1), ours_fn(x, 1)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=2**-7)
    monkeypatch.setattr(validate, "AUTOCAST_SOFTMAX_FP32", {"cpu"})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ours_fn(x, 1, impl="torch")
        explicit = ours_fn(x, 1, dtype=torch.bfloat16, impl="torch")
    assert ours.dtype == torch.float32 and explicit.dtype == torch.bfloat16
    torch.testing.assert_close(ours, torch_fn(x.float(), 1))
