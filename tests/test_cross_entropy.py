"""Conformance grid: crossent.cross_entropy vs torch and the float64 reference, values and grads.

Every CPU backend runs the whole grid. Each case draws fresh seeded random data.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent._core import reference as _reference

from ._oracle import assert_close_to_reference, cpu_backends, index_target, logits, prob_target

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _run(impl, x, target, *, weight=None, reduction="mean", label_smoothing=0.0, ignore_index=-100,
         dtype, seed, what):
    """Forward and backward (random upstream gradient) through crossent, torch and the reference."""
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing,
                  ignore_index=ignore_index)
    x_ours = x.clone().requires_grad_()
    x_torch = x.clone().requires_grad_()
    x_ref = x.double().requires_grad_()
    ours = crossent.cross_entropy(x_ours, target, impl=impl, **kwargs)
    theirs = F.cross_entropy(x_torch, target, **kwargs)
    ref = _reference.cross_entropy(
        x_ref, target.double() if target.is_floating_point() else target,
        None if weight is None else weight.double(), ignore_index, reduction, label_smoothing)
    assert ours.shape == theirs.shape, what
    assert_close_to_reference(ours.detach(), theirs.detach(), ref.detach(), dtype, what + " loss")
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, x_ours, upstream.to(ours.dtype))
    (g_theirs,) = torch.autograd.grad(theirs, x_torch, upstream.to(theirs.dtype))
    (g_ref,) = torch.autograd.grad(ref, x_ref, upstream)
    assert g_ours.dtype == x.dtype
    assert_close_to_reference(g_ours, g_theirs, g_ref, dtype, what + " grad")


GRID = list(itertools.product(DTYPES, ["none", "mean", "sum"], [0.0, 0.1, 1.0], ["index", "probs"],
                              [False, True]))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype,reduction,smoothing,kind,weighted", GRID)
def test_grid(impl, dtype, reduction, smoothing, kind, weighted):
    seed = zlib.crc32(f"{dtype}{reduction}{smoothing}{kind}{weighted}".encode())  # stable per case
    gen = torch.Generator().manual_seed(seed)
    shape = (37, 13)
    x = logits(shape, dtype, gen)
    target = index_target(shape, 13, gen) if kind == "index" else prob_target(shape, dtype, gen)
    weight = (torch.rand(13, generator=gen, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    _run(impl, x, target, weight=weight, reduction=reduction, label_smoothing=smoothing, dtype=dtype,
         seed=seed, what=f"{impl} {dtype} {reduction} eps={smoothing} {kind} w={weighted}")


SHAPES = [(11,), (6, 7), (3, 5, 4), (2, 4, 3, 5), (2, 3, 2, 2, 3)]


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_shapes(impl, shape, kind, reduction):
    """Unbatched (C,), batched (N, C) and K-dimensional (N, C, d1..dk) inputs."""
    gen = torch.Generator().manual_seed(len(shape) * 7 + len(reduction))
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    x = logits(shape, torch.float64, gen)
    target = (index_target(shape, n_classes, gen, ignore_fraction=0.0 if len(shape) == 1 else 0.25)
              if kind == "index" else prob_target(shape, torch.float64, gen))
    weight = torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.5
    _run(impl, x, target, weight=weight, reduction=reduction, label_smoothing=0.2,
         dtype=torch.float64, seed=3, what=f"{shape} {kind} {reduction}")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("n_classes", [1, 2, 507, 50257, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_counts(impl, n_classes, dtype):
    """Odd and huge class counts (C > 64K), including a single class."""
    gen = torch.Generator().manual_seed(n_classes)
    rows = 5 if n_classes > 1000 else 29
    x = logits((rows, n_classes), dtype, gen)
    target = index_target((rows, n_classes), n_classes, gen)
    _run(impl, x, target, reduction="mean", label_smoothing=0.1, dtype=dtype, seed=n_classes,
         what=f"C={n_classes}")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits(impl, dtype):
    """Logits at +-1e4 (the seeds' naive exp overflows there) and -inf entries."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randint(0, 2, (16, 9), generator=gen) * 2 - 1).double() * 1e4
    x[:, 0] = torch.randn(16, generator=gen, dtype=torch.float64)  # a few moderate entries too
    x[3, 4] = x[7, 1] = x[7, 2] = float("-inf")
    target = index_target((16, 9), 9, gen)
    target[3], target[7] = 0, 5  # -inf only away from the target
    for reduction, smoothing in [("mean", 0.0), ("none", 0.0), ("sum", 0.3)]:
        _run(impl, x.to(dtype), target, reduction=reduction, label_smoothing=smoothing,
             dtype=dtype, seed=12, what=f"extreme {reduction} {smoothing}")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_all_ignored(impl, reduction, smoothing):
    """Every target ignored: mean is NaN as in torch, gradients are zero."""
    gen = torch.Generator().manual_seed(5)
    x = logits((6, 4), torch.float32, gen)
    target = torch.full((6,), -100)
    _run(impl, x, target, reduction=reduction, label_smoothing=smoothing, dtype=torch.float32,
         seed=5, what="all ignored")
    target = torch.full((6,), 2)
    _run(impl, x, target, ignore_index=2, weight=torch.rand(4, generator=gen), reduction=reduction,
         dtype=torch.float32, seed=6, what="all ignored, custom ignore_index")


@pytest.mark.parametrize("impl", BACKENDS)
def test_empty_batch(impl):
    for reduction in ["none", "mean", "sum"]:
        x = torch.randn(0, 5, requires_grad=True)
        t = torch.zeros(0, dtype=torch.long)
        ours = crossent.cross_entropy(x, t, reduction=reduction, impl=impl)
        theirs = F.cross_entropy(x, t, reduction=reduction)
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("impl", BACKENDS)
def test_uint8_target_and_legacy_arguments(impl):
    gen = torch.Generator().manual_seed(2)
    x = logits((8, 5), torch.float32, gen)
    t = index_target((8, 5), 5, gen, ignore_fraction=0.0)
    torch.testing.assert_close(crossent.cross_entropy(x, t.to(torch.uint8), impl=impl),
                               F.cross_entropy(x, t))
    with pytest.warns(UserWarning, match="size_average and reduce"):
        ours = crossent.cross_entropy(x, t, size_average=False, impl=impl)
    torch.testing.assert_close(ours, F.cross_entropy(x, t, reduction="sum"))
    # negative smoothing is accepted by torch and means no smoothing
    torch.testing.assert_close(crossent.cross_entropy(x, t, label_smoothing=-0.2, impl=impl),
                               F.cross_entropy(x, t, label_smoothing=-0.2))


@pytest.mark.parametrize("impl", BACKENDS)
def test_probability_target_gradient(impl):
    """Probability targets may require grad too (torch supports it)."""
    gen = torch.Generator().manual_seed(9)
    x = logits((7, 6), torch.float64, gen)
    weight = torch.rand(6, generator=gen, dtype=torch.float64)
    for reduction in ["none", "mean", "sum"]:
        tgt = prob_target((7, 6), torch.float64, gen)
        t_ours, t_torch = tgt.clone().requires_grad_(), tgt.clone().requires_grad_()
        ours = crossent.cross_entropy(x, t_ours, weight, reduction=reduction, label_smoothing=0.2,
                                      impl=impl)
        theirs = F.cross_entropy(x, t_torch, weight, reduction=reduction, label_smoothing=0.2)
        up = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
        (ga,) = torch.autograd.grad(ours, t_ours, up)
        (gb,) = torch.autograd.grad(theirs, t_torch, up)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 1e7, -1e15, 1e30])
def test_probability_target_gradient_at_large_logits(impl, dtype, offset):
    """d loss / d target = -(1 - eps) w log p with log p = (x - m) - log s, as torch forms it: as
    ``x - lse`` it lost log s with lse's rounding (float32 near 1e7: 1.0 for torch's 1.386)."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(9, 6, generator=gen, dtype=torch.float64) * 3 + offset).to(dtype)
    weight = (torch.rand(6, generator=gen, dtype=torch.float64) + 0.2).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for options in (dict(), dict(weight=weight, label_smoothing=0.2)):
        tgt = prob_target((9, 6), dtype, gen)
        t_ours, t_torch = tgt.clone().requires_grad_(), tgt.clone().requires_grad_()
        ours = crossent.cross_entropy(x, t_ours, reduction="none", impl=impl, **options)
        theirs = F.cross_entropy(x, t_torch, reduction="none", **options)
        torch.testing.assert_close(ours, theirs, **tol)
        up = torch.randn(9, generator=gen, dtype=torch.float64).to(dtype)
        (ga,) = torch.autograd.grad(ours, t_ours, up)
        (gb,) = torch.autograd.grad(theirs, t_torch, up)
        torch.testing.assert_close(ga, gb, **tol)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_gradcheck(impl, kind):
    """Analytic gradients of every option (incl. z_loss, softcap) against finite differences."""
    gen = torch.Generator().manual_seed(4)
    x = logits((4, 5), torch.float64, gen).requires_grad_()
    t = index_target((4, 5), 5, gen) if kind == "index" else prob_target((4, 5), torch.float64, gen)
    t[0] = 1 if kind == "index" else t[0]  # at least one counted row
    w = torch.rand(5, generator=gen, dtype=torch.float64) + 0.2
    for reduction in ["none", "mean", "sum"]:
        def f(x):
            return crossent.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.15,
                                          z_loss=1e-2, softcap=2.5, impl=impl)
        assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_z_loss_and_softcap_match_reference(impl, kind):
    gen = torch.Generator().manual_seed(8)
    shape = (9, 3, 4)
    x = logits(shape, torch.float32, gen, scale=10.0)
    t = index_target(shape, 3, gen) if kind == "index" else prob_target(shape, torch.float32, gen)
    w = torch.rand(3, generator=gen) + 0.5
    for reduction in ["none", "mean", "sum"]:
        opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
        ours = crossent.cross_entropy(x, t, w, impl=impl, **opts)
        ref = _reference.cross_entropy(x, t.double() if kind == "probs" else t, w, **opts)
        torch.testing.assert_close(ours.double(), ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("impl", BACKENDS)
def test_no_grad_and_inputs_untouched(impl):
    gen = torch.Generator().manual_seed(3)
    x = logits((10, 7), torch.float32, gen)
    t = index_target((10, 7), 7, gen)
    before = x.clone()
    with torch.no_grad():
        ours = crossent.cross_entropy(x.requires_grad_(), t, impl=impl, label_smoothing=0.1)
    assert ours.grad_fn is None
    torch.testing.assert_close(ours, F.cross_entropy(x, t, label_smoothing=0.1))
    assert torch.equal(x, before)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(impl, dtype):
    """The gradient lands in the logits' storage, equals the out-of-place one, and autograd
    refuses a later use of the overwritten logits."""
    gen = torch.Generator().manual_seed(6)
    base = logits((12, 9), dtype, gen)
    t = index_target((12, 9), 9, gen)
    h = base.clone().requires_grad_()
    expected, = torch.autograd.grad(crossent.cross_entropy(h * 1, t, impl=impl), h)

    h = base.clone().requires_grad_()
    z = h * 1  # non-leaf logits, as a model produces them
    loss = crossent.cross_entropy(z, t, impl=impl, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(h.grad, expected)
    assert torch.equal(z.detach(), expected)  # the gradient is the logits' storage

    h = base.clone().requires_grad_()
    z = h.exp()  # exp saves its output for backward
    loss = crossent.cross_entropy(z, t, impl=impl, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

    with pytest.raises(RuntimeError, match="leaf"):
        crossent.cross_entropy(base.clone().requires_grad_(), t, impl=impl, inplace_backward=True)

    probs = prob_target((12, 9), torch.float32, gen).requires_grad_()
    with pytest.raises(RuntimeError, match="probability targets"):
        crossent.cross_entropy(base.clone().requires_grad_() * 1, probs, impl=impl,
                               inplace_backward=True)


@pytest.mark.parametrize("impl", BACKENDS)
def test_module_matches_functional(impl):
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(6, generator=gen)
    mod = crossent.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.05, impl=impl)
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.05)
    assert "weight" in dict(mod.named_buffers()) and "weight" in mod.state_dict()
    x = logits((5, 6, 3), torch.float32, gen)
    t = index_target((5, 6, 3), 6, gen, ignore_fraction=0.0)
    torch.testing.assert_close(mod(x, t), ref(x, t))
    mod64 = mod.to(torch.float64)
    assert mod64.weight.dtype == torch.float64
    torch.testing.assert_close(mod64(x.double(), t), ref.to(torch.float64)(x.double(), t))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("case", ["plain rows", "weight set later", "weight removed later",
                                  "in place", "legacy", "3-d", "probabilities"])
def test_module_gives_the_functional_bits(impl, case):
    """The module (which sends plain calls straight to the functional layer's lane) gives the
    functional call's loss and gradient, bit for bit, whatever was set on it after __init__."""
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(6, generator=gen)
    x = logits((7, 6, 3) if case == "3-d" else (7, 6), torch.float32, gen)
    t = (prob_target((7, 6), torch.float32, gen) if case == "probabilities"
         else index_target(tuple(x.shape), 6, gen))
    kw = dict(label_smoothing=0.1, impl=impl)
    if case == "in place":
        kw["inplace_backward"] = True
    if case == "legacy":
        kw["size_average"] = False
    mod = crossent.CrossEntropyLoss(weight=w if case == "weight removed later" else None, **kw)
    if case == "weight set later":
        mod.weight = w
    if case == "weight removed later":
        mod.weight = None
        w = None
    if case == "legacy":
        kw = dict(kw, reduction="sum")
        del kw["size_average"]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = mod(a * 1, t)  # (not a leaf: in place)
    want = crossent.cross_entropy(b * 1, t, weight=mod.weight, **kw)
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    assert torch.equal(a.grad, b.grad)


def test_cross_entropy_with_lse():
    gen = torch.Generator().manual_seed(7)
    x = logits((3, 4, 5), torch.float32, gen)
    t = index_target((3, 4, 5), 4, gen)
    loss, lse = crossent.cross_entropy_with_lse(x, t, reduction="none")
    assert lse.shape == t.shape and lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(x, 1))
    torch.testing.assert_close(loss, F.cross_entropy(x, t, reduction="none"))


def test_no_grad_makes_no_gradient_even_for_inputs_requiring_grad(monkeypatch):
    """Under no_grad the kernel is asked for the loss only (no (N, C) gradient buffer)."""
    from crossent.backends import torch_fused

    seen = []
    real = torch_fused.cross_entropy

    def spy(logits, target, weight, want_grad, params):
        seen.append(want_grad)
        out = real(logits, target, weight, want_grad, params)
        seen.append(out[2])
        return out

    monkeypatch.setattr(torch_fused, "cross_entropy", spy)
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        crossent.cross_entropy(x, t, impl="torch")
    crossent.cross_entropy(x, t, impl="torch")
    assert seen[0] is False and seen[1] is None and seen[2] is True and seen[3] is not None


@pytest.mark.parametrize("impl", BACKENDS)
def test_gradient_buffer_freed_after_backward_and_retain_graph(impl):
    """The (R, C) gradient is released by backward (not kept alive by the loss), and
    retain_graph=True gives the same gradient twice."""
    gen = torch.Generator().manual_seed(10)
    x = logits((6, 5), torch.float32, gen).requires_grad_()
    t = index_target((6, 5), 5, gen)
    loss = crossent.cross_entropy(x, t, reduction="sum", impl=impl)
    g1, = torch.autograd.grad(loss * 2, x, retain_graph=True)
    g2, = torch.autograd.grad(loss * 2, x)
    torch.testing.assert_close(g1, g2)
    with pytest.raises(RuntimeError, match="second time|freed"):
        torch.autograd.grad(loss, x)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("kind", ["index", "probs", "kdim", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("change", ["mul_", "data", "hook"])
def test_a_returned_gradient_is_the_callers_own(impl, kind, reduction, change):
    """The gradient made in forward is handed out by backward; under retain_graph=True as a
    copy, so that changing what backward returned (clipping in place, through ``.data``, a hook
    that edits its gradient) leaves the next backward's gradient whole, as torch's. Handed out
    as the buffer itself, the second backward raised an in-place error or, through ``.data``,
    silently read zeros."""
    gen = torch.Generator().manual_seed(12)
    shape = (6, 5, 3) if kind == "kdim" else (6, 5)
    x = logits(shape, torch.float32, gen).requires_grad_()
    t = prob_target(shape, torch.float32, gen) if kind == "probs" else index_target(shape, 5, gen)
    w = torch.rand(5, generator=gen) + 0.5 if kind == "weighted" else None

    def grads(fn):
        h = x.detach().clone().requires_grad_()
        z = h * 1  # a non-leaf, so that a hook on it sees the loss's gradient
        loss = fn(z, t, weight=w, reduction=reduction)
        loss = loss.sum() if reduction == "none" else loss
        out = []
        if change == "hook":
            z.register_hook(lambda g: g.mul_(2))
            for _ in range(2):
                h.grad = None
                loss.backward(retain_graph=True)
                out.append(h.grad.clone())
            return out
        for _ in range(2):
            (g,) = torch.autograd.grad(loss, z, retain_graph=True)
            out.append(g.clone())
            (g.data.zero_() if change == "data" else g.mul_(0.5))
        return out

    ours = grads(lambda *a, **k: crossent.cross_entropy(*a, impl=impl, **k))
    theirs = grads(F.cross_entropy)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


class _Logged(torch.Tensor):
    """A ``__torch_function__`` subclass that records the functions it is handed."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_with_lse", "nll_loss",
                                  "log_softmax", "softmax", "linear_cross_entropy"])
@pytest.mark.parametrize("which", ["input", "target"])
def test_torch_function_subclasses_get_the_call(name, which):
    """As torch's functional API: a ``__torch_function__`` override among the tensors is handed
    crossent's function and its result comes back as the subclass (crossent's nll_loss had
    returned a plain tensor and no override saw any call)."""
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 5, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    w = torch.randn(5, 3, generator=gen)
    if which == "target" and name in ("log_softmax", "softmax"):
        pytest.skip("no target")
    args = {"cross_entropy": (x, t), "cross_entropy_with_lse": (x, t), "nll_loss": (x, t),
            "log_softmax": (x, 1), "softmax": (x, 1), "linear_cross_entropy": (x[:, :3], w, t)}
    plain = getattr(crossent, name)(*args[name])
    wrapped = list(args[name])
    pos = 0 if which == "input" else len(wrapped) - 1
    wrapped[pos] = wrapped[pos].as_subclass(_Logged)
    _Logged.seen = []
    out = getattr(crossent, name)(*wrapped)
    assert _Logged.seen[0] is getattr(crossent, name)
    for got, want in zip(*((o,) if isinstance(o, torch.Tensor) else o for o in (out, plain))):
        assert type(got) is _Logged
        torch.testing.assert_close(got.as_subclass(torch.Tensor), want)


_AUTOCAST_CASES = {
    "ce": lambda f, a, t, w, p: f.cross_entropy(a, t),
    "ce none": lambda f, a, t, w, p: f.cross_entropy(a, t, reduction="none"),
    "ce float32 weight": lambda f, a, t, w, p: f.cross_entropy(a, t, weight=w),
    "ce 16-bit weight, smoothing": lambda f, a, t, w, p: f.cross_entropy(
        a, t, weight=w.to(a.dtype), label_smoothing=0.1),
    "ce probabilities": lambda f, a, t, w, p: f.cross_entropy(a, p),
    "ce K-dim": lambda f, a, t, w, p: f.cross_entropy(a.reshape(2, 4, 5).transpose(1, 2),
                                                      t.reshape(2, 4)),
    "nll": lambda f, a, t, w, p: f.nll_loss(a.log_softmax(1), t),
    "nll float32 weight, none": lambda f, a, t, w, p: f.nll_loss(a.log_softmax(1), t, weight=w,
                                                                 reduction="none"),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(_AUTOCAST_CASES))
def test_autocast_runs_the_losses_in_float32_as_torch(case, dtype):
    """Under torch.autocast torch runs cross_entropy and nll_loss in float32: a float32 loss,
    weights of any float dtype. crossent had returned the 16-bit loss (3 digits; a GradScaler's
    65536 upstream overflows float16) and refused a float32 weight."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 5, generator=gen).to(dtype)
    t = torch.randint(0, 5, (8,), generator=gen)
    t[0] = -100
    w, p = torch.rand(5, generator=gen), torch.randn(8, 5, generator=gen).softmax(1)
    out = []
    for module in (F, crossent):
        a = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            loss = _AUTOCAST_CASES[case](module, a, t, w, p)
        out.append((loss, torch.autograd.grad(loss.sum(), a)[0]))
    (ours, g_ours), (theirs, g_theirs) = out[1], out[0]
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)
