"""The pieces that make a small call cheap: arrays made from tensor addresses inside numba
(``crossent.backends._numba_views``) and ``fast_apply`` (``crossent._core.autograd``).

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
    raises what it raises for a Function without ``setup_context``)."""
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vmap(lambda r: _scale(r, torch.arange(2), 3.0)[0])(x)
    # crossent's loss under vmap raises as Function.apply did before the fast path existed
    # (its Functions define no setup_context: vmap of crossent is not supported yet)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vmap(crossent.cross_entropy)(torch.randn(5, 4, 6), torch.randint(0, 6, (5, 4)))


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
