"""The numba CPU backend: kernel contract vs the PyTorch backend, end-to-end vs torch and the float64
reference, edge values, in place, no-grad, threads, and its element functions (exp, 16-bit bits).

The conformance grid (test_cross_entropy.py) also runs on this backend; these tests add what is
specific to it: long rows (vectorised loops and their tails), 16-bit storage, its own exp.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent._core import reference as _reference
from crossent._core.params import CEParams

numba = pytest.importorskip("numba")
from crossent.backends import _numba_kdim_call as kdim_call  # noqa: E402
from crossent.backends import _numba_math, _numba_threads, numba_cpu, torch_fused  # noqa: E402

from ._oracle import assert_close_to_reference, index_target, logits, prob_target  # noqa: E402

SIZES = [(5, 1), (7, 2), (33, 507), (3, 50257)]


def _gen(*key) -> torch.Generator:
    # crc32, not hash(): str hashes change between processes, and the data must not.
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _run_both(x, t, opts, upstream_seed):
    """loss and d loss / d x (random upstream, reduction none) from numba and the float64 reference."""
    gen = torch.Generator().manual_seed(upstream_seed)
    ours_x = x.clone().requires_grad_()
    ref_x = x.double().requires_grad_()
    ours = crossent.cross_entropy(ours_x, t, impl="numba", reduction="none", **opts)
    ref_opts = {k: (v.double() if torch.is_tensor(v) else v) for k, v in opts.items()}
    ref = _reference.cross_entropy(ref_x, t.double() if t.is_floating_point() else t,
                                   reduction="none", **ref_opts)
    up = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, ours_x, up.to(ours.dtype))
    (g_ref,) = torch.autograd.grad(ref, ref_x, up)
    return ours.detach(), g_ours, ref.detach(), g_ref


@pytest.mark.parametrize("n,c", SIZES)
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("opts", [
    {},
    {"label_smoothing": 0.1, "weight": True},
    {"ignore_index": 1, "label_smoothing": -0.5},  # smoothing <= 0 means none, as torch
    {"z_loss": 1e-3, "softcap": 15.0, "weight": True, "label_smoothing": 0.05},
], ids=["plain", "smooth-weight", "ignore1", "zloss-softcap"])
def test_float32_matches_reference(n, c, kind, opts):
    """float32 loss and gradient within float32 tolerance of the float64 reference (and torch)."""
    gen = _gen(n, c, kind, str(opts))
    x = logits((n, c), torch.float32, gen)
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(c, generator=gen) + 0.1
    ignore = opts.get("ignore_index", -100)
    if kind == "index":
        t = index_target((n, c), c, gen, ignore_fraction=0.25, ignore_index=ignore)
    else:
        opts.pop("ignore_index", None)
        t = prob_target((n, c), torch.float32, gen)
    ours, g_ours, ref, g_ref = _run_both(x, t, opts, n * c)
    if "z_loss" not in opts:  # torch has no z_loss / softcap: the reference alone judges those
        x_t = x.clone().requires_grad_()
        theirs = F.cross_entropy(x_t, t, reduction="none", **opts)
        assert_close_to_reference(ours, theirs.detach(), ref, torch.float32, "loss")
    else:
        assert_close_to_reference(ours, ours, ref, torch.float32, "loss")
    assert_close_to_reference(g_ours, g_ours, g_ref, torch.float32, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("c", [2, 507, 4099])
def test_16bit_storage_is_float32_math_rounded_once(dtype, kind, c):
    """16-bit logits are converted exactly, computed in float32 and rounded once: the kernel's
    16-bit gradient equals its float32 gradient (for the same values) rounded to the dtype."""
    gen = _gen(str(dtype), kind, c)
    x = logits((20, c), dtype, gen)
    t = index_target((20, c), c, gen) if kind == "index" else prob_target((20, c), torch.float32, gen)
    w = torch.rand(c, generator=gen) + 0.1
    params = CEParams(label_smoothing=0.1, z_loss=1e-3)
    scale = torch.tensor(0.37)
    loss16, lse16, g16 = numba_cpu.ce_forward(x, t, w, scale, params)
    loss32, lse32, g32 = numba_cpu.ce_forward(x.float(), t, w, scale, params)
    assert g16.dtype == dtype
    torch.testing.assert_close(loss16, loss32, rtol=0, atol=0)
    torch.testing.assert_close(lse16, lse32, rtol=0, atol=0)
    assert torch.equal(g16, g32.to(dtype))


@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_contract_matches_torch_backend(kind, softcap):
    """Same (loss, lse, grad) as the PyTorch backend, for every option at once, incl. lse."""
    gen = _gen(kind, softcap)
    n, c = 64, 1500  # 96000 elements: large enough to run on several threads
    x = logits((n, c), torch.float32, gen)
    t = index_target((n, c), c, gen) if kind == "index" else prob_target((n, c), torch.float32, gen)
    w = torch.rand(c, generator=gen) + 0.1
    params = CEParams(label_smoothing=0.2, z_loss=1e-4, softcap=softcap)
    scale = torch.tensor(1 / 50)
    ours = numba_cpu.ce_forward(x, t, w, scale, params)
    theirs = torch_fused.ce_forward(x.clone(), t, w, scale, params)
    for a, b, what in zip(ours, theirs, ["loss", "lse", "grad"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-7, msg=what)


def test_extreme_and_infinite_logits():
    """±1e4 logits, -inf entries (also on the target class), and a row of all -inf."""
    gen = _gen("extreme")
    x = logits((6, 300), torch.float32, gen)
    x[0, :] *= 1e4 / 3  # differences of thousands: every exp but the max's underflows
    x[1, 7] = 1e4
    x[2, ::3] = float("-inf")
    x[3, ::2] = -1e4
    x[4, 5] = float("-inf")
    x[5, :] = float("-inf")
    t = torch.tensor([3, 7, 1, 4, 5, -100])  # row 2 targets a -inf logit: loss inf, as torch
    t[2] = 3
    up = torch.randn(6, generator=gen)
    for opts in [{}, {"label_smoothing": 0.1}, {"weight": torch.rand(300, generator=gen) + 0.1}]:
        # torch is the oracle here: the float64 reference turns 0 * -inf into NaN where torch
        # (and crossent) give inf for a -inf target logit.
        results = []
        for impl in ("numba", None):
            x_i = x.clone().requires_grad_()
            loss = (crossent.cross_entropy(x_i, t, impl=impl, reduction="none", **opts) if impl
                    else F.cross_entropy(x_i, t, reduction="none", **opts))
            results.append((loss.detach(), *torch.autograd.grad(loss, x_i, up)))
        (ours, g_ours), (theirs, g_theirs) = results
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6, equal_nan=True)
        torch.testing.assert_close(g_ours, g_theirs, rtol=2e-5, atol=2e-6, equal_nan=True)


def test_all_rows_ignored():
    """mean over nothing: NaN loss and a zero gradient, exactly as torch."""
    x = logits((8, 40), torch.float32, _gen("ignored")).requires_grad_()
    t = torch.full((8,), -100)
    ours = crossent.cross_entropy(x, t, impl="numba")
    (g,) = torch.autograd.grad(ours, x)
    assert torch.isnan(ours) and torch.isnan(F.cross_entropy(x, t))
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_inplace_backward_long_rows(dtype, softcap):
    """Long rows (the vectorised in-place loop): the gradient lands in the logits' storage, equals
    the out-of-place one bit for bit, and a saved copy of the logits makes backward raise."""
    gen = _gen("inplace", str(dtype), softcap)
    base = logits((24, 5003), dtype, gen)
    t = index_target((24, 5003), 5003, gen)
    h = base.clone().requires_grad_()
    loss = crossent.cross_entropy(h * 1, t, impl="numba", softcap=softcap)
    (expected,) = torch.autograd.grad(loss, h)
    h = base.clone().requires_grad_()
    z = h * 1  # non-leaf logits, as a model produces them
    ptr = z.data_ptr()
    loss = crossent.cross_entropy(z, t, impl="numba", softcap=softcap, inplace_backward=True)
    (g,) = torch.autograd.grad(loss, z)
    assert g.data_ptr() == ptr
    assert torch.equal(g, expected)
    h = base.clone().requires_grad_()
    z = h * 1
    y = z.sin()  # saves z for its backward; z is then overwritten by the gradient
    loss = crossent.cross_entropy(z, t, impl="numba", inplace_backward=True) + y.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_loss_only_path_makes_no_gradient():
    """Without grad_scale the kernel returns no gradient and leaves the logits untouched."""
    gen = _gen("nograd")
    x = logits((16, 1000), torch.float32, gen)
    t = index_target((16, 1000), 1000, gen)
    before = x.clone()
    loss, lse, grad = numba_cpu.ce_forward(x, t, None, None, CEParams(inplace_backward=True))
    assert grad is None and torch.equal(x, before)
    assert loss.dtype == torch.float64  # the contract's per-row losses
    torch.testing.assert_close(loss.float(), F.cross_entropy(x, t, reduction="none"))
    torch.testing.assert_close(lse, torch.logsumexp(x, 1))
    with torch.no_grad():
        ours = crossent.cross_entropy(x.requires_grad_(), t, impl="numba")
    assert ours.grad_fn is None
    torch.testing.assert_close(ours, F.cross_entropy(x, t))


def test_result_does_not_depend_on_thread_count(monkeypatch):
    """Rows are split between threads, never a row: any thread count gives identical bits
    (the size threshold for threads is lowered so that this small input is split)."""
    monkeypatch.setattr(_numba_threads, "PARALLEL_MIN", 1)
    gen = _gen("threads")
    x = logits((50, 3000), torch.float32, gen)
    t = index_target((50, 3000), 3000, gen)
    scale = torch.tensor(0.02)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(numba_cpu.ce_forward(x, t, None, scale, CEParams()))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_float64_goes_to_the_torch_backend():
    gen = _gen("f64")
    x = logits((4, 9), torch.float64, gen)
    t = index_target((4, 9), 9, gen)
    ours = numba_cpu.ce_forward(x, t, None, torch.tensor(1.0, dtype=torch.float64), CEParams())
    theirs = torch_fused.ce_forward(x, t, None, torch.tensor(1.0, dtype=torch.float64), CEParams())
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float64 and torch.equal(a, b)


def _every_exponent(n_per_binade: int, seed: int):
    """Float32 values from every binade (both signs, random mantissas) plus the specials."""
    gen = torch.Generator().manual_seed(seed)
    exps = torch.arange(-149, 128, dtype=torch.float64).repeat_interleave(n_per_binade)
    mant = 1 + torch.rand(exps.shape, generator=gen, dtype=torch.float64)
    z = (mant * 2.0**exps).float()
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"),
                            torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max,
                            torch.finfo(torch.float32).tiny, 88.72, 88.73, -87.33, -103.97, -104.0])
    return torch.cat([z, -z, special])


def test_exp_f32_accuracy():
    """The polynomial exp is within 1.5 ulp of float64 exp over the range softmax uses."""
    z = torch.cat([torch.linspace(-87.3, 0.0, 1_000_003), torch.linspace(-1e-3, 1e-3, 10_001)])
    ours = _exp_array(z.numpy())
    ref = torch.exp(z.double())
    ulp = torch.finfo(torch.float32).eps * ref.float().abs().double().clamp_min(2**-126)
    ulps = ((torch.from_numpy(ours).double() - ref).abs() / ulp)
    assert float(ulps.max()) <= 1.5


@pytest.mark.parametrize("seed", [0, 1])
def test_exp_f32_whole_domain_matches_torch(seed):
    """Every float32 exponent range, both signs: huge negative arguments, results that underflow
    to subnormals, overflow to inf, -inf and NaN. Within 1.5 ulp of float64 exp for normal
    results and one subnormal step (2^-149) below them; inf, 0 and NaN exactly where torch.exp
    has them."""
    z = _every_exponent(64, seed)
    ours = torch.from_numpy(_exp_array(z.numpy()))
    theirs = torch.exp(z)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours == 0, theirs == 0) or _zero_flips_are_boundary(z, ours, theirs)
    finite = torch.isfinite(theirs)
    ref = torch.exp(z.double())[finite]
    ulp = (torch.finfo(torch.float32).eps * ref.abs()).clamp_min(2.0**-149)
    err = (ours[finite].double() - ref).abs() / ulp
    assert float(err.max()) <= 1.5


def test_log_f32_matches_float64_log():
    """The vectorisable log (K-dim kernel) is within 1 ulp of float64 log over the normal
    positive floats, with log(0) = -inf, log(inf) = inf and NaN for NaN and negatives."""
    z = _every_exponent(64, 3)
    z = z[(z > 0) & torch.isfinite(z) & (z >= torch.finfo(torch.float32).tiny)]
    ours = torch.from_numpy(_apply(_log_loop, z.numpy())).double()
    ref = torch.log(z.double())
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(2**-126)
    assert float(((ours - ref).abs() / ulp).max()) <= 1.0
    ends = torch.tensor([0.0, float("inf"), float("nan"), -1.0, 1.0])
    special = torch.from_numpy(_apply(_log_loop, ends.numpy()))
    assert special[0] == -math.inf and special[1] == math.inf and special[4] == 0
    assert torch.isnan(special[2]) and torch.isnan(special[3])


@numba.njit(cache=False)
def _log_loop(z, out):
    for i in range(z.size):
        out[i] = _numba_math.log_f32(z[i])


def _zero_flips_are_boundary(z, ours, theirs):
    """Results 0 in one and the smallest subnormal in the other: both round exp(z) ~ 2^-150."""
    flips = (ours == 0) != (theirs == 0)
    return bool((torch.maximum(ours[flips], theirs[flips]) <= 2.0**-149).all())


def test_tanh_f32_accuracy():
    """The rational tanh (softcap) is within 5 ulp of float64 tanh, and exactly +-1 / NaN at the ends."""
    v = torch.cat([torch.linspace(-12.0, 12.0, 2_000_001), torch.linspace(-1e-3, 1e-3, 10_001)])
    ours = torch.from_numpy(_apply(_tanh_loop, v.numpy())).double()
    ref = torch.tanh(v.double())
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(2**-126)
    assert float(((ours - ref).abs() / ulp).max()) <= 5
    ends = torch.tensor([float("inf"), float("-inf"), float("nan")])
    special = torch.from_numpy(_apply(_tanh_loop, ends.numpy()))
    assert special[0] == 1 and special[1] == -1 and torch.isnan(special[2])


def _exp_array(z):
    return _apply(_exp_loop, z)


def _apply(loop, z):
    import numpy as np

    out = np.empty_like(z)
    loop(z, out)
    return out


@numba.njit(cache=False)
def _exp_loop(z, out):
    for i in range(z.size):
        out[i] = _numba_math.exp_f32(z[i])


@numba.njit(cache=False)
def _tanh_loop(z, out):
    for i in range(z.size):
        out[i] = _numba_math.tanh_f32(z[i])


@pytest.mark.parametrize("dtype,fmt", [(torch.bfloat16, 1), (torch.float16, 2)])
def test_16bit_conversions_match_torch(dtype, fmt):
    """Every 16-bit pattern converts to float32 exactly as torch; float32 -> 16-bit rounds as torch
    (round to nearest even, overflow to inf, subnormals, NaN stays NaN)."""
    import numpy as np

    from crossent.backends import _numba_rows

    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    widened = np.empty(65536, np.float32)
    _numba_rows.bits_to_f32(bits.numpy().view(np.uint16), fmt, widened)
    expected = bits.view(dtype).float()
    ours = torch.from_numpy(widened)
    assert torch.equal(ours.isnan(), expected.isnan())
    assert torch.equal(ours[~ours.isnan()], expected[~expected.isnan()])

    gen = torch.Generator().manual_seed(fmt)
    f = torch.randint(-2**31, 2**31, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    f = torch.cat([f.view(torch.float32), torch.tensor([65504.0, 65520.0, 3e38, 1e-8, -0.0])])
    narrowed = np.empty(f.numel(), np.uint16)
    _numba_rows.f32_to_bits(f.numpy(), fmt, narrowed)
    ours = torch.from_numpy(narrowed.view(np.int16)).view(dtype)
    expected = f.to(dtype)
    assert torch.equal(ours.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(ours[keep].view(torch.int16), expected[keep].view(torch.int16))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_forked_child_gets_its_own_threads():
    """A child forked after the parent used the thread pool must not wait on the parent's threads."""
    import multiprocessing

    x = logits((64, 2048), torch.float32, _gen("fork"))  # above the one-thread threshold
    t = torch.randint(0, 2048, (64,), generator=_gen("fork-t"))
    expected = crossent.cross_entropy(x, t, impl="numba")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(_loss_in_child, (x, t))
        torch.testing.assert_close(result.get(timeout=60), expected, rtol=0, atol=0)


def _loss_in_child(x, t):
    return crossent.cross_entropy(x, t, impl="numba")


@pytest.mark.parametrize("width", [None, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kdim_kernel_matches_rows_and_thread_count(monkeypatch, dtype, width):
    """K-dim logits (N, C, S) read in place give the row kernel's results on the class-last
    copy, bit for bit in the loss up to float32 rounding, with any thread count (blocks of
    positions, never a position, are split between threads), in one block per sample or (64
    positions per block) two full blocks and a ragged one."""
    monkeypatch.setattr(_numba_threads, "PARALLEL_MIN", 1)
    if width:
        monkeypatch.setattr(kdim_call, "block_width", lambda n_cls: width)
    gen = _gen("kdim")
    x = logits((3, 7, 150), dtype, gen)  # S = 150
    t = index_target((3, 7, 150), 7, gen).reshape(-1)
    w = torch.rand(7, generator=gen) + 0.1
    params = CEParams(reduction="none", label_smoothing=0.1, z_loss=1e-3)
    rows = x.movedim(1, 2).reshape(-1, 7).contiguous()
    ref_loss, ref_lse, ref_grad, *_ = numba_cpu._composed(rows, t, w, True, params)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            loss, lse, grad, *_ = numba_cpu.cross_entropy(x, t, w, True, params)
            torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(lse, ref_lse, rtol=2e-6, atol=2e-6)
            tol = 2**-7 if dtype == torch.bfloat16 else 2e-6
            torch.testing.assert_close(grad.float(), ref_grad.view(3, 150, 7).movedim(2, 1).float(),
                                       rtol=tol, atol=tol)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("width", [None, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("inplace", [False, True])
def test_few_class_rows_match_the_row_kernel(monkeypatch, dtype, reduction, inplace, width):
    """Rows of at most ``FEW_CLASSES`` classes go through the K-dim kernel, each block of rows
    copied side by side: the row kernel's loss, lse and gradient (in the rows' own layout,
    in place too), on 1-3 threads, with ignored rows, weights, smoothing and z-loss, in one
    block or (64 rows per block) several."""
    monkeypatch.setattr(_numba_threads, "PARALLEL_MIN", 1)
    if width:
        monkeypatch.setattr(kdim_call, "block_width", lambda n_cls: width)
    for n_cls in (1, 2, 10, kdim_call.FEW_CLASSES):
        gen = _gen("few", n_cls, reduction)
        x = logits((150, n_cls), dtype, gen)  # 150 rows: blocks of 64 leave a ragged one
        t = index_target((150, n_cls), n_cls, gen)  # a quarter ignored
        w = torch.rand(n_cls, generator=gen) + 0.1
        params = CEParams(reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                          inplace_backward=inplace)
        ref_loss, ref_lse, ref_grad, ref_scale, _ = numba_cpu._composed(
            x.clone(), t, w, True, CEParams(reduction=reduction, label_smoothing=0.1, z_loss=1e-3))
        threads = torch.get_num_threads()
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                xi = x.clone()
                loss, lse, grad, scale, probs = numba_cpu.cross_entropy(xi, t, w, True, params)
                assert probs is None  # not asked
                assert grad.shape == x.shape and grad.is_contiguous()
                if inplace:
                    assert grad.data_ptr() == xi.data_ptr()
                if dtype == torch.bfloat16 and reduction != "none":
                    # the contract lets a reduced loss arrive rounded to the logits' dtype
                    assert loss.dtype == dtype
                    torch.testing.assert_close(loss, ref_loss.to(dtype), rtol=2**-8, atol=0)
                else:
                    torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=2e-6)
                torch.testing.assert_close(lse, ref_lse, rtol=2e-6, atol=2e-6)
                assert float(scale) == pytest.approx(float(ref_scale), rel=1e-6)
                tol = 2**-7 if dtype == torch.bfloat16 else 2e-6
                torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_tile_copies_move_every_value(dtype):
    """The few-class rows' copies (tiles of 16 rows, then the ragged rest) transpose exactly,
    both ways, for row counts around the tile and power-of-two strides."""
    rng = np.random.default_rng(zlib.crc32(np.dtype(dtype).name.encode()))
    for n_rows in (1, 15, 16, 17, 33, 512, 509):
        for n_cls in (1, 2, 10, 16, 31, 64):
            rows = rng.integers(0, 2**16, (n_rows, n_cls)).astype(dtype)
            runs = np.full((n_cls, n_rows), 7, dtype)
            kdim_call._copy_tiles(rows, runs, True)
            np.testing.assert_array_equal(runs, rows.T)
            back = np.zeros_like(rows)
            kdim_call._copy_tiles(back, runs, False)
            np.testing.assert_array_equal(back, rows)


@pytest.mark.parametrize("shape", [(5, 3), (64, 10), (40, 100), (2, 4, 6, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_in_the_kernel_pass_matches_the_python_probe(shape, dtype):
    """The whole call's own probe gives the Python probe's verdict on softmax output, on
    logits, on log-probabilities, and on probabilities with one value out of range."""
    from crossent._core import diagnostics

    gen = _gen("probe", shape)
    x = torch.randn(shape, generator=gen).to(dtype)
    t = index_target(shape, shape[1], gen).reshape(-1)
    tol = diagnostics.probe_tolerance(x)
    params = CEParams(reduction="mean", probe_tol=tol)
    nearly = x.float().softmax(1).to(dtype)
    nearly.reshape(-1)[0] = 1.5
    cases = [x.softmax(1), x, x.log_softmax(1), nearly]
    for v in cases:
        rows = v if v.dim() == 2 else v.reshape(shape[0], shape[1], -1)
        *_, probs = numba_cpu.cross_entropy(rows, t, None, False, params)
        assert probs == diagnostics.looks_like_probabilities(v), v
    assert [numba_cpu.cross_entropy(
        v if v.dim() == 2 else v.reshape(shape[0], shape[1], -1), t, None, False, params)[-1]
        for v in cases] == [True, False, False, False]


_BACKGROUND_SCRIPT = """
import torch, torch.nn.functional as F, crossent
from crossent._core import dispatch
x = torch.randn(64, 1000, requires_grad=True); t = torch.randint(0, 1000, (64,))
first = dispatch.resolve_backend("auto", x).__name__.rsplit(".", 1)[1]
loss = crossent.cross_entropy(x, t); loss.backward()
torch.testing.assert_close(loss, F.cross_entropy(x, t))
assert dispatch.ready("numba", wait=True)
then = dispatch.resolve_backend("auto", x).__name__.rsplit(".", 1)[1]
print(first, then, crossent.softmax(x, 1).sum(1).sub(1).abs().max().item() < 1e-5)
"""


@pytest.mark.parametrize("background", ["1", "0"])
def test_numba_loads_in_the_background_while_torch_serves_the_first_calls(background):
    """A fresh process: with the background load (the default outside tests) the first call
    runs on the torch backend and "auto" moves to numba once it has loaded; with
    CROSSENT_BACKGROUND_LOAD=0 numba serves the first call."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CROSSENT_BACKGROUND_LOAD": background}
    out = subprocess.run([sys.executable, "-c", _BACKGROUND_SCRIPT], env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first = "torch_fused" if background == "1" else "numba_cpu"
    assert out.stdout.split() == [first, "numba_cpu", "True"]


_FORK_SCRIPT = """
import multiprocessing as mp, torch, crossent
from crossent._core import dispatch

def child(q):
    x = torch.randn(8, 100, requires_grad=True); t = torch.randint(0, 100, (8,))
    crossent.cross_entropy(x, t, impl="numba").backward()
    q.put(bool(torch.isfinite(x.grad).all()))

if __name__ == "__main__":
    x = torch.randn(8, 100); t = torch.randint(0, 100, (8,))
    crossent.cross_entropy(x, t)  # starts the background load
    ctx = mp.get_context("fork")
    q = ctx.Queue(); p = ctx.Process(target=child, args=(q,)); p.start()
    print(q.get(timeout=120)); p.join(timeout=120); print(p.exitcode)
"""


def test_a_fork_during_the_background_load_gives_a_working_child(tmp_path):
    """A process forked while numba loads in the background (a DataLoader worker started
    right after the first loss) waits for the load, so the child's numba calls work."""
    import os
    import subprocess
    import sys

    script = tmp_path / "fork_during_load.py"
    script.write_text(_FORK_SCRIPT)
    env = {**os.environ, "CROSSENT_BACKGROUND_LOAD": "1"}
    out = subprocess.run([sys.executable, str(script)], env=env, text=True, capture_output=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "0"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(1, 2), (1, 16), (1, 17), (2, 10), (3, 40), (1, 3, 1),
                                   (4, 5, 1), (2, 16, 1), (1, 3, 2), (3, 20, 1, 1)])
def test_one_position_per_block(shape, reduction, weighted):
    """Calls whose K-dim blocks hold one position each (one row through the few-class path,
    ``S = 1``) once returned 0 for "mean" and "sum": the reduced total was told apart from the
    per-position losses by their sizes, which then agree. Loss and gradient against torch."""
    gen = _gen("one-position", *shape, reduction, weighted)
    x = logits(shape, torch.float32, gen)
    t = index_target(shape, shape[1], gen, ignore_fraction=0.0)
    w = torch.rand(shape[1], generator=gen) + 0.5 if weighted else None
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = crossent.cross_entropy(ours_x, t, weight=w, reduction=reduction, impl="numba")
    ref = F.cross_entropy(ref_x, t, weight=w, reduction=reduction)
    torch.testing.assert_close(ours, ref)
    up = torch.rand(ref.shape, generator=gen)
    (ours * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(ours_x.grad, ref_x.grad)


@pytest.mark.parametrize("n_cls", [16, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_same_input_same_bits_whatever_the_allocator_did(n_cls, dtype, probs, reduction):
    """The same call gives the same bits every time: the row kernels' 16-bit scratch rows once
    started wherever malloc put them, and the vectorised row sums split at the first aligned
    element, so the loss and lse moved by an ulp from call to call. Allocations of random sizes
    between the calls move malloc's state."""
    gen = _gen("same-bits", n_cls, str(dtype), probs)
    x = logits((40, n_cls), dtype, gen)
    t = (torch.rand((40, n_cls), generator=gen) if probs
         else index_target((40, n_cls), n_cls, gen))
    rng = np.random.default_rng(0)
    first, held = None, []
    for _ in range(25):
        held.append(np.empty(int(rng.integers(1, 4000)), np.float32))
        v = x.clone().requires_grad_()
        loss = crossent.cross_entropy(v, t, reduction=reduction, impl="numba")
        loss.sum().backward()
        now = (loss.detach(), v.grad)
        if first is None:
            first = now
        for a, b in zip(first, now):
            assert torch.equal(a, b)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 63, 64, 65, 100, 127, 128, 129, 191, 257, 1000])
def test_row_passes_touch_every_element_once(n):
    """Each row pass (``_numba_rows``) loops over the head of ``split`` and then its tail: every
    element is read and written exactly once at every length around the 64 boundary, offset
    (a row that starts mid-array) or not, and the 16-bit passes round-trip."""
    from crossent.backends import _numba_rows as rows

    gen = torch.Generator().manual_seed(n)
    base = torch.randn(n + 3, generator=gen).numpy()
    for x in (base[:n].copy(), base[3:]):  # aligned copy, and a view 3 elements in
        m = np.float32(x.max()) if n else np.float32(-np.inf)
        assert rows.row_max(x) == m
        out = np.full(n, np.nan, np.float32)
        s = rows.exp_sum_store(x, m, out)
        e = np.exp((x - m).astype(np.float64))  # of the float32 difference: exp_f32's ~1 ulp
        np.testing.assert_allclose(out, e, rtol=2.5e-7)
        np.testing.assert_allclose(s, e.sum(), rtol=1e-5)
        np.testing.assert_allclose(rows.exp_sum(x, m), e.sum(), rtol=1e-5)
        g = x.copy()
        np.testing.assert_allclose(rows.exp_sum_inplace(g, m), e.sum(), rtol=1e-5)
        np.testing.assert_allclose(g, e, rtol=2.5e-7)
        g = x.copy()
        rows.scale(g, np.float32(3.0))
        assert np.array_equal(g, x * np.float32(3.0))
        g = x.copy()
        rows.scale_sub(g, np.float32(2.0), np.float32(0.5))
        assert np.array_equal(g, x * np.float32(2.0) - np.float32(0.5))
        bits = np.full(n, 7, np.uint16)
        rows.f32_to_bits(x, 1, bits)
        back = np.full(n, np.nan, np.float32)
        rows.bits_to_f32(bits, 1, back)
        want = torch.from_numpy(x.copy()).to(torch.bfloat16).float().numpy()
        assert np.array_equal(back, want)
