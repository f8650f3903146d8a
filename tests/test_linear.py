"""crossent.linear_cross_entropy vs cross-entropy of the materialised logits ``x @ W.T + b``.

Oracles: the float64 reference (``crossent._core.reference``) run through autograd on float64 logits,
and torch (``F.cross_entropy``, or ``crossent.cross_entropy`` for z_loss/softcap, which torch
lacks) on logits materialised in the test dtype. Values and gradients of input, weight, bias.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossent
from crossent._core import linear_autograd as _linear_autograd
from crossent._core import reference as _reference
from crossent.linear import auto_chunk_size, linear_cross_entropy, linear_cross_entropy_with_lse

from ._oracle import assert_close_to_reference



@pytest.fixture(autouse=True, params=["whole call", "one slab", "slabs of 64 classes"])
def slab_width(request, monkeypatch):
    """Every test three times: small CPU calls as one product on the backend's whole call
    (``whole_linear_ce``, where they qualify), and the chunk loop with the weight walked as one
    block (accelerators, bf16/fp16, small H) and in 64-class slabs with a ragged last one (what
    large H * V gets on CPU in float32/64)."""
    if request.param != "whole call":
        monkeypatch.setattr(_linear_autograd, "_WHOLE_MAX", 0)  # the chunk loop only
    if request.param == "slabs of 64 classes":
        monkeypatch.setattr(_linear_autograd, "_SLAB_BYTES", 1)  # clamped up to 64 classes


OPTIONS = {  # name -> keyword arguments; the weighted/smoothed ones are torch's own options
    "plain": {},
    "class_weight": {"class_weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "weight+smoothing": {"class_weight": True, "label_smoothing": 0.3},
    "z_loss+softcap": {"z_loss": 1e-3, "softcap": 5.0},
    "logit_scale": {"logit_scale": 0.37, "class_weight": True, "label_smoothing": 0.1},
    "all": {"class_weight": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0,
            "logit_scale": 2.5},
}


def _data(n, h, v, dtype, seed, bias=True, ignore_fraction=0.25, lead=None, probs=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen, dtype=torch.float64)
    w = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2 / h**0.5)
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    if probs:
        t = torch.randn(n, v, generator=gen, dtype=torch.float64).softmax(1).to(dtype)
    else:
        t = torch.randint(0, v, (n,), generator=gen)
        t[torch.rand(n, generator=gen) < ignore_fraction] = -100
    cw = torch.rand(v, generator=gen, dtype=torch.float64) + 0.1
    if lead is not None:
        x = x.reshape(*lead, h)
        t = t.reshape(*lead, *t.shape[1:])
    up = torch.randn(t.shape[: x.dim() - 1], generator=gen, dtype=torch.float64)
    cast = (lambda a: None if a is None else a.to(dtype))
    return cast(x), cast(w), cast(b), t, cast(cw), up


def _check(x, w, b, t, cw, up, dtype, what, reduction="mean", chunk_size=None, device="cpu",
           impl="auto", **options):
    """Loss and grads of (x, w, b) under a random upstream gradient, against both oracles, all
    on ``device`` (tests/triton_cases.py runs it on CUDA with ``impl="triton"``).
    ``class_weight=True`` passes ``cw`` as the class weights (``weight=``)."""
    x, w, b, t, cw, up = (None if a is None else a.to(device) for a in (x, w, b, t, cw, up))
    cw = cw if options.pop("class_weight", False) else None
    # Probability targets take no ignore_index (torch raises when one is given).
    ignore = {} if t.is_floating_point() else dict(ignore_index=-100)
    z_loss, softcap = options.get("z_loss", 0.0), options.get("softcap", None)
    smoothing = options.get("label_smoothing", 0.0)
    logit_scale = options.get("logit_scale", None)
    leaves = [a.clone().requires_grad_() for a in (x, w) + ((b,) if b is not None else ())]
    ours = linear_cross_entropy(*leaves[:2], t, linear_bias=leaves[2] if b is not None else None,
                                weight=cw, reduction=reduction, chunk_size=chunk_size,
                                impl=impl, **ignore, **options)

    def materialised(tensors):
        logits = tensors[0] @ tensors[1].T
        if len(tensors) > 2:
            logits = logits + tensors[2]
        if logit_scale is not None:
            logits = logits * logit_scale
        logits = logits.movedim(-1, 1) if logits.dim() > 2 else logits  # (N, V, T) for 3-D
        target = t.movedim(-1, 1) if (t.is_floating_point() and t.dim() > 2) else t
        return logits, target

    leaves_t = [a.clone().requires_grad_() for a in leaves]
    logits, target = materialised(leaves_t)
    kw = dict(weight=cw, reduction=reduction, label_smoothing=smoothing, ignore_index=-100)
    if z_loss or softcap is not None:
        theirs = crossent.cross_entropy(logits, target, z_loss=z_loss, softcap=softcap, **kw)
    else:
        theirs = F.cross_entropy(logits, target, **kw)
    leaves_r = [a.detach().double().requires_grad_() for a in leaves]
    logits64, target64 = materialised(leaves_r)
    ref = _reference.cross_entropy(
        logits64, target64.double() if target64.is_floating_point() else target64,
        None if cw is None else cw.double(), -100, reduction, smoothing, z_loss, softcap)
    assert ours.shape == theirs.shape == ref.shape, what
    assert ours.dtype == theirs.dtype, what
    _compare(ours.detach(), theirs.detach(), ref.detach(), dtype, what + " loss")
    u = up if reduction == "none" else up.reshape(-1)[0]
    if dtype in (torch.bfloat16, torch.float16) and reduction != "none":
        # The gradients were made (and rounded) in forward: a scalar upstream multiplies them
        # afterwards, one more rounding unless it is a power of two (as loss scaling is).
        u = torch.tensor(-0.5, dtype=torch.float64)
    g_ours = torch.autograd.grad(ours, leaves, u.to(ours.dtype))
    g_theirs = torch.autograd.grad(theirs, leaves_t, u.to(theirs.dtype))
    g_ref = torch.autograd.grad(ref, leaves_r, u)
    for name, a, bt, r in zip(("input", "weight", "bias"), g_ours, g_theirs, g_ref):
        assert a.dtype == dtype and a.shape == r.shape, f"{what} grad {name}"
        _compare(a, bt, r, dtype, f"{what} grad {name}")


def _compare(ours, theirs, ref64, dtype, what):
    """float32/float64: the shared oracle (within TOL of float64, element by element).

    bfloat16/float16: our relative error norm is no larger than torch's. Element by element
    does not apply here: both round logits and their gradient once per element but along
    different paths (fused addmm, float32 softmax), and each gradient entry sums V or N such
    rounded products, so per entry it is chance which one lands closer to float64.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        assert_close_to_reference(ours, theirs, ref64, dtype, what)
        return
    assert ours.dtype == theirs.dtype, what
    assert torch.equal(torch.isnan(ours), torch.isnan(ref64)), f"{what}: NaN pattern differs"
    keep = ~torch.isnan(ref64)
    err_ours = (ours.double() - ref64)[keep].norm()
    err_torch = (theirs.double() - ref64)[keep].norm()
    assert err_ours <= err_torch, f"{what}: error {float(err_ours):.3g} > torch's {float(err_torch):.3g}"


GRID = list(itertools.product([torch.float64, torch.float32], ["none", "mean", "sum"], OPTIONS,
                              [True, False]))


@pytest.mark.parametrize("dtype,reduction,option,bias", GRID)
def test_grid(dtype, reduction, option, bias):
    # 37 rows in chunks of 8 (the last one partial), V = 515 (odd), a quarter ignored.
    seed = hash((str(dtype), reduction, option, bias)) % 2**31
    data = _data(37, 24, 515, dtype, seed, bias=bias)
    _check(*data, dtype, f"{dtype} {reduction} {option} bias={bias}", reduction=reduction,
           chunk_size=8, **dict(OPTIONS[option]))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), h=st.integers(1, 24), v=st.integers(1, 300),
       dtype=st.sampled_from([torch.float64, torch.float32]),
       reduction=st.sampled_from(["mean", "sum"]),
       option=st.sampled_from([o for o in OPTIONS if "logit_scale" not in OPTIONS[o]]),
       bias=st.booleans(), ignore_fraction=st.sampled_from([0.0, 0.3, 1.0]),
       seed=st.integers(0, 2**31 - 1))
def test_small_calls_on_the_whole_call(monkeypatch, request, n, h, v, dtype, reduction, option,
                                       bias, ignore_fraction, seed):
    """Small CPU calls (one chunk, reduced, no logit_scale) take ``whole_linear_ce`` (only
    then: the other fixture params force the chunk loop) and agree with both oracles, over
    shapes, options, bias and ignored rows (all of them too: a NaN mean)."""
    taken = []
    real = _linear_autograd.whole_linear_ce
    monkeypatch.setattr(_linear_autograd, "whole_linear_ce",
                        lambda *a: taken.append(1) or real(*a))
    data = _data(n, h, v, dtype, seed, bias=bias, ignore_fraction=ignore_fraction)
    _check(*data, dtype, f"whole {n}x{h}x{v} {reduction} {option}", reduction=reduction,
           **dict(OPTIONS[option]))
    assert bool(taken) == (request.node.callspec.params["slab_width"] == "whole call")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("option", ["plain", "weight+smoothing", "z_loss+softcap"])
def test_probability_targets(reduction, option):
    data = _data(29, 16, 131, torch.float64, 7, probs=True)
    _check(*data, torch.float64, f"probs {reduction} {option}", reduction=reduction, chunk_size=6,
           **dict(OPTIONS[option]))


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 100, None])
@pytest.mark.parametrize("ignore_fraction", [0.0, 0.3])
def test_chunk_sizes(chunk_size, ignore_fraction):
    # None, a size over N, one that divides N and ones that don't; with and without skipped rows.
    data = _data(80, 32, 300, torch.float64, 11, ignore_fraction=ignore_fraction)
    _check(*data, torch.float64, f"chunk={chunk_size}", chunk_size=chunk_size, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ignored_rows_without_skipping(monkeypatch, reduction):
    # Accelerators do not skip ignored rows (that would sync): the kernel zeroes them instead,
    # including chunks where every row is ignored.
    monkeypatch.setattr(_linear_autograd, "SKIP_IGNORED_ON", ())
    x, w, b, t, cw, up = _data(40, 16, 99, torch.float64, 3)
    t[8:24] = -100  # chunks 1 and 2 (of 8 rows) entirely ignored
    _check(x, w, b, t, cw, up, torch.float64, f"no skipping {reduction}", reduction=reduction,
           chunk_size=8, class_weight=True, label_smoothing=0.2)


@pytest.mark.parametrize("skip", [True, False])
def test_all_ignored(monkeypatch, skip):
    # "mean" over nothing is 0/0 = NaN with zero gradients, as torch.
    if not skip:
        monkeypatch.setattr(_linear_autograd, "SKIP_IGNORED_ON", ())
    x, w, b, t, cw, up = _data(12, 8, 20, torch.float64, 5, ignore_fraction=1.0)
    for reduction in ("none", "mean", "sum"):
        _check(x, w, b, t, cw, up, torch.float64, f"all ignored {reduction}", reduction=reduction,
               chunk_size=5)


def test_large_odd_vocab():
    # V = 50257 (GPT-2), few rows: chunk boundaries inside a small batch; grad_weight (18 MiB)
    # is large enough to come from the huge-page allocator.
    data = _data(6, 96, 50257, torch.float32, 13)
    _check(*data, torch.float32, "V=50257", chunk_size=4, class_weight=True, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_3d_and_1d_input(reduction):
    data = _data(2 * 9, 16, 77, torch.float64, 17, lead=(2, 9))
    _check(*data, torch.float64, f"3-D {reduction}", reduction=reduction, chunk_size=4)
    data = _data(2 * 9, 16, 77, torch.float64, 18, lead=(2, 9), probs=True)
    _check(*data, torch.float64, f"3-D probs {reduction}", reduction=reduction, chunk_size=4)
    x, w, b, t, cw, up = _data(1, 16, 77, torch.float64, 19, ignore_fraction=0.0)
    _check(x[0], w, b, t[0], cw, up[0], torch.float64, f"1-D {reduction}", reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_size", [16, None])
@pytest.mark.parametrize("logit_scale", [None, 0.7])
def test_low_precision(dtype, reduction, chunk_size, logit_scale):
    # 256 rows in 16 chunks: grad_weight sums 16 partials. Accumulated in float32 its error
    # must be no worse than torch's single bf16/fp16 matmul (plus one output rounding).
    # chunk_size=None: one chunk, whose product goes straight into the bf16/fp16 gradient.
    # logit_scale rides in the matmul's alpha: no extra rounding of 16-bit logits (torch's has).
    data = _data(256, 64, 1000, dtype, 23)
    _check(*data, dtype, f"{dtype} {reduction} chunk={chunk_size} scale={logit_scale}",
           reduction=reduction, chunk_size=chunk_size, label_smoothing=0.1, logit_scale=logit_scale)


def test_lse():
    x, w, b, t, _, _ = _data(30, 16, 50, torch.float64, 29)
    loss, lse = linear_cross_entropy_with_lse(x, w, t, linear_bias=b, softcap=4.0,
                                              logit_scale=0.5, chunk_size=7)
    logits = (x @ w.T + b) * 0.5
    expected = torch.logsumexp(4.0 * torch.tanh(logits / 4.0), 1)
    valid = t != -100
    torch.testing.assert_close(lse[valid], expected[valid])
    assert torch.isnan(lse[~valid]).all()
    assert not lse.requires_grad
    torch.testing.assert_close(
        loss, linear_cross_entropy(x, w, t, linear_bias=b, softcap=4.0, logit_scale=0.5))


def test_partial_requires_grad_and_no_grad():
    x, w, b, t, _, _ = _data(20, 8, 30, torch.float64, 31)
    x = x.requires_grad_()
    loss = linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=6)  # weight and bias frozen
    (gx,) = torch.autograd.grad(loss, x)
    xr = x.detach().requires_grad_()
    (gr,) = torch.autograd.grad(F.cross_entropy(xr @ w.T + b, t), xr)
    torch.testing.assert_close(gx, gr)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, linear_bias=b),
                                   F.cross_entropy(x @ w.T + b, t))


@pytest.mark.parametrize("dtype,x_scale,up", [(torch.float16, 1.0, 1000.0),
                                               (torch.float32, 1e36, 4.0)])
def test_none_backward_scales_the_logits_gradient_not_the_input(dtype, x_scale, up):
    """reduction="none": each row's upstream factor multiplies that row's logits gradient (torch's
    order). Multiplying the input's rows by it overflowed where every product is finite: fp16
    activations of 100 under a loss scale of 1000 gave an inf weight gradient (NaN with a zero
    class weight) where torch's is finite."""
    x = (torch.tensor([[100.0, 1.0], [-30.0, 60.0]], dtype=torch.float64) * x_scale).to(dtype)
    w = (torch.tensor([[0.01, 0.0], [0.0, 0.01], [0.0, 0.0]], dtype=torch.float64)
         / x_scale).to(dtype)
    t = torch.tensor([0, 2])
    upstream = torch.tensor([up, up / 2], dtype=dtype)
    for cw in (None, torch.tensor([1.0, 0.0, 2.0], dtype=dtype)):
        grads = []
        for fn in (linear_cross_entropy, F.linear_cross_entropy):
            wr = w.clone().requires_grad_()
            fn(x, wr, t, weight=cw, reduction="none").backward(upstream)
            grads.append(wr.grad)
        assert grads[1].isfinite().all()  # (the case is finite in torch)
        torch.testing.assert_close(grads[0].double(), grads[1].double(), rtol=4e-3, atol=0)


def test_backward_twice():
    """Under retain_graph=True every backward gives the whole gradient, as torch's (the kept
    gradients are handed out as copies the caller may change); a backward after one without
    it raises RuntimeError, as torch's."""
    x, w, b, t, _, _ = _data(10, 8, 30, torch.float64, 37)
    w = w.requires_grad_()
    loss = linear_cross_entropy(x, w, t, linear_bias=b, reduction="none").sum()
    loss.backward(retain_graph=True)
    loss.backward()  # "none" recomputes: fine
    wr = w.detach().requires_grad_()
    (expected,) = torch.autograd.grad(F.cross_entropy(x @ wr.T + b, t) * 3.0, wr)
    for scale in (3.0, 1.0):  # a non-unit upstream, and the one of loss.backward()
        mean = linear_cross_entropy(x, w, t, linear_bias=b) * scale
        for _ in range(2):
            (g,) = torch.autograd.grad(mean, w, retain_graph=True)
            torch.testing.assert_close(g * (3.0 / scale), expected)
            g.mul_(0)  # the caller's own tensor: the next backward does not see it
        (g,) = torch.autograd.grad(mean, w)
        torch.testing.assert_close(g * (3.0 / scale), expected)
        with pytest.raises(RuntimeError, match="retain_graph=True"):  # torch's or crossent's
            torch.autograd.grad(mean, w)


def test_gradcheck():
    x, w, b, t, cw, _ = _data(7, 4, 9, torch.float64, 41)
    leaves = [a.requires_grad_() for a in (x, w, b)]
    fn = lambda x, w, b: linear_cross_entropy(x, w, t, linear_bias=b, weight=cw,
                                              reduction="none", label_smoothing=0.2, z_loss=0.1,
                                              softcap=2.0, logit_scale=-1.3, chunk_size=3)
    assert torch.autograd.gradcheck(fn, leaves)


def test_auto_chunk_size():
    cpu = torch.device("cpu")
    assert auto_chunk_size(10, 64, 1000, cpu) == 10  # small N: one chunk
    rows = auto_chunk_size(1 << 20, 4096, 128256, cpu)
    assert 16 <= rows < 1 << 20 and rows % 16 == 0
    assert auto_chunk_size(1 << 20, 512, 32000, cpu) == 512  # 64 MiB of float32 logits
    assert auto_chunk_size(1 << 20, 512, 32000, cpu, torch.bfloat16) == 1040  # ... of bf16
    # Accelerators: 4096 rows of bf16 over a Llama-3 vocabulary fit one chunk (1 GiB)
    cuda = torch.device("cuda")
    assert auto_chunk_size(4096, 4096, 128256, cuda, torch.bfloat16) == 4096
    assert auto_chunk_size(32768, 4096, 128256, cuda, torch.bfloat16) < 32768


def test_slabs(monkeypatch):
    monkeypatch.setattr(_linear_autograd, "_SLAB_BYTES", 8 << 20)
    cpu = torch.device("cpu")
    assert _linear_autograd._slabs(515, 24, torch.float32, cpu) == [(0, 515)]  # small W: one
    slabs = _linear_autograd._slabs(128256, 2048, torch.float32, cpu)
    assert slabs[0][0] == 0 and slabs[-1][1] == 128256 and len(slabs) > 1
    assert all(a[1] == b[0] for a, b in zip(slabs, slabs[1:]))  # contiguous, no gap or overlap
    assert _linear_autograd._slabs(128256, 2048, torch.bfloat16, cpu) == [(0, 128256)]
    assert _linear_autograd._slabs(128256, 2048, torch.float32, torch.device("meta")) == [(0, 128256)]


# --- edges whose behaviour torch defines (compared with torch's own F.linear_cross_entropy) ---


def _torch_side_by_side(x, w, t, reductions=("none", "mean", "sum"), **kw):
    """Values and input/weight gradients of crossent vs torch's reference path, every reduction."""
    for reduction in reductions:
        leaves = [a.detach().clone().requires_grad_() for a in (x, w)]
        leaves_t = [a.detach().clone().requires_grad_() for a in (x, w)]
        ours = linear_cross_entropy(*leaves, t, reduction=reduction, chunk_size=5, **kw)
        theirs = F.linear_cross_entropy(*leaves_t, t, reduction=reduction, **kw)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        up = torch.randn(theirs.shape, dtype=theirs.dtype, generator=torch.Generator().manual_seed(1))
        for a, b in zip(torch.autograd.grad(ours, leaves, up), torch.autograd.grad(theirs, leaves_t, up)):
            assert torch.isfinite(a).all() == torch.isfinite(b).all()
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ignore_index", [None, 3, -1])
def test_uint8_targets(ignore_index):
    # Byte class indices, as torch accepts them; an ignore_index a byte can hold, and a negative
    # one no byte can equal (every row then counts).
    x, w, _, t, _, _ = _data(23, 8, 40, torch.float64, 53, ignore_fraction=0.0)
    t = t.to(torch.uint8)
    t[::4] = 3
    _torch_side_by_side(x, w, t, ignore_index=ignore_index)


@pytest.mark.parametrize("ignore_index", [-1, -100, None])
def test_uint8_255_out_of_range(ignore_index):
    # uint8 255 is class 255, never a negative ignore_index: out of range for C < 256, as torch.
    x, w, _, t, _, _ = _data(6, 8, 40, torch.float64, 59, ignore_fraction=0.0)
    t = t.to(torch.uint8)
    t[2] = 255
    with pytest.raises(IndexError):
        F.linear_cross_entropy(x, w, t, ignore_index=ignore_index)
    with pytest.raises(IndexError, match="255"):
        linear_cross_entropy(x, w, t, ignore_index=ignore_index)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_nonfinite_weight_of_absent_class(bad):
    # A class no target names contributes nothing: its weight, however bad, must not leak into
    # the loss or the gradients (torch reads weight[target] only).
    x, w, _, t, cw, _ = _data(30, 8, 25, torch.float64, 61)
    t[t == 7] = 8
    cw[7] = bad
    _torch_side_by_side(x, w, t, weight=cw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_z_loss_with_huge_lse(dtype):
    # |lse| > 1.8e19: lse**2 overflows float32. z_loss=0 must add exactly nothing (not 0 * inf).
    gen = torch.Generator().manual_seed(67)
    x = torch.randn(12, 8, generator=gen, dtype=dtype) * 1e10
    w = torch.randn(30, 8, generator=gen, dtype=dtype) * 1e10
    t = torch.randint(0, 30, (12,), generator=gen)
    ours = linear_cross_entropy(x, w, t, z_loss=0.0, reduction="none")
    theirs = F.linear_cross_entropy(x, w, t, reduction="none")
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    _, lse = linear_cross_entropy_with_lse(x, w, t)
    assert (lse.abs() > 1.8e19).all()


# --- double backward fails loudly ---


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_maml_inner_step_raises(reduction):
    # MAML: differentiate through an SGD step of the weight, which needs second derivatives.
    x, w, b, t, _, _ = _data(16, 8, 20, torch.float64, 71)
    w = w.requires_grad_()
    loss = linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match=r"double backward.*torch\.nn\.functional\.cross_entropy"):
        torch.autograd.grad(loss, w, create_graph=True)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradient_penalty_raises(reduction):
    x, w, b, t, _, _ = _data(16, 8, 20, torch.float64, 73)
    x = x.requires_grad_()
    loss = linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, logit_scale=2.0).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        gx.square().sum().backward()
    # The path the message names gives the penalty's gradient.
    xr = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(F.cross_entropy(2.0 * F.linear(xr, w, b), t, reduction="sum"),
                                xr, create_graph=True)
    gx.square().sum().backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_activation_checkpointing(use_reentrant, reduction):
    # Checkpointing recomputes forward under enable_grad inside backward: that is not create_graph,
    # so the double-backward guard must let it through, with the plain gradients.
    x, w, b, t, _, _ = _data(16, 8, 20, torch.float64, 79)
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    fn = lambda x, w, b: linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction).sum()
    torch.utils.checkpoint.checkpoint(fn, *leaves, use_reentrant=use_reentrant).backward()
    leaves_t = [a.clone().requires_grad_() for a in (x, w, b)]
    F.cross_entropy(F.linear(*leaves_t), t, reduction=reduction).sum().backward()
    for a, r in zip(leaves, leaves_t):
        torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bad", [-5, 40, 10**6])
def test_out_of_range_index_names_value_and_position(reduction, bad):
    """The CPU target check is the backend's pass (it also sums the mean's denominator): for
    every reduction, torch's IndexError naming the offending value and its position."""
    x, w, _, t, _, _ = _data(9, 8, 40, torch.float32, 61, ignore_fraction=0.0)
    t[6] = bad
    with pytest.raises(IndexError):
        F.linear_cross_entropy(x, w, t, reduction=reduction)
    with pytest.raises(IndexError, match=rf"Target {bad} is out of bounds.*position 6"):
        linear_cross_entropy(x, w, t, reduction=reduction)
