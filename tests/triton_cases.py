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
from crossent._core import reference as _reference
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
    # Impossible classes, never the target. Column 0 stays finite: crossent._core.reference reads its
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

