"""crossent's linear cross-entropy against torch 2.13's own ``F.linear_cross_entropy`` and
``nn.LinearCrossEntropyLoss``, called side by side with the same arguments: values, gradients of
input / linear_weight / linear_bias, and exception classes. Where torch has no such option
(z_loss, softcap, logit_scale) the oracle is ``F.linear`` followed by crossent's cross-entropy.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossent
from crossent._core import linear_autograd as _linear_autograd

pytestmark = pytest.mark.skipif(
    not hasattr(F, "linear_cross_entropy"), reason="torch without F.linear_cross_entropy (< 2.13)"
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    """One call: shapes (unbatched, batched, K-dimensional), target kind, every torch option."""
    kdim = draw(st.sampled_from([(), (), (2,), (3, 2), (2, 0)]))
    unbatched = not kdim and draw(st.booleans())
    n = draw(st.integers(0 if kdim else 1, 9))
    h = draw(st.integers(1, 7))
    c = draw(st.integers(1, 33))
    probs = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    lead = () if unbatched else (n,)
    x = torch.randn(*lead, h, generator=gen, dtype=torch.float64)
    w = torch.randn(c, *kdim, h, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):  # strided: every other feature of a wider input, a transposed weight
        x = torch.randn(*lead, 2 * h, generator=gen, dtype=torch.float64)[..., ::2]
        if not kdim:
            w = torch.randn(h, c, generator=gen, dtype=torch.float64).t()
    b = torch.randn(c, *kdim, generator=gen, dtype=torch.float64) if draw(st.booleans()) else None
    kw = {"reduction": draw(st.sampled_from(["mean", "sum", "none"])),
          "label_smoothing": draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))}
    if draw(st.booleans()):
        kw["weight"] = torch.rand(c, generator=gen, dtype=torch.float64) + 0.05
    if probs:
        t = torch.randn(*lead, c, *kdim, generator=gen, dtype=torch.float64)
        t = t.softmax(len(lead))  # over the class dim
    else:
        t = torch.randint(0, c, (*lead, *kdim), generator=gen)
        ignore = draw(st.sampled_from([None, None, -100, 0, -7]))
        if ignore is not None:
            kw["ignore_index"] = ignore
        drop = torch.rand(t.shape, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
        t[drop] = -100 if ignore is None else ignore
        # Byte indices: torch takes them for (N,) targets only (nll_loss2d wants Long).
        if not kdim and draw(st.booleans()) and c <= 255 and (ignore is None or 0 <= ignore):
            t = t.clamp(min=0).to(torch.uint8) if ignore is None else t.to(torch.uint8)
    return x, w, b, t, kw


def _run(fn, x, w, b, t, kw, up_seed=0):
    """Loss and the gradients of the leaves (views keeping the inputs' strides) under a random
    upstream gradient."""
    leaves = [a.detach().requires_grad_() for a in (x, w, b) if a is not None]
    loss = fn(leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None else None, **kw)
    up = torch.randn(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(up_seed))
    return loss, torch.autograd.grad(loss, leaves, up) if loss.numel() else ()


@SETTINGS
@given(case=cases(), chunk_size=st.sampled_from([None, 1, 3]))
def test_matches_torch(case, chunk_size):
    x, w, b, t, kw = case
    # torch's Byte targets fail in its smoothing-with-weight path (gather wants int64): same
    # classes as Long for torch.
    t_torch = t.long() if t.dtype == torch.uint8 else t
    theirs, g_theirs = _run(F.linear_cross_entropy, x, w, b, t_torch, kw)
    ours, g_ours = _run(crossent.linear_cross_entropy, x, w, b, t, dict(kw, chunk_size=chunk_size))
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    for a, r in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, r)


@SETTINGS
@given(case=cases(), z_loss=st.sampled_from([0.0, 0.05]), softcap=st.sampled_from([None, 2.0]),
       logit_scale=st.sampled_from([None, 0.3, -1.7]))
def test_crossent_extras_match_materialised_logits(case, z_loss, softcap, logit_scale):
    # logits = (x @ W.T + b) * logit_scale, then softcap and crossent's CE (torch has no z_loss).
    x, w, b, t, kw = case
    extras = dict(z_loss=z_loss, softcap=softcap)

    def materialised(x, w, t, linear_bias=None, ignore_index=None, **kw):
        c, kdim = w.shape[0], w.shape[1:-1]
        logits = F.linear(x, w.reshape(-1, w.shape[-1]), None if linear_bias is None
                          else linear_bias.reshape(-1)).reshape(*x.shape[:-1], c, *kdim)
        logits = logits if logit_scale is None else logits * logit_scale
        t = t if t.is_floating_point() else t.long()  # same classes; the oracle takes Long
        return crossent.cross_entropy(logits, t, ignore_index=-100 if ignore_index is None
                                      else ignore_index, **kw, **extras)

    theirs, g_theirs = _run(materialised, x, w, b, t, kw)
    ours, g_ours = _run(crossent.linear_cross_entropy, x, w, b, t,
                        dict(kw, logit_scale=logit_scale, chunk_size=2, **extras))
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    for a, r in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("shape", [(), (3, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_module_loads_torch_state_dict(shape, bias):
    gen = torch.Generator().manual_seed(3)
    cw = torch.rand(11, generator=gen) + 0.1
    kw = dict(out_features=shape, bias=bias, weight=cw, label_smoothing=0.1, reduction="sum")
    theirs = torch.nn.LinearCrossEntropyLoss(8, 11, **kw)
    ours = crossent.LinearCrossEntropyLoss(8, 11, **kw, chunk_size=3)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 8, generator=gen)
    t = torch.randint(0, 11, (7, *shape), generator=gen)
    loss_t, loss_o = theirs(x, t), ours(x, t)
    loss_t.backward()
    loss_o.backward()
    torch.testing.assert_close(loss_o, loss_t)
    for (name, p_o), p_t in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p_o.grad, p_t.grad, msg=name)
    assert "num_classes=11" in repr(ours)


def test_module_construction_like_torch():
    m = crossent.LinearCrossEntropyLoss(4, 6, dtype=torch.float64, bias=True, logit_scale=0.5)
    assert m.linear.weight.dtype == torch.float64 and m.linear.bias.shape == (6,)
    assert dict(m.named_buffers()) == {}  # weight=None registers no buffer, as torch
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 5, 2])
    expected = F.cross_entropy(0.5 * m.linear(x), t)
    torch.testing.assert_close(m(x, t), expected)
    m.to(torch.float32)
    assert m(x.float(), t).dtype == torch.float32
    for bad in (dict(weight=torch.ones(5)), dict(label_smoothing=1.5)):
        with pytest.raises(RuntimeError):
            torch.nn.LinearCrossEntropyLoss(4, 6, **bad)
        with pytest.raises(RuntimeError):
            crossent.LinearCrossEntropyLoss(4, 6, **bad)


def test_options():
    Options = torch.nn.LinearCrossEntropyOptions
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(20, 8, generator=gen), torch.randn(30, 8, generator=gen)
    t = torch.randint(0, 30, (20,), generator=gen)
    seen = []
    real = _linear_autograd.chunked_linear_ce

    def spy(*args, **kwargs):
        seen.append(args[8])  # chunk_size
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_linear_autograd, "chunked_linear_ce", spy)
        crossent.linear_cross_entropy(x, w, t, options=Options(batch_chunk_size=6))
        crossent.linear_cross_entropy(x, w, t, options=Options(), chunk_size=4)
    assert seen == [6, 4]
    # allow_retain_graph: "mean" backpropagated twice, each time the full gradient.
    wr, wt = w.clone().requires_grad_(), w.clone().requires_grad_()
    ours = crossent.linear_cross_entropy(x, wr, t, options=Options(allow_retain_graph=True)) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on the chunked path
        theirs = F.linear_cross_entropy(x, wt, t, options=Options(allow_retain_graph=True)) * 2
    for _ in range(2):
        ours.backward(retain_graph=True)
        theirs.backward(retain_graph=True)
        torch.testing.assert_close(wr.grad, wt.grad)
    with pytest.raises(ValueError, match="disagrees"):
        crossent.linear_cross_entropy(x, w, t, options=Options(batch_chunk_size=6), chunk_size=4)
    with pytest.raises(TypeError, match="LinearCrossEntropyOptions"):  # (torch: AttributeError)
        crossent.linear_cross_entropy(x, w, t, options={"batch_chunk_size": 6})


def _bad_calls():
    """name -> (args, kwargs) that torch rejects; crossent must raise the same class."""
    gen = torch.Generator().manual_seed(7)
    x, w, t = torch.randn(6, 8, generator=gen), torch.randn(10, 8, generator=gen), torch.arange(6)
    wk = torch.randn(10, 3, 8, generator=gen)
    return {
        "weight 1-D": ((x, w[0], t), {}),
        "in_features": ((x, w[:, :7], t), {}),
        "bias shape": ((x, w, t), {"linear_bias": torch.randn(9)}),
        "bias dtype": ((x, w, t), {"linear_bias": torch.randn(10, dtype=torch.float64)}),
        "weight dtype": ((x, w.double(), t), {}),
        "int input": ((x.int(), w, t), {}),
        "0-d input": ((x[0, 0], w, t), {}),
        "class weight shape": ((x, w, t), {"weight": torch.rand(3)}),
        "class weight dtype": ((x, w, t), {"weight": torch.rand(10, dtype=torch.float64)}),
        "target rows": ((x, w, t[:5]), {}),
        "target int32": ((x, w, t.int()), {}),
        "float target shape": ((x, w, torch.rand(6, 9)), {}),
        "int target of logits shape": ((x, w, torch.zeros(6, 10, dtype=torch.long)), {}),
        "probs with ignore_index": ((x, w, torch.rand(6, 10)), {"ignore_index": -100}),
        "out of range": ((x, w, torch.full((6,), 10)), {}),
        "negative": ((x, w, torch.full((6,), -3)), {}),
        "reduction": ((x, w, t), {"reduction": "avg"}),
        "label_smoothing": ((x, w, t), {"label_smoothing": 1.5}),
        "K-dim unbatched": ((x[0], wk, t[0]), {}),
        "K-dim bias": ((x, wk, torch.zeros(6, 3, dtype=torch.long)), {"linear_bias": torch.randn(10)}),
        "K-dim target": ((x, wk, t), {}),
        "1-D input, 1-D target": ((x[0], w, t), {}),
        "target (N, 1)": ((x, w, t[:, None]), {}),
        "0-d target": ((x, w, t[0]), {}),
        "target (N / 2, 2)": ((x, w, t.reshape(3, 2)), {}),
        "out of range, options": ((x, w, torch.full((6,), 10)),
                                  {"options": torch.nn.LinearCrossEntropyOptions()}),
        "options not Options": ((x, w, t), {"options": {"batch_chunk_size": 2}}),
        "options chunk conflict": ((x, w, t), {"options": torch.nn.LinearCrossEntropyOptions(
            batch_chunk_size=3, chunking_method="aspect_ratio")}),
        "options acc_dtype": ((x, w, t), {
            "options": torch.nn.LinearCrossEntropyOptions(acc_dtype=torch.float64)}),
        "class weight requires grad": ((x, w, t), {"weight": torch.rand(10).requires_grad_()}),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_errors_match_torch(name):
    args, kwargs = _bad_calls()[name]
    with pytest.raises(Exception) as theirs:
        F.linear_cross_entropy(*args, **kwargs)
    with pytest.raises(theirs.type) as ours:
        crossent.linear_cross_entropy(*args, **kwargs)
    assert len(str(ours.value)) > 20, "the message names what to fix"


def test_crossent_only_errors():
    x, w, t = torch.randn(6, 8), torch.randn(10, 8), torch.arange(6)
    with pytest.raises(ValueError, match="chunk_size"):
        crossent.linear_cross_entropy(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="not a crossent backend"):
        crossent.linear_cross_entropy(x, w, t, impl="nope")
    with pytest.raises(TypeError, match="float"):
        crossent.linear_cross_entropy(x, w, t, logit_scale=torch.tensor(2.0))
    with pytest.raises(ValueError, match="finite"):
        crossent.linear_cross_entropy(x, w, t, logit_scale=math.inf)
    with pytest.raises(NotImplementedError, match="no gradient for probability targets"):
        crossent.linear_cross_entropy(x, w, torch.rand(6, 10).softmax(1).requires_grad_())
    with pytest.raises(RuntimeError, match=r"K-dimensional.*\(2, 3, 8\)"):
        crossent.linear_cross_entropy(x.reshape(2, 3, 8), torch.randn(10, 2, 8), t.reshape(2, 3))


@pytest.mark.parametrize("shapes", [((4, 0), (5, 0)), ((2, 3, 0), (5, 0)), ((0,), (5, 0)),
                                    ((4, 0), (5, 2, 0))])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_features_gives_the_bias_logits_loss(shapes, reduction):
    """in_features 0: the logits are the bias (torch computes it; the chunked path had failed
    reshaping an empty input). Against F.cross_entropy of the bias logits, with gradients."""
    (xs, ws), gen = shapes, torch.Generator().manual_seed(8)
    x, w = torch.zeros(xs, requires_grad=True), torch.zeros(ws, requires_grad=True)
    b = torch.randn(ws[:-1], generator=gen, requires_grad=True)
    t = torch.randint(0, ws[0], xs[:-1] + ws[1:-1], generator=gen)
    t.view(-1)[0] = -100
    loss = crossent.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                         label_smoothing=0.1)
    ref_b = b.detach().clone().requires_grad_()
    logits = ref_b.expand(math.prod(xs[:-1]), *ws[:-1])
    want = F.cross_entropy(logits, t.reshape(-1, *ws[1:-1]), reduction=reduction,
                           label_smoothing=0.1)
    torch.testing.assert_close(loss, want.reshape(loss.shape), equal_nan=True)  # (all ignored)
    up = torch.rand(loss.shape, generator=gen)
    gx, gw, gb = torch.autograd.grad(loss, (x, w, b), up)
    assert gx.shape == x.shape and gw.shape == w.shape
    torch.testing.assert_close(gb, torch.autograd.grad(want.reshape(loss.shape), ref_b, up)[0],
                               equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_options_form_float32_logits_from_16_bit_input(dtype, reduction):
    """torch's options path forms float32 logits from bfloat16/float16 input; rounded to the
    input's dtype first, logits near 257 lost the class gap (0.69 instead of 1.31)."""
    Options = torch.nn.LinearCrossEntropyOptions
    x = torch.tensor([[1.0, 1.0]], dtype=dtype)
    w = torch.tensor([[256.0, 1.0], [256.0, 0.0]], dtype=dtype)
    t = torch.tensor([1])
    want = F.cross_entropy(F.linear(x.double(), w.double()), t, reduction=reduction)
    ours = crossent.linear_cross_entropy(x, w, t, options=Options(), reduction=reduction)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, want.to(dtype))
    torch.testing.assert_close(ours, F.linear_cross_entropy(x, w, t, options=Options(),
                                                            reduction=reduction))
    gen = torch.Generator().manual_seed(9)
    x, w = (torch.randn(24, 16, generator=gen) * 3).to(dtype), torch.randn(50, 16, generator=gen)
    w = w.to(dtype)
    t = torch.randint(0, 50, (24,), generator=gen)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    want = F.cross_entropy(F.linear(xr, wr), t, reduction=reduction)
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    ours = crossent.linear_cross_entropy(xo, wo, t, options=Options(), reduction=reduction)
    up = torch.rand(ours.shape, generator=gen).to(dtype)
    for got, ref in zip(torch.autograd.grad(ours, (xo, wo), up),
                        torch.autograd.grad(want, (xr, wr), up.double())):
        # float32 products rounded once into the 16-bit gradient
        torch.testing.assert_close(got, ref.to(dtype), rtol=2**-7, atol=2**-7 * ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_autocast_float32_loss_as_torch(dtype, reduction):
    """Under autocast torch's linear then cross_entropy gives a float32 loss (crossent's was
    bfloat16 for bfloat16 input, its reduced loss rounded so even for float32 input). bfloat16
    input: torch's values and gradients; float32 input: crossent keeps float32 logits (torch
    rounds them to bfloat16), at least as close to float64."""
    gen = torch.Generator().manual_seed(11)
    h, w = torch.randn(16, 8, generator=gen).to(dtype), torch.randn(30, 8, generator=gen).to(dtype)
    t = torch.randint(0, 30, (16,), generator=gen)
    t[3] = -100
    a, b = h.clone().requires_grad_(), h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = F.linear_cross_entropy(a, w, t, reduction=reduction)
        ours = crossent.linear_cross_entropy(b, w, t, reduction=reduction)
    assert ours.dtype == theirs.dtype == torch.float32
    (ga,), (gb,) = torch.autograd.grad(theirs.sum(), a), torch.autograd.grad(ours.sum(), b)
    if dtype == torch.bfloat16:
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(gb, ga)
        return
    ref = F.cross_entropy(F.linear(h.double(), w.double()), t, reduction=reduction)
    assert (ours.double() - ref).abs().max() <= (theirs.double() - ref).abs().max() + 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_zero_positions_give_torchs_empty_loss(reduction, smoothing):
    """out_features holding a 0: empty logits, torch's result (NaN "mean", 0 "sum", empty
    "none"), computed by crossent's own composite (it had called torch's cross_entropy)."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 8, generator=gen, requires_grad=True)
    w = torch.randn(5, 0, 8, generator=gen, requires_grad=True)
    t = torch.zeros(4, 0, dtype=torch.long)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    ours = crossent.linear_cross_entropy(x, w, t, **kw)
    theirs = F.linear_cross_entropy(x, w, t, **kw)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    gx, gw = torch.autograd.grad(ours.sum(), (x, w))
    assert not gx.any() and gw.shape == w.shape
