"""The cross-entropy family under functorch transforms (``torch.func``), against torch's.

vmap, grad, vmap(grad) (per-sample gradients), jacrev, jvp and hessian of every public
function, over a grid of options (weights, ignore_index, all targets ignored, smoothing,
z_loss, reductions, probability targets, uint8 indices, 1-d / 2-d / K-dim input, -inf logits)
on fresh random data: the values must equal torch's under the same transform, and z_loss /
softcap (which torch lacks) must equal the float64 reference's. Out-of-range targets raise
torch's class.
"""
from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent._core import reference as _reference

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-9, atol=1e-12),
       torch.bfloat16: dict(rtol=2**-7, atol=2**-7)}


def _close(ours, theirs, dtype, what):
    for a, b in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"{what}: {m}", **TOL[dtype])


def _data(shape, dtype, seed, probs=False, ignored=0.3, uint8=False, neg_inf=False,
          ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3)
    if neg_inf:
        x.view(-1)[:: 7] = -math.inf
    x = x.to(dtype)
    class_dim = 0 if len(shape) == 1 else 1
    n_cls = shape[class_dim]
    if probs:
        t = torch.randn(shape, generator=gen, dtype=torch.float64).softmax(class_dim).to(dtype)
    else:
        index_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
        t = torch.randint(0, n_cls, index_shape, generator=gen)
        t = torch.where(torch.rand(index_shape, generator=gen) < ignored, ignore_index, t)
        if uint8:
            t = t.to(torch.uint8)  # -100 wraps to 156: a class like any other (C > 156 here)
    return x, t


def _exact(fn, kw):
    """torch's ``fn(a, b, **kw)``; for bfloat16 computed in float64 and rounded once (torch's
    own bfloat16 composites round each intermediate: two roundings apart from ours, computed
    in float32, where its probability targets or weights enter). uint8 indices are passed as
    int64: torch's batching rules (vmap, jacrev) reject uint8, its eager kernels read both the
    same (tested in test_cross_entropy)."""
    def run(a, b):
        b = b.long() if b.dtype == torch.uint8 else b
        if a.dtype != torch.bfloat16:
            return fn(a, b, **kw)
        k = {n: v.double() if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
        return fn(a.double(), b.double() if b.is_floating_point() else b, **k).to(a.dtype)
    return run


def _transforms(f, g, args, batched):
    """``(name, ours, torch's)`` thunks: each transform of ``f`` (crossent) and ``g`` (torch)
    over ``args`` (the first is differentiated; ``batched`` args get a leading vmap dim)."""
    x = args[0]
    rest = args[1:]
    dims = tuple(0 if b else None for b in batched)

    def stacked(a, b):
        return torch.stack([a, a.flip(0) if a.dim() else a]) if b else a

    vargs = [stacked(a, b) for a, b in zip(args, batched)]

    def looped(h):  # what vmap of h means, one sample at a time
        return torch.stack([h(*[a[i] if b else a for a, b in zip(vargs, batched)])
                            for i in range(2)])

    def grad_sum(h):
        return torch.func.grad(lambda *a: h(*a).sum())

    out = {
        "grad": (lambda h: grad_sum(h)(x, *rest), None),
        "vmap": (lambda h: torch.func.vmap(h, in_dims=dims)(*vargs), looped),
        "vmap(grad)": (lambda h: torch.func.vmap(grad_sum(h), in_dims=dims)(*vargs),
                       lambda h: looped(grad_sum(h))),
        "jacrev": (lambda h: torch.func.jacrev(lambda x_: h(x_, *rest))(x), None),
        "jvp": (lambda h: torch.func.jvp(lambda x_: h(x_, *rest), (x,), (torch.ones_like(x),)),
                None),
    }
    if x.dtype == torch.float64:
        out["hessian"] = (lambda h: torch.func.hessian(lambda x_: h(x_, *rest).sum())(x), None)
    return [(name, lambda t=t: t(f), lambda t=t: t(g), loop and (lambda loop=loop: loop(g)))
            for name, (t, loop) in out.items()]


def _run_both(name, ours, theirs, theirs_looped, dtype, what):
    """Ours equals torch's under the transform; where torch's own ops cannot be vmapped (label
    smoothing with weights: "vmap: ... masked_select"), torch's sample by sample. Where torch
    raises, ours raises its class."""
    try:
        expected = theirs()
    except Exception as e:
        try:
            if theirs_looped is None:
                raise
            expected = theirs_looped()
        except Exception as e_looped:
            with pytest.raises((type(e), type(e_looped))):
                ours()
            return
    _close(ours(), expected, dtype, f"{what} {name}")


DTYPES = [torch.float32, torch.float64, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]
CE_CASES = list(itertools.product(
    [(6, 5), (5,), (3, 4, 2, 3)],  # 1-d, rows, K-dim
    DTYPES, REDUCTIONS,
    [dict(), dict(weight=True), dict(label_smoothing=0.2), dict(weight=True, label_smoothing=0.1),
     dict(ignore_index=1), dict(all_ignored=True), dict(probs=True),
     dict(probs=True, weight=True, label_smoothing=0.3), dict(neg_inf=True)],
)) + list(itertools.product(  # uint8 class 156 (= -100 as uint8); torch's K-dim takes int64 only
    [(4, 200)], DTYPES, REDUCTIONS, [dict(uint8=True), dict(uint8=True, weight=True)]))


@pytest.mark.parametrize("shape,dtype,reduction,opts", CE_CASES,
                         ids=[f"{s}-{str(d)[6:]}-{r}-{'+'.join(o) or 'plain'}"
                              for s, d, r, o in CE_CASES])
def test_cross_entropy_and_nll_under_transforms(shape, dtype, reduction, opts):
    seed = zlib.crc32(f"{shape} {dtype} {reduction} {opts}".encode())
    x, t = _data(shape, dtype, seed, probs=opts.get("probs", False),
                 ignored=1.0 if opts.get("all_ignored") else 0.3, uint8=opts.get("uint8", False),
                 neg_inf=opts.get("neg_inf", False), ignore_index=opts.get("ignore_index", -100))
    class_dim = 0 if len(shape) == 1 else 1
    n_cls = shape[class_dim]
    kw = dict(reduction=reduction, label_smoothing=opts.get("label_smoothing", 0.0),
              ignore_index=opts.get("ignore_index", -100))
    if opts.get("weight"):
        w = torch.rand(n_cls, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        kw["weight"] = (w - 0.2).to(dtype)  # some negative, as users pass them
    cases = [("cross_entropy", lambda a, b: crossent.cross_entropy(a, b, **kw),
              _exact(F.cross_entropy, kw))]
    if not opts.get("probs") and not opts.get("label_smoothing"):
        nkw = {k: v for k, v in kw.items() if k != "label_smoothing"}
        cases.append(("nll(log_softmax)",
                      lambda a, b: crossent.nll_loss(crossent.log_softmax(a, class_dim), b, **nkw),
                      _exact(lambda a, b, **k: F.nll_loss(F.log_softmax(a, class_dim), b, **k),
                             nkw)))
    for name, f, g in cases:
        for tname, *thunks in _transforms(f, g, (x, t), (True, True)):
            _run_both(tname, *thunks, dtype, f"{name} {shape} {dtype} {reduction} {opts}")


@pytest.mark.parametrize("shape,dim", [((5, 7), 1), ((5, 7), 0), ((2, 3, 4), -1), ((6,), 0),
                                       ((3, 0), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("log", [True, False])
def test_softmax_family_under_transforms(shape, dim, dtype, log):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 10 + dim)) * 3
    if shape == (5, 7):
        x[1, ::2] = -math.inf
    x = x.to(dtype)
    ours = crossent.log_softmax if log else crossent.softmax
    theirs = _exact(lambda v, _, dim: (F.log_softmax if log else F.softmax)(v, dim), dict(dim=dim))
    # vmap adds a leading dim: a non-negative dim keeps its meaning inside the vmapped function
    for tname, *thunks in _transforms(lambda v: ours(v, dim), lambda v: theirs(v, v), (x,),
                                      (True,)):
        name = f"{'log_' if log else ''}softmax {shape} dim={dim} {dtype}"
        _run_both(tname, *thunks, dtype, name)


@pytest.mark.parametrize("z_loss,softcap", [(1e-3, None), (0.0, 2.0), (1e-2, 5.0)])
def test_extras_under_transforms_match_the_reference(z_loss, softcap):
    """z_loss and softcap have no torch counterpart: vmap and grad against the float64
    reference's own autograd."""
    x, t = _data((6, 9), torch.float64, seed=11)
    kw = dict(z_loss=z_loss, softcap=softcap, reduction="sum")
    ours = torch.func.vmap(torch.func.grad(lambda a, b: crossent.cross_entropy(a, b, **kw)))(
        x[:, None], t[:, None])
    ref = torch.func.vmap(torch.func.grad(lambda a, b: _reference.cross_entropy(a, b, **kw)))(
        x[:, None], t[:, None])
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    ours = torch.func.vmap(lambda a, b: crossent.cross_entropy(a, b, **kw))(x[:, None], t[:, None])
    ref = torch.stack([_reference.cross_entropy(x[i:i + 1], t[i:i + 1], **kw) for i in range(6)])
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_under_transforms(bias, reduction, dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, generator=gen, dtype=dtype)
    w = torch.randn(11, 8, generator=gen, dtype=dtype)
    b = torch.randn(11, generator=gen, dtype=dtype) if bias else None
    t = torch.randint(0, 11, (6,), generator=gen)
    t[1] = -100
    kw = dict(linear_bias=b, reduction=reduction, label_smoothing=0.1)

    def ours(x_, t_, w_=w):
        return crossent.linear_cross_entropy(x_, w_, t_, **kw)

    def theirs(x_, t_, w_=w):
        return F.linear_cross_entropy(x_, w_, t_, **kw)

    for tname, *thunks in _transforms(ours, theirs, (x, t), (True, True)):
        _run_both(tname, *thunks, dtype, f"linear_cross_entropy {reduction} bias={bias}")
    # the weight's gradient, per sample (the usual reason to vmap a loss)
    per_sample = torch.func.vmap(torch.func.grad(lambda w_, x_, t_: ours(x_, t_, w_).sum()),
                                 in_dims=(None, 0, 0))
    expected = torch.func.vmap(torch.func.grad(lambda w_, x_, t_: theirs(x_, t_, w_).sum()),
                               in_dims=(None, 0, 0))
    _close(per_sample(w, x[:, None], t[:, None]), expected(w, x[:, None], t[:, None]), dtype,
           "per-sample weight gradients")


def test_module_per_sample_gradients_like_torchs_tutorial():
    """torch's per-sample-gradients recipe (functional_call, vmap over grad) with crossent's
    module as the loss: the same gradients as with torch's."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    params = {k: v.detach() for k, v in model.named_parameters()}
    data, targets = torch.randn(12, 8, generator=gen), torch.randint(0, 10, (12,), generator=gen)

    def per_sample(loss_fn):
        def loss(p, x, y):
            out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0))
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, data, targets)

    ours, theirs = per_sample(crossent.CrossEntropyLoss()), per_sample(torch.nn.CrossEntropyLoss())
    for k in params:
        torch.testing.assert_close(ours[k], theirs[k], rtol=2e-5, atol=1e-6)


def test_out_of_range_target_raises_torchs_class():
    x, t = torch.randn(3, 4, 5), torch.randint(0, 5, (3, 4))
    t[0, 0] = 7
    pairs = [(crossent.cross_entropy, F.cross_entropy), (crossent.nll_loss, F.nll_loss)]
    for ours, theirs in pairs:
        for run in (lambda f: torch.func.vmap(f)(x, t), lambda f: torch.func.grad(f)(x[0], t[0])):
            with pytest.raises(Exception) as expected:
                run(theirs)
            with pytest.raises(expected.type):
                run(ours)


@pytest.mark.parametrize("linear", [False, True])
def test_token_stats_under_transforms(linear):
    """``*_with_stats`` under vmap (per sample) and grad (``has_aux``) give the kernels' eager
    statistics of each sample, not the empty sums of a pass that never ran."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, generator=gen)
    w = torch.randn(7, 5, generator=gen)
    n_cls = 7 if linear else 5
    t = torch.randint(0, n_cls, (3, 4), generator=gen)
    t[0, 1] = -100
    x[1, 2, 0] = -math.inf

    def fn(a, b):
        if linear:
            return crossent.linear_cross_entropy_with_stats(a, w, b)
        return crossent.cross_entropy_with_stats(a, b)

    eager = [fn(x[i], t[i])[1] for i in range(3)]
    batched = torch.func.vmap(lambda a, b: fn(a, b)[1])(x, t)
    for field in eager[0]._fields:
        torch.testing.assert_close(getattr(batched, field),
                                   torch.stack([getattr(s, field) for s in eager]),
                                   equal_nan=True)  # the -inf feature: a NaN row, as torch
    _, stats = torch.func.grad(lambda a: fn(a, t[0]), has_aux=True)(x[0])
    for field in eager[0]._fields:
        torch.testing.assert_close(getattr(stats, field), getattr(eager[0], field),
                                   equal_nan=True)


def test_linear_lse_under_vmap_marks_only_ignored_rows():
    """lse is NaN at ignored rows only: a uint8 class 156 (-100 as uint8) is a class."""
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 8, generator=gen), torch.randn(200, 8, generator=gen)
    for t in (torch.tensor([156, 3, 7], dtype=torch.uint8), torch.tensor([156, -100, 7])):
        _, lse = torch.func.vmap(lambda a, b: crossent.linear_cross_entropy_with_lse(
            a, w, b, reduction="none"))(x[:, None], t[:, None])
        want = torch.where(t.long() == -100, float("nan"), torch.logsumexp(x @ w.T, 1))
        torch.testing.assert_close(lse.flatten(), want, equal_nan=True)


FORWARD_AD = {
    "cross_entropy": (lambda x, t: crossent.cross_entropy(x, t, label_smoothing=0.1),
                      lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1)),
    "cross_entropy probs": (lambda x, t: crossent.cross_entropy(x, x.detach().softmax(1)),
                            lambda x, t: F.cross_entropy(x, x.detach().softmax(1))),
    "nll_loss": (lambda x, t: crossent.nll_loss(x, t), lambda x, t: F.nll_loss(x, t)),
    "log_softmax": (lambda x, t: crossent.log_softmax(x, -1), lambda x, t: F.log_softmax(x, -1)),
    "softmax": (lambda x, t: crossent.softmax(x, 0), lambda x, t: F.softmax(x, 0)),
    "linear_cross_entropy": (
        lambda x, t: crossent.linear_cross_entropy(x, torch.eye(5, dtype=x.dtype), t),
        lambda x, t: F.cross_entropy(x @ torch.eye(5, dtype=x.dtype).T, t)),
}


@pytest.mark.parametrize("name", FORWARD_AD)
def test_forward_mode_ad_matches_torch(name):
    """``torch.autograd.forward_ad`` dual tensors: the tangent of each function is torch's (the
    calls inside a dual level take the composite path; the kernels' nodes have no jvp)."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(21)
    x, tangent = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    t = torch.randint(0, 5, (8,), generator=gen)
    ours, theirs = FORWARD_AD[name]
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(fwAD.make_dual(x, tangent), t))
        want = fwAD.unpack_dual(theirs(fwAD.make_dual(x, tangent), t))
    assert got.tangent is not None
    torch.testing.assert_close(got.primal, want.primal)
    torch.testing.assert_close(got.tangent, want.tangent)
