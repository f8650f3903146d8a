"""Triton backend cases for issue 13: strided logits, ignored rows with non-finite logits, the
device-side upstream scaling, the 16-bit (hi, lo) weight-gradient sums and the CUDA linear layout
(padded rows, pair sums), vs the contiguous path, the torch backend and float64.

Run like ``triton_cases.py`` (whose fixtures and helpers it shares): by
``tests/test_triton_backend.py`` in a child pytest, through ``TRITON_INTERPRET=1`` on CPU or
natively on a GPU.
"""
from __future__ import annotations

import pytest
import torch

import crossent

from ._oracle import index_target, logits
from .test_linear import _check as check_linear
from .test_linear import _data as linear_data
from .triton_cases import DEVICE, block  # noqa: F401  (block: the fixture, used by name)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_logits(dtype, inplace, block):
    """``wide[:, :C]``: read where it lies (row stride 2C + 3), a fresh gradient contiguous, an
    in-place one written at the logits' stride with the columns past C untouched."""
    from crossent._core.params import CEParams
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
    """_times_upstream on CUDA: the Function's own gradient, scaled in place (no second buffer);
    at an upstream of 1 nothing changes; a kept graph gets a new tensor, the saved one intact."""
    if DEVICE != "cuda":
        pytest.skip("the device path of _times_upstream runs on CUDA only")
    from crossent._core.autograd import _times_upstream

    g = torch.randn(4, 300, device="cuda", dtype=torch.bfloat16)
    ref = g.clone()
    for factor in (1.0, 0.25):
        out = _times_upstream(g, torch.tensor(factor, device="cuda"), keep=True)
        assert out.data_ptr() != g.data_ptr() and torch.equal(out, ref * factor)
        assert torch.equal(g, ref)
    out = _times_upstream(g, torch.tensor(1.0, device="cuda"), keep=False)
    assert out.data_ptr() == g.data_ptr() and torch.equal(out, ref)
    out = _times_upstream(g, torch.tensor(0.25, device="cuda"), keep=False)
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
def test_linear_padded_rows_and_pair_sum(dtype, monkeypatch):
    """The CUDA linear layout on CPU: chunk rows padded to 16 elements (the kernel reads and
    writes them at that stride) and, for bf16, the weight gradient summed in a (hi, lo) pair."""
    from crossent._core import linear_autograd as _linear_autograd

    monkeypatch.setattr(_linear_autograd, "PAD_ROWS_ON", ("cpu", "cuda"))
    monkeypatch.setattr(_linear_autograd, "PAIR_ACC_ON", ("cpu", "cuda"))
    monkeypatch.setattr(_linear_autograd, "_PART_BYTES", 24 * 4 * 100)  # 100-class slabs
    data = linear_data(48, 24, 515, dtype, 16)  # 3 chunks
    check_linear(*data, dtype, f"linear padded {dtype}", reduction="mean", chunk_size=16,
                 device=DEVICE, impl="triton", class_weight=True, label_smoothing=0.1)


def test_linear_bf16_chunks_need_mixed_mm(monkeypatch):
    """bf16 in several chunks on CUDA without out_dtype matmuls (torch < 2.8) raises, never
    silently upcasts."""
    if DEVICE != "cuda":
        pytest.skip("the check is for CUDA")
    from crossent._core import linear_autograd as _linear_autograd

    monkeypatch.setitem(_linear_autograd._MIXED_MM, "cuda", False)
    data = linear_data(64, 24, 515, torch.bfloat16, 17)
    x, w, _, t = (a.to("cuda") for a in data[:4])
    with pytest.raises(RuntimeError, match="torch >= 2.8"):
        crossent.linear_cross_entropy(x, w.requires_grad_(), t, chunk_size=16)


def test_out_of_range_indices_are_never_read(block):
    """The kernel treats an index outside [0, C) as ignored (validation raises before; the
    kernel must not read outside the row whatever reaches it): loss 0 and a zero gradient."""
    from crossent._core.params import CEParams
    from crossent.backends.triton import ce_forward

    x = logits((4, 21), torch.float32, torch.Generator().manual_seed(18)).to(DEVICE)
    y = torch.tensor([5, 21, -7, 1 << 40], device=DEVICE)
    loss, lse, grad = ce_forward(x, y, None, torch.tensor(1.0, device=DEVICE),
                                 CEParams(label_smoothing=0.1, z_loss=1e-2))
    assert (loss[1:] == 0).all() and (grad[1:] == 0).all()
    torch.testing.assert_close(lse, torch.logsumexp(x, 1))
    ref_loss, _, ref_grad = ce_forward(x[:1], y[:1], None, torch.tensor(1.0, device=DEVICE),
                                       CEParams(label_smoothing=0.1, z_loss=1e-2))
    assert torch.equal(loss[:1], ref_loss) and torch.equal(grad[:1], ref_grad)


def test_uint8_targets_and_zero_weight_sum(block):
    """uint8 class indices (compared in int64: 255 is a class, not -1); a mean over counted rows
    whose weights sum to 0 (scale inf): torch's NaN gradient on counted rows, 0 on ignored ones."""
    gen = torch.Generator().manual_seed(19)
    x = logits((6, 300), torch.float32, gen)
    y = torch.tensor([255, 3, 7, 255, 0, 200])
    grads = []
    for impl_target in ((DEVICE, y.to(torch.uint8)), ("torch", y)):
        leaf = x.clone().requires_grad_()
        where, t = impl_target
        h = leaf.to(DEVICE) if where == DEVICE else leaf
        fn = (lambda a, b: crossent.cross_entropy(a, b.to(a.device), impl="triton")) \
            if where == DEVICE else torch.nn.functional.cross_entropy
        fn(h, t).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])
    w = torch.ones(300)
    w[[3, 7]] = 0.0
    y2 = torch.tensor([3, 7, -100, -100, 3, 7])
    out = []
    for impl in ("triton", "torch"):
        leaf = x.clone().to(DEVICE if impl == "triton" else "cpu").requires_grad_()
        fn = crossent.cross_entropy if impl == "triton" else torch.nn.functional.cross_entropy
        kw = {"impl": "triton"} if impl == "triton" else {}
        loss = fn(leaf, y2.to(leaf.device), w.to(leaf.device), **kw)
        loss.backward()
        out.append((loss.detach().cpu(), leaf.grad.cpu()))
    assert out[0][0].isnan() and out[1][0].isnan()
    assert torch.equal(out[0][1].isnan(), out[1][1].isnan())
    assert (out[0][1][2:4] == 0).all() and out[0][1][[0, 1, 4, 5]].isnan().all()


@pytest.mark.parametrize("probs", [False, True])
def test_inf_class_weight_at_the_row_max(probs, block):
    """Smoothing (or probability targets) with an inf class weight on the row's largest logit:
    torch's w_c * (lse - x_c) is inf there, not inf * 0 = NaN; same loss as the torch backend."""
    gen = torch.Generator().manual_seed(20)
    x = logits((5, 40), torch.float32, gen)
    top = x.argmax(1)
    w = torch.ones(40)
    w[top[0]] = float("inf")
    if probs:
        t = torch.softmax(torch.randn(5, 40, generator=gen), 1)
    else:
        t = index_target(x.shape, 40, gen, ignore_fraction=0.0)
    out = [crossent.cross_entropy(x.to(dev), t.to(dev), w.to(dev), impl=impl, reduction="none",
                                  label_smoothing=0.1).cpu()
           for impl, dev in (("triton", DEVICE), ("torch", "cpu"))]
    assert torch.equal(out[0].isnan(), out[1].isnan()) and torch.equal(out[0].isinf(), out[1].isinf())
    assert out[0][top == top[0]].isinf().all()
    finite = out[1].isfinite()
    torch.testing.assert_close(out[0][finite], out[1][finite])
