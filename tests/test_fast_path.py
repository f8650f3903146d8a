"""The pieces that make a small call cheap: arrays made from tensor addresses inside numba
(``crossent.backends._numba_views``), ``fast_apply`` (``crossent._core.autograd``) and the
common call's lane (``crossent._core.lane``, which must give the general path's bits).

A view must cover exactly the tensor's own elements, in every layout the backends pass, and
the fast apply must give what ``Function.apply`` gives, falling back to it wherever its Python
prologue does work (functorch transforms, escaped functorch tensors, tracing)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from numba import njit  # noqa: E402

import crossent  # noqa: E402
from crossent._core.autograd import fast_apply  # noqa: E402
from crossent.backends import _numba_views as views  # noqa: E402


@njit(cache=True)
def _copy_strided3(addr, like, shape, strides, out):
    """Reads every element of the strided view into ``out`` (same shape, contiguous)."""
    x = views.strided3(addr, like, shape, strides)
    for i in range(shape[0]):
        for j in range(shape[1]):
            for k in range(shape[2]):
                out[i, j, k] = x[i, j, k]


@njit(cache=True)
def _fill_rows(addr, like, n, c, value):
    x = views.rows(addr, like, n, c)
    for i in range(n):
        for j in range(c):
            x[i, j] = value + i * c + j


@njit(cache=True)
def _sum_flat(addr, like, n):
    t = views.flat(addr, like, n)
    total = 0
    for i in range(n):
        total += t[i]
    return total


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(1, 7), s=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       layout=st.sampled_from(["contiguous", "rows", "permuted", "sliced"]))
def test_a_strided_view_reads_exactly_the_tensor(n, c, s, dtype, layout):
    """Every element read through the address equals torch's element, in the layouts the
    backends pass: contiguous ``(N, C, S)``, ``(R, C)`` rows as ``(1, C, R)``, a permuted
    tensor and a slice of a larger one (its storage beyond the view is never read)."""
    base = torch.randn(n + 2, c + 3, s + 4).to(dtype)
    if layout == "contiguous":
        t = base[:n, :c, :s].contiguous()
    elif layout == "rows":
        t = base[0, :c, :s].T.contiguous().T.unsqueeze(0)  # (1, C, R) view of (R, C) rows
    elif layout == "permuted":
        t = base[:n, :c, :s].contiguous().permute(2, 1, 0)
    else:
        t = base[1:n + 1, 2:c + 2, 1:s + 1]
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # compared bit for bit
    out = torch.empty(t.shape, dtype=bits)
    _copy_strided3(t.data_ptr(), views.LIKE[dtype], tuple(t.shape), t.stride(),
                   out.numpy().view(views.LIKE[dtype].dtype))
    assert torch.equal(out, t.contiguous().view(bits))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_flat_and_row_views_stay_inside_the_tensor(dtype):
    """``flat`` reads the tensor's values (int64 and uint8 targets); ``rows`` writes every
    element of a tensor in a larger buffer and nothing around it."""
    t = torch.arange(1, 11, dtype=dtype)
    assert _sum_flat(t.data_ptr(), views.LIKE[dtype], t.numel()) == int(t.sum())
    buf = torch.zeros(5, 8)
    inner = buf[1:4]  # rows 1..3, contiguous
    _fill_rows(inner.data_ptr(), views.LIKE[torch.float32], 3, 8, 1.0)
    assert torch.equal(inner, torch.arange(24, dtype=torch.float32).reshape(3, 8) + 1)
    assert not buf[0].any() and not buf[4].any()


class _Scale(torch.autograd.Function):
    """y = 3 x, with an option and a non-tensor output, like crossent's Functions."""

    @staticmethod
    def forward(ctx, x, t, factor):
        ctx.factor = factor
        return x * factor, t.sum().item()

    @staticmethod
    def backward(ctx, g, _):
        return g * ctx.factor, None, None


_scale = fast_apply(_Scale)


def test_fast_apply_gives_what_apply_gives():
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.arange(4)
    y, s = _scale(x, t, 3.0)
    y_ref, s_ref = _Scale.apply(x, t, 3.0)
    assert torch.equal(y, y_ref) and s == s_ref
    assert type(y.grad_fn) is type(y_ref.grad_fn)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.full_like(x, 3.0))


def test_fast_apply_under_functorch_transforms():
    """vmap and grad need ``Function.apply``'s own routing: the fast apply defers to it (and
    raises what it raises for a Function without ``setup_context``; crossent's public
    functions compute elementary ops under transforms instead, see test_transforms)."""
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vmap(lambda r: _scale(r, torch.arange(2), 3.0)[0])(x)


def test_fast_apply_with_an_escaped_functorch_tensor():
    """A tensor that escaped a transform takes ``Function.apply``'s path (which unwraps it, or
    raises its own error), never the C entry with a wrapper the kernel cannot read."""
    leaked = []
    torch.func.vmap(lambda r: (leaked.append(r), r.sum())[1])(torch.randn(3, 4))
    wrapped = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(wrapped)
    calls = []
    original = _Scale.apply
    try:
        _Scale.apply = classmethod(lambda cls, *a: calls.append(a) or (None, 0))
        fast = fast_apply(_Scale)
        fast(wrapped, torch.arange(2), 1.0)
        fast(torch.randn(2), wrapped, 1.0)
    finally:
        _Scale.apply = original
    assert len(calls) == 2


# ---- the common call's lane (crossent._core.lane) ------------------------------------------


def _general(x, t, **kw):
    """The same call through the general path (``_cross_entropy``), never the lane."""
    from crossent.functional import _cross_entropy

    opts = dict(weight=None, size_average=None, ignore_index=-100, reduce=None,
                reduction="mean", label_smoothing=0.0, impl="auto", z_loss=0.0, softcap=None,
                inplace_backward=False)
    opts.update(kw)
    loss, _ = _cross_entropy(x, t, opts["weight"], opts["size_average"], opts["ignore_index"],
                             opts["reduce"], opts["reduction"], opts["label_smoothing"],
                             opts["impl"], opts["z_loss"], opts["softcap"],
                             opts["inplace_backward"], want_lse=False)
    return loss


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 70), c=st.integers(1, 140),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       smoothing=st.sampled_from([0.0, 0.2]), z_loss=st.sampled_from([0.0, 1e-3]),
       softcap=st.sampled_from([None, 5.0]), ignored=st.booleans(),
       impl=st.sampled_from(["auto", "numba", "torch"]), grad=st.booleans(),
       strided=st.booleans())
def test_the_lane_gives_the_general_paths_bits(n, c, dtype, reduction, smoothing, z_loss, softcap,
                                               ignored, impl, grad, strided):
    """The common call gives the general path's loss and gradient, bit for bit, over the
    options, dtypes, backends and layouts (rows and targets at a stride: it only skips checks
    that pass and lookups it kept)."""
    from crossent._core import lane

    x = (torch.randn(n, c) * 4).to(dtype)
    t = torch.randint(0, c, (n, 1 + strided))[:, 0]  # every other index of the storage
    if ignored and n:
        t[:: 3] = -100
    kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z_loss, softcap=softcap,
              impl=impl)
    a = torch.empty_strided((n, c), (c + 3 * strided, 1), dtype=dtype)  # rows 3 values apart
    a, b = a.copy_(x).requires_grad_(), x.clone().requires_grad_()
    with torch.set_grad_enabled(grad):
        taken = lane.cross_entropy(a, t, -100, reduction, smoothing, z_loss, softcap, impl)
        assert (taken is not None) == (a.stride(1) == 1)
        got = crossent.cross_entropy(a, t, **kw)
        want = _general(b, t, **kw)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want) or (got.isnan() == want.isnan()).all()
    assert got.requires_grad == want.requires_grad == grad
    if grad:
        # an upstream factor other than 1 (reduced: every other call), as under a loss scale
        up = torch.randn_like(got) if reduction == "none" or n % 2 else None
        got.backward(up)
        want.backward(up)
        assert torch.equal(a.grad.nan_to_num(), b.grad.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 100), (2000, 12), (600, 32), (70, 4000)])
def test_the_lane_gives_the_general_paths_bits_above_the_thread_split(shape, dtype):
    """Calls large enough to split over torch's OpenMP team (``PARALLEL_MIN`` elements) take
    the lane too, with the general path's bits: loss and gradient, with smoothing and ignored
    rows."""
    gen = torch.Generator().manual_seed(shape[0])
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    t = torch.randint(0, shape[1], (shape[0],), generator=gen)
    t[::5] = -100
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = crossent.cross_entropy(a, t, label_smoothing=0.1)
    want = _general(b, t, label_smoothing=0.1)
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("case", ["weight", "uint8 target", "3-d", "column slice", "legacy",
                                  "in place", "probabilities", "int32 target"])
def test_the_lane_leaves_other_calls_to_the_general_path(case):
    """Calls the lane does not take return None there (the general path checks them)."""
    from crossent._core import lane

    x, t = torch.randn(6, 5), torch.randint(0, 5, (6,))
    if case == "uint8 target":
        t = t.to(torch.uint8)
    elif case == "int32 target":
        t = t.int()
    elif case == "3-d":
        x, t = torch.randn(2, 5, 3), torch.randint(0, 5, (2, 3))
    elif case == "column slice":
        x = torch.randn(5, 6).t()  # class dim at a stride
    elif case == "probabilities":
        t = torch.softmax(torch.randn(6, 5), 1)
    if case in ("weight", "legacy", "in place"):
        # decided by the public function before the lane
        kw = {"weight": dict(weight=torch.rand(5)), "legacy": dict(size_average=False),
              "in place": dict(inplace_backward=True)}[case]
        calls = []
        real = lane.cross_entropy
        try:
            lane.cross_entropy = lambda *a: calls.append(a) or real(*a)
            crossent.cross_entropy(x.requires_grad_() * 1, t, **kw)  # (not a leaf: in place)
        finally:
            lane.cross_entropy = real
        assert calls == []
        return
    assert lane.cross_entropy(x, t, -100, "mean", 0.0, 0.0, None, "auto") is None
    # and the public call still does what torch does (int32 targets: torch's error class)
    try:
        want = torch.nn.functional.cross_entropy(x, t)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            crossent.cross_entropy(x, t)
        return
    torch.testing.assert_close(crossent.cross_entropy(x, t), want)


def test_the_lane_keeps_a_bounded_number_of_plans():
    """A label-smoothing schedule (a new option value every call) gives the right loss every
    call and keeps at most ``MAX_PLANS`` plans."""
    from crossent._core import dispatch, lane

    x, t = torch.randn(4, 6), torch.randint(0, 6, (4,))
    for i in range(dispatch.MAX_PLANS + 20):
        eps = i / 1000
        torch.testing.assert_close(crossent.cross_entropy(x, t, label_smoothing=eps),
                                   torch.nn.functional.cross_entropy(x, t, label_smoothing=eps))
    assert len(lane._PLANS) <= dispatch.MAX_PLANS


def test_the_lane_keeps_no_plan_while_the_backend_is_unsettled(monkeypatch):
    """While numba loads, ``auto`` runs on torch: the lane uses that call for the call only,
    and keeps the plan once numba is ready (the numba kernel then runs). (The Python lane's:
    the compiled node is loaded only once numba is.)"""
    from crossent._core import dispatch, lane
    from crossent.backends import native

    monkeypatch.setattr(native, "module", None)
    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(lane, "_PLANS", {})
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    monkeypatch.setattr(dispatch, "ready", lambda name: name != "numba")
    x, t = torch.randn(4, 6), torch.randint(0, 6, (4,))
    want = torch.nn.functional.cross_entropy(x, t)
    torch.testing.assert_close(crossent.cross_entropy(x, t), want)
    assert lane._PLANS == {}
    monkeypatch.setattr(dispatch, "ready", lambda name: True)
    torch.testing.assert_close(crossent.cross_entropy(x, t), want)
    from crossent.backends import numba_cpu

    plan, = lane._PLANS.values()
    assert plan.call is numba_cpu.cross_entropy and plan.launch is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_cls", [4, 40])  # the lane's two launches (few classes, rows)
def test_the_lane_raises_the_general_paths_errors(dtype, n_cls):
    """An out-of-range target and bad options raise what the general path raises."""
    from crossent._core import lane

    x, t = torch.randn(3, n_cls).to(dtype), torch.tensor([0, n_cls + 3, 1])
    with pytest.raises(IndexError) as lane_error:
        crossent.cross_entropy(x, t)
    with pytest.raises(IndexError) as general_error:
        _general(x, t)
    assert str(lane_error.value) == str(general_error.value)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError) as lane_error:
        lane.cross_entropy(x, t, -100, "mean", 1.5, 0.0, None, "auto")
    with pytest.raises(RuntimeError) as general_error:
        _general(x, t, label_smoothing=1.5)
    assert str(lane_error.value) == str(general_error.value)
