"""Triton backend cases: crossent.cross_entropy(impl="triton") vs torch and the float64 reference.

Not collected on its own (no ``test_`` prefix): ``tests/test_triton_backend.py`` runs this file in
a subprocess, with ``TRITON_INTERPRET=1`` on CPU tensors (the interpreter must be switched on
before Triton is imported, and must not leak into the rest of the suite), or natively on a GPU.
Shapes are small because the interpreter executes every block op in numpy.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import _reference
from crossent.backends.triton import launch

from ._oracle import assert_close_to_reference, index_target, logits, prob_target
from .test_linear import _check as check_linear
from .test_linear import _data as linear_data

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(params=["one block", "blocks of 16"])
def block(request, monkeypatch):
    """Run each case with the row in one block, and looped over several 16-wide blocks."""
    if request.param != "one block":
        monkeypatch.setattr(launch, "MAX_BLOCK", 16)
    return request.param


def _check(x, target, *, what, weight=None, reduction="none", torch_too=True, **options):
    """Loss and gradient (random upstream) of impl="triton" vs the float64 reference, and vs
    torch's F.cross_entropy (same dtype) when the options are torch's."""
    dtype = x.dtype
    gen = torch.Generator().manual_seed(zlib.crc32(what.encode()))
    kwargs = dict(weight=weight, reduction=reduction)
    for k in ("ignore_index", "label_smoothing"):
        if k in options:
            kwargs[k] = options[k]
    x_ours = x.clone().to(DEVICE).requires_grad_()
    ours = crossent.cross_entropy(
        x_ours, target.to(DEVICE), None if weight is None else weight.to(DEVICE), impl="triton",
        reduction=reduction, **options,
    )
    x_ref = x.double().requires_grad_()
    tgt = target.double() if target.is_floating_point() else target
    ref = _reference.cross_entropy(
        x_ref, tgt, None if weight is None else weight.double(), options.get("ignore_index", -100),
        reduction, options.get("label_smoothing", 0.0), options.get("z_loss", 0.0),
        options.get("softcap"),
    )
    x_torch = x.clone().requires_grad_()
    theirs = F.cross_entropy(x_torch, target, **kwargs) if torch_too else ref.to(dtype)
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, x_ours, upstream.to(ours.dtype).to(DEVICE))
    (g_ref,) = torch.autograd.grad(ref, x_ref, upstream)
    g_theirs = (torch.autograd.grad(theirs, x_torch, upstream.to(theirs.dtype))[0] if torch_too
                else g_ref.to(dtype))
    assert g_ours.dtype == dtype
    assert_close_to_reference(ours.detach().cpu(), theirs.detach(), ref.detach(), dtype, what + " loss")
    assert_close_to_reference(g_ours.cpu(), g_theirs, g_ref, dtype, what + " grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", [1, 2, 7, 507])
def test_index_targets_dtypes(dtype, n_classes, block):
    gen = torch.Generator().manual_seed(n_classes)
    x = logits((16 if n_classes < 100 else 4, n_classes), dtype, gen)  # the interpreter is slow
    y = index_target(x.shape, n_classes, gen)
    _check(x, y, what=f"{dtype} C={n_classes} {block}", reduction="mean")


OPTIONS = {  # name -> (options, agrees with torch's F.cross_entropy)
    "weight": ({}, True),
    "smoothing": ({"label_smoothing": 0.1}, True),
    "smoothing + weight + ignore 3": ({"label_smoothing": 0.3, "ignore_index": 3}, True),
    "negative smoothing is none": ({"label_smoothing": -0.2}, False),  # torch rejects it
    "z_loss": ({"z_loss": 1e-2}, False),
    "softcap": ({"softcap": 2.5}, False),
    "everything": ({"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 4.0, "ignore_index": 0}, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "mean"])  # "sum": all-ignored and unbatched cases
def test_index_target_options(dtype, name, reduction, block):
    options, torch_too = OPTIONS[name]
    gen = torch.Generator().manual_seed(len(name))
    n_classes = 37
    x = logits((12, n_classes), dtype, gen)
    y = index_target(x.shape, n_classes, gen, ignore_index=options.get("ignore_index", -100))
    weighted = "weight" in name or name == "everything"
    w = (torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    _check(x, y, weight=w, reduction=reduction, torch_too=torch_too, what=f"{name} {dtype} {reduction}",
           **options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.15}, {"z_loss": 1e-2, "softcap": 3.0}],
                         ids=["plain", "smoothing", "z+softcap"])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets(dtype, options, weighted, block):
    gen = torch.Generator().manual_seed(7)
    x = logits((9, 50), dtype, gen)
    t = prob_target(x.shape, dtype, gen)
    w = (torch.rand(50, generator=gen, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    torch_too = "z_loss" not in options
    _check(x, t, weight=w, reduction="mean", torch_too=torch_too, what=f"probs {dtype} {options}",
           **options)


def test_k_dim_and_unbatched(block):
    gen = torch.Generator().manual_seed(3)
    x = logits((3, 11, 4, 2), torch.float32, gen)  # (N, C, d1, d2): class dim moved last
    _check(x, index_target(x.shape, 11, gen), what="K-dim index")
    _check(x, prob_target(x.shape, torch.float32, gen), what="K-dim probs", label_smoothing=0.1)
    x1 = logits((11,), torch.float32, gen)
    _check(x1, torch.tensor(4), what="unbatched", reduction="sum")


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_and_infinite_logits(dtype, block):
    gen = torch.Generator().manual_seed(11)
    x = logits((8, 30), torch.float64, gen)
    x[::2] *= 3e3  # entries up to about +-1e4: the max-subtraction must carry it
    x = x.clamp(-1e4, 1e4)
    y = index_target(x.shape, 30, gen, ignore_fraction=0.0)
    # Impossible classes, never the target. Column 0 stays finite: crossent._reference reads its
    # lse off column 0 and would turn a -inf there into NaN.
    x[torch.arange(8), 1 + (y + 1) % 29] = float("-inf")
    x[3, 1:] = float("-inf")
    x[3, y[3]] = 0.0  # a row with (at most) two finite logits
    _check(x.to(dtype), y, what=f"+-1e4 and -inf {dtype}", reduction="none")
    # Smoothing sums over the -inf classes: an infinite loss, as torch.
    _check(x.to(dtype), y, what=f"-inf smoothed {dtype}", reduction="none", label_smoothing=0.1)


def test_all_ignored(block):
    x = torch.randn(6, 9)
    y = torch.full((6,), -100)
    _check(x, y, what="all ignored, mean is NaN", reduction="mean")
    _check(x, y, what="all ignored, sum", reduction="sum")


@pytest.mark.parametrize("n_classes", [5, 1000])
def test_softcap_masks_padding_lanes(n_classes, block):
    """Padding lanes load as -inf; tanh would cap them to -cap and give them mass."""
    gen = torch.Generator().manual_seed(n_classes)
    # Logits far below -cap: mass leaking from padding lanes at -cap would dominate the row.
    x = logits((4 if n_classes < 100 else 2, n_classes), torch.float32, gen) - 6.0
    y = index_target(x.shape, n_classes, gen, ignore_fraction=0.0)
    _check(x, y, what=f"softcap padding C={n_classes}", torch_too=False, softcap=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(dtype, block):
    gen = torch.Generator().manual_seed(5)
    base = logits((10, 40), dtype, gen)
    y = index_target(base.shape, 40, gen)
    grads = []
    for inplace in (False, True):
        leaf = base.clone().to(DEVICE).requires_grad_()
        h = leaf * 1  # logits made by the model (not a leaf)
        loss = crossent.cross_entropy(h, y.to(DEVICE), impl="triton", label_smoothing=0.1,
                                      inplace_backward=inplace)
        loss.backward()
        grads.append(leaf.grad)
        if inplace:  # the gradient now lives in h's storage
            assert torch.equal(h.detach(), leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_forward_only_and_lse(block):
    gen = torch.Generator().manual_seed(2)
    x = logits((7, 300), torch.float32, gen)
    y = index_target(x.shape, 300, gen)
    with torch.no_grad():
        loss, lse = crossent.cross_entropy_with_lse(x.to(DEVICE), y.to(DEVICE), impl="triton",
                                                    reduction="none", softcap=10.0)
    ref = _reference.cross_entropy(x, y, reduction="none", softcap=10.0)
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(10 * torch.tanh(x.double() / 10), 1),
                               rtol=2e-5, atol=2e-6)


def test_same_shapes_and_dtypes_as_torch_backend(block):
    """Same call through impl="torch" and impl="triton": same shapes, dtypes and values."""
    gen = torch.Generator().manual_seed(9)
    x = logits((5, 3, 20), torch.bfloat16, gen)
    y = index_target(x.shape, 3, gen)
    a = crossent.cross_entropy(x.to(DEVICE), y.to(DEVICE), impl="triton", reduction="none")
    b = crossent.cross_entropy(x, y, impl="torch", reduction="none")
    assert a.shape == b.shape and a.dtype == b.dtype
    # Both round a float32 loss to bfloat16 once; a GPU's exp may land on the neighbouring value.
    torch.testing.assert_close(a.cpu(), b, rtol=2**-8, atol=0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph(backend, inplace):
    """The launch is an opaque torch.library op, so a whole step compiles without graph breaks."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(12, 16, generator=gen).to(DEVICE)
    y = index_target((12, 40), 40, gen).to(DEVICE)
    options = dict(impl="triton", label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                   inplace_backward=inplace)

    def step(w):
        return crossent.cross_entropy(h @ w, y, **options)  # (12, 40) logits, not a leaf

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=backend)):
        w = torch.randn(16, 40, generator=torch.Generator().manual_seed(5)).to(DEVICE).requires_grad_()
        loss = fn(w)
        loss.backward()
        results.append((loss.detach(), w.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_probability_target_gradient():
    """d loss / d target (probabilities that require grad) next to the kernel's d loss / d logits."""
    gen = torch.Generator().manual_seed(8)
    x = logits((6, 20), torch.float64, gen)
    t = prob_target(x.shape, torch.float64, gen)
    options = dict(label_smoothing=0.1, softcap=3.0)
    x_ours, t_ours = x.clone().to(DEVICE).requires_grad_(), t.clone().to(DEVICE).requires_grad_()
    crossent.cross_entropy(x_ours, t_ours, impl="triton", **options).backward()
    x_ref, t_ref = x.clone().requires_grad_(), t.clone().requires_grad_()
    _reference.cross_entropy(x_ref, t_ref, label_smoothing=0.1, softcap=3.0).backward()
    torch.testing.assert_close(x_ours.grad.cpu(), x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t_ours.grad.cpu(), t_ref.grad, rtol=1e-10, atol=1e-12)


def test_no_rows():
    x = torch.empty(0, 5, device=DEVICE, requires_grad=True)
    y = torch.empty(0, dtype=torch.long, device=DEVICE)
    assert crossent.cross_entropy(x, y, impl="triton", reduction="sum").item() == 0
    loss = crossent.cross_entropy(x, y, impl="triton")  # mean of nothing: NaN, as torch
    assert torch.isnan(loss)
    loss.backward()
    assert x.grad.shape == (0, 5)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_cross_entropy(reduction, block):
    """linear_cross_entropy through the Triton kernel, every option, 37 rows in chunks of 8.
    On a GPU this is the CUDA path: no host read of the target (ignored rows go through the
    kernel) and one vocabulary slab."""
    data = linear_data(37, 24, 515, torch.float32, 5)
    check_linear(*data, torch.float32, f"linear {reduction}", reduction=reduction, chunk_size=8,
                 device=DEVICE, impl="triton", class_weight=True, label_smoothing=0.1,
                 z_loss=1e-3, softcap=5.0)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_cross_entropy_bf16(reduction):
    """bf16: the weight gradient sums 16 chunk partials in float32 (on CUDA from products with
    float32 output), so its error is no worse than torch's one bf16 matmul (as test_linear's
    test_low_precision on CPU; at smaller shapes both sit at the rounding floor, a coin flip)."""
    data = linear_data(256, 64, 1000, torch.bfloat16, 23)
    check_linear(*data, torch.bfloat16, f"linear bf16 {reduction}", reduction=reduction,
                 chunk_size=16, device=DEVICE, impl="triton", label_smoothing=0.1)


# --- strided logits, ignored rows, the scale and pair-sum kernels (issue 13) -------------------

@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_logits(dtype, inplace, block):
    """``wide[:, :C]``: read where it lies (row stride 2C + 3), a fresh gradient contiguous, an
    in-place one written at the logits' stride with the columns past C untouched."""
    from crossent._params import CEParams
    from crossent.backends.triton import ce_forward

    gen = torch.Generator().manual_seed(12)
    n_classes = 45
    wide = logits((9, 2 * n_classes + 3), dtype, gen).to(DEVICE)
    y = index_target((9, n_classes), n_classes, gen).to(DEVICE)
    x = wide[:, :n_classes]
    expect_loss, expect_lse, expect_grad = ce_forward(
        x.contiguous(), y, None, torch.tensor(0.5, device=DEVICE),
        CEParams(label_smoothing=0.1))
    before = wide.clone()
    loss, lse, grad = ce_forward(x, y, None, torch.tensor(0.5, device=DEVICE),
                                 CEParams(label_smoothing=0.1, inplace_backward=inplace))
    assert torch.equal(loss, expect_loss) and torch.equal(lse, expect_lse)
    assert torch.equal(grad, expect_grad)
    if inplace:
        assert grad.data_ptr() == wide.data_ptr() and grad.stride() == wide.stride()
        assert torch.equal(wide[:, n_classes:], before[:, n_classes:])
    else:
        assert grad.is_contiguous() and torch.equal(wide, before)


@pytest.mark.parametrize("inplace", [False, True])
def test_ignored_rows_nonfinite(inplace, block):
    """Ignored rows skip pass 2's reads: their gradient is 0, or NaN where their lse is not
    finite (all -inf, a NaN), exactly as torch's backend and F.cross_entropy give it."""
    x = logits((6, 37), torch.float32, torch.Generator().manual_seed(13))
    x[1] = float("-inf")
    x[2, 5] = float("nan")
    x[3, 7] = float("inf")
    y = torch.tensor([3, -100, -100, -100, -100, 8])
    grads = {}
    for impl in ("triton", "torch"):
        for softcap in (None, 2.0):
            leaf = x.clone().to(DEVICE if impl == "triton" else "cpu").requires_grad_()
            h = leaf * 1
            loss = crossent.cross_entropy(h, y.to(leaf.device), impl=impl, reduction="sum",
                                          softcap=softcap, inplace_backward=inplace)
            loss.backward()
            grads[impl, softcap] = leaf.grad.cpu()
    for softcap in (None, 2.0):
        assert torch.equal(grads["triton", softcap].isnan(), grads["torch", softcap].isnan())
        torch.testing.assert_close(grads["triton", softcap], grads["torch", softcap], equal_nan=True,
                                   rtol=1e-6, atol=1e-7)
    assert grads["triton", None][1:4].isnan().all() and (grads["triton", None][4] == 0).all()
    assert (grads["triton", 2.0][1] == 0).all()  # capped: -inf becomes -cap, a finite lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scale_inplace(dtype):
    """Upstream scaling in place on the device: untouched at 1, one rounding otherwise, strided."""
    from crossent.backends.triton.scale import scale_inplace

    gen = torch.Generator().manual_seed(14)
    g = torch.randn(3, 5000, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    ref = g.clone()
    assert scale_inplace(g, torch.tensor(1.0, device=DEVICE)) and torch.equal(g, ref)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for factor in (2.5, -0.3):
        f = torch.tensor(factor, dtype=acc, device=DEVICE)
        g = ref.clone()
        assert scale_inplace(g, f)
        assert torch.equal(g, (ref.to(acc) * f).to(dtype))
    wide = ref.clone()
    view = wide[:, 100:4000]  # rows of a wider buffer: only the view's columns change
    assert scale_inplace(view, f)
    expect = ref.clone()
    expect[:, 100:4000] = (ref[:, 100:4000].to(acc) * f).to(dtype)
    assert torch.equal(wide, expect)
    assert not scale_inplace(ref.t(), f)  # a layout it does not take: left to the caller


def test_backward_scales_in_place_on_cuda_free_at_one():
    """_times_upstream on CUDA: the Function's own gradient, scaled in place (no second buffer),
    its version bumped; at an upstream of 1 nothing changes."""
    if DEVICE != "cuda":
        pytest.skip("the device path of _times_upstream runs on CUDA only")
    from crossent._autograd import _times_upstream

    g = torch.randn(4, 300, device="cuda", dtype=torch.bfloat16)
    ref, version = g.clone(), g._version
    out = _times_upstream(g, torch.tensor(1.0, device="cuda"), in_place=False)
    assert out.data_ptr() == g.data_ptr() and torch.equal(out, ref) and g._version > version
    out = _times_upstream(g, torch.tensor(0.25, device="cuda"), in_place=False)
    assert out.data_ptr() == g.data_ptr() and torch.equal(out, ref * 0.25)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_add(dtype):
    """(hi, lo) 16-bit pair sums of float32 partials: the final hi is the float64 sum rounded
    once, up to the pair's ~2^-17 of the summands' magnitude per addition (a 16-bit running
    sum would be off by up to 2^-9 of it)."""
    from crossent.backends.triton.accumulate import pair_add_

    gen = torch.Generator().manual_seed(15)
    parts = [torch.randn(3000, generator=gen, dtype=torch.float64).float() * s
             for s in (1.0, 1e-3, 1.0, 1e-3, 0.5)]
    hi = torch.empty(3000, dtype=dtype, device=DEVICE)
    lo = torch.empty_like(hi)
    for i, p in enumerate(parts):
        pair_add_(hi, lo, p.to(DEVICE), first=i == 0)
    exact = sum(p.double() for p in parts)
    err = (hi.cpu().double() - exact).abs()
    once = ((exact.to(dtype).double() - exact).abs())  # rounding the exact sum once
    ulp = torch.finfo(dtype).eps * sum(p.double().abs() for p in parts)  # of the magnitude
    assert (err <= once + ulp * 2**-6).all()
    in_fp32 = (exact - (hi.cpu().double() + lo.cpu().double())).abs()
    assert (in_fp32 <= ulp * 2**-6).all()  # the pair itself carries the sum to ~16 bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_padded_rows_and_pair_sum(dtype, block, monkeypatch):
    """The CUDA linear layout on CPU: chunk rows padded to 16 elements (the kernel reads and
    writes them at that stride) and, for bf16, the weight gradient summed in a (hi, lo) pair."""
    from crossent import _linear_autograd

    monkeypatch.setattr(_linear_autograd, "PAD_ROWS_ON", ("cpu", "cuda"))
    monkeypatch.setattr(_linear_autograd, "PAIR_ACC_ON", ("cpu", "cuda"))
    monkeypatch.setattr(_linear_autograd, "_PART_BYTES", 24 * 4 * 100)  # 100-class slabs
    data = linear_data(64, 24, 515, dtype, 16)
    check_linear(*data, dtype, f"linear padded {dtype}", reduction="mean", chunk_size=16,
                 device=DEVICE, impl="triton", class_weight=True, label_smoothing=0.1)


def test_linear_bf16_chunks_need_mixed_mm(monkeypatch):
    """bf16 in several chunks on CUDA without out_dtype matmuls (torch < 2.8) raises, never
    silently upcasts."""
    if DEVICE != "cuda":
        pytest.skip("the check is for CUDA")
    from crossent import _linear_autograd

    monkeypatch.setitem(_linear_autograd._MIXED_MM, "cuda", False)
    data = linear_data(64, 24, 515, torch.bfloat16, 17)
    x, w, _, t = (a.to("cuda") for a in data[:4])
    with pytest.raises(RuntimeError, match="torch >= 2.8"):
        crossent.linear_cross_entropy(x, w.requires_grad_(), t, chunk_size=16)
