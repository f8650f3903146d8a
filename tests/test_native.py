"""The compiled softmax node (``crossent.backends.native``): built here when a C++ compiler and
ninja are present (about a minute, once per machine), it must give the Python node's output
and gradients bit for bit, the same create_graph derivatives, and torch's autograd behaviour
(in-place checks, retain_graph, no_grad, inference mode). Skipped where it cannot be built."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent._core import dispatch
from crossent._core import softmax as sm
from crossent.backends import native

from ._oracle import cpu_backends, logits

pytestmark = [
    pytest.mark.skipif("numba" not in cpu_backends(), reason="the node runs the numba kernels"),
    pytest.mark.skipif(native.why_not_buildable() is not None,
                       reason=f"cannot build the native node: {native.why_not_buildable()}"),
]
FAMILIES = {"log_softmax": (crossent.log_softmax, F.log_softmax),
            "softmax": (crossent.softmax, F.softmax)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [((64, 10), 1), ((64, 10), -1), ((3, 5), 0), ((2, 3, 4), 1), ((7,), 0), ((0, 4), 1),
          ((2, 40, 30), -1), ((5, 7, 3), 1), ((1, 1), 1), ((4, 4000), 1),
          ((8, 4000), 1), ((16, 40, 100), 1)]  # (the last two: on torch's thread team)


@pytest.fixture(scope="module", autouse=True)
def node():
    dispatch.ready("numba", wait=True)
    return native.build()


@contextlib.contextmanager
def python_nodes(*plans: dict):
    """The lanes' Python nodes, as where the compiled node is not built: the node unloaded and
    ``plans`` (the lanes' plan caches) made again without it."""
    module, native.module = native.module, None
    tried, native._tried = native._tried, True
    for cache in plans:
        cache.clear()
    try:
        yield
    finally:
        native.module, native._tried = module, tried
        for cache in plans:
            cache.clear()


def python_node():
    """The softmax lane's Python node."""
    return python_nodes(sm._PLANS)


def _run(fn, x, dim, up):
    a = x.clone().requires_grad_()
    out = fn(a, dim)
    out.backward(up)
    return out.detach(), a.grad, out.grad_fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SHAPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_native_node_gives_the_python_nodes_bits(family, shape, dim, dtype):
    gen = torch.Generator().manual_seed(sum(shape) + 3)
    x = logits(shape, dtype, gen)
    up = logits(shape, dtype, gen)
    fn = FAMILIES[family][0]
    out, grad, node = _run(fn, x, dim, up)
    with python_node():
        want_out, want_grad, want_node = _run(fn, x, dim, up)
    assert "Cpp" in type(node).__name__ and "Cpp" not in type(want_node).__name__
    assert torch.equal(out, want_out) and torch.equal(grad, want_grad)
    assert out.dtype == dtype and grad.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), FAMILIES[family][1](x.float(), dim),
                               **({} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_create_graph_gives_the_python_nodes_second_derivative(family, dtype):
    """A Hessian-vector product through the node (create_graph=True): the gradient is formed in
    differentiable torch ops through the saved output, as the Python node forms it."""
    gen = torch.Generator().manual_seed(5)
    x, w = logits((6, 9), dtype, gen), logits((6, 9), dtype, gen)
    fn = FAMILIES[family][0]

    def hvp():
        a = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(a, 1) * w).sum(), a, create_graph=True)
        assert g.requires_grad
        return torch.autograd.grad((g.float() ** 2).sum(), a)[0]

    got = hvp()
    with python_node():
        want = hvp()
    assert torch.equal(got, want)


def test_autograd_behaviour_is_torchs():
    x = torch.randn(8, 5, requires_grad=True)
    out = crossent.log_softmax(x, 1)
    out.mul_(2)  # the saved output changed: backward must refuse, as torch's
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    up = torch.randn(8, 5)
    loss = (crossent.softmax(x, 1) * up).sum()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    (want,) = torch.autograd.grad((F.softmax(x, 1) * up).sum(), x)
    torch.testing.assert_close(g1, want)
    assert torch.equal(g1, g2)
    with torch.no_grad():
        assert not crossent.softmax(x, 1).requires_grad
    with torch.inference_mode():
        assert crossent.softmax(x, 1).is_inference()


def test_the_lane_takes_the_node_below_huge_page_sizes():
    """Below ``MAX_ELEMENTS`` the node (on one thread, or on torch's team from ``ONE_THREAD``);
    larger calls keep the Python node (huge-page outputs); strided input takes the general
    path either way."""
    small = torch.randn(64, 10, requires_grad=True)
    mid = torch.randn(4, native.ONE_THREAD, requires_grad=True)
    large = torch.randn(4, native.MAX_ELEMENTS // 4, requires_grad=True)
    assert "Cpp" in type(crossent.log_softmax(small, 1).grad_fn).__name__
    assert "Cpp" in type(crossent.log_softmax(mid, 1).grad_fn).__name__
    assert type(crossent.log_softmax(large, 1).grad_fn).__name__ == "LogSoftmaxLaneBackward"
    assert "Cpp" not in type(crossent.log_softmax(small.t(), 1).grad_fn).__name__
    assert sm._lane(small.t(), 1, "auto", True) is None


def test_load_built_never_compiles(monkeypatch, tmp_path):
    """The background load takes a built node only: with none in the cache it compiles
    nothing and the Python node stays."""
    assert native.built() and native.load_built()
    assert native._directory(create=False) == native._directory()  # torch's own path
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache
    assert native._directory(create=False) == tmp_path / native.NAME
    monkeypatch.setattr(native, "module", None)
    monkeypatch.setattr(native, "_tried", False)
    assert not native.built()
    assert not native.load_built() and native.module is None
    assert not any(tmp_path.iterdir())  # nothing built, not even a directory made


def test_a_fresh_process_loads_the_built_node():
    """``impl="auto"``'s background load brings the node in (no compile), and ``crossent env``
    says so."""
    code = ("import torch, crossent; from crossent._core import dispatch; "
            "dispatch.ready('numba', wait=True); "
            "print(type(crossent.softmax(torch.randn(3, 4, requires_grad=True), 1).grad_fn)"
            ".__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Cpp" in out.stdout
    env = subprocess.run([sys.executable, "-m", "crossent", "env", "--plain"], capture_output=True,
                         text=True, timeout=300)
    assert "native nodes (cross_entropy, nll_loss, softmax): loaded" in env.stdout


def python_lane():
    """The cross-entropy lane's Python node."""
    from crossent._core import lane

    return python_nodes(lane._PLANS)


CE_OPTIONS = [dict(), dict(label_smoothing=0.1), dict(reduction="sum"), dict(ignore_index=3),
              dict(z_loss=1e-3), dict(softcap=5.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 10), (8, 10), (256, 32), (1024, 15), (32, 100), (3, 1),
                                   (5, 2), (2, 5000), (1024, 16), (4096, 32), (64, 1000)],
                         ids=str)  # (the last three: on torch's thread team)
@pytest.mark.parametrize("options", CE_OPTIONS, ids=str)
def test_the_cross_entropy_node_gives_the_python_lanes_bits(shape, dtype, options):
    """Row kernel and few-class rows, every option the lane takes: the same loss and gradient
    bits as the Python node (softcap keeps the Python node)."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = logits(shape, dtype, gen)
    t = torch.randint(0, shape[1], shape[:1], generator=gen)
    t[::4] = options.get("ignore_index", -100)

    def run():
        a = x.clone().requires_grad_()
        loss = crossent.cross_entropy(a, t, **options)
        loss.backward()
        return loss.detach(), a.grad, type(loss.grad_fn).__name__

    loss, grad, node = run()
    with python_lane():
        want_loss, want_grad, want_node = run()
    assert ("Cpp" in node) == ("softcap" not in options) and "Cpp" not in want_node
    assert loss.dtype == want_loss.dtype == dtype
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)


def test_the_cross_entropy_node_behaves_as_the_python_lane():
    x = torch.randn(6, 5, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    assert "Cpp" in type(crossent.cross_entropy(x, t).grad_fn).__name__
    with pytest.raises(IndexError, match="Target 7 is out of bounds.*position 1"):
        crossent.cross_entropy(x, torch.tensor([0, 7, 1, 1, 1, 1]))
    loss = crossent.cross_entropy(x, t) * 3.0  # an upstream factor
    (want,) = torch.autograd.grad(F.cross_entropy(x, t) * 3.0, x)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1.zero_()  # the caller's own tensor: the retained graph still has the gradient
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g2, want)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(crossent.cross_entropy(x, t), x, create_graph=True)
    with torch.no_grad():
        assert not crossent.cross_entropy(x, t).requires_grad
    probs = torch.softmax(torch.randn(16, 5), 1)
    with pytest.warns(UserWarning, match="looks like probabilities"):
        crossent.cross_entropy(probs, torch.zeros(16, dtype=torch.long))
    mid = torch.randn(4, native.ONE_THREAD, requires_grad=True)
    assert "Cpp" in type(crossent.cross_entropy(mid, torch.zeros(4, dtype=torch.long)).grad_fn
                         ).__name__
    large = torch.randn(4, native.MAX_ELEMENTS // 4, requires_grad=True)
    assert type(crossent.cross_entropy(large, torch.zeros(4, dtype=torch.long)).grad_fn).__name__ \
        == "CrossEntropyLaneBackward"


def python_nll_lane():
    """The nll_loss lane's Python node."""
    from crossent._core import nll

    return python_nodes(nll._PLANS)


def _log_probs(shape, dtype, gen):
    return (torch.randn(shape, generator=gen) * 3).log_softmax(1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 10), (8, 3), (1, 1), (5, 2), (300, 7), (2, 5000),
                                   (0, 4), (4, 2 * native.ONE_THREAD)], ids=str)
@pytest.mark.parametrize("options", [dict(), dict(reduction="sum"), dict(ignore_index=2)],
                         ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_the_nll_node_gives_the_python_lanes_bits(shape, dtype, options, strided):
    """Every dtype the node runs, dense and transposed input, ignored rows (some, or all in a
    one-row batch), an upstream factor: the Python node's loss and gradient bits, and torch's
    values."""
    gen = torch.Generator().manual_seed(sum(shape) + 7)
    x = _log_probs(shape, dtype, gen)
    t = torch.randint(0, max(shape[1], 1), shape[:1], generator=gen)
    t[::3] = options.get("ignore_index", -100)
    up = torch.rand((), generator=gen).to(dtype) + 0.5

    def run(fn):
        a = (x.t().clone().t() if strided else x.clone()).requires_grad_()  # (strided: (1, N))
        loss = fn(a, t, **options)
        (grad,) = torch.autograd.grad(loss * up, a)
        return loss.detach(), grad, type(loss.grad_fn).__name__

    loss, grad, node = run(crossent.nll_loss)
    with python_nll_lane():
        want_loss, want_grad, want_node = run(crossent.nll_loss)
    assert "Cpp" in node and "Cpp" not in want_node
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == x.shape
    assert torch.equal(loss, want_loss) or (loss.isnan() and want_loss.isnan())
    assert torch.equal(grad, want_grad) or (grad.isnan() & want_grad.isnan()).equal(grad.isnan())
    torch_loss, torch_grad, _ = run(F.nll_loss)
    tol = {} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss.float(), torch_loss.float(), equal_nan=True, **tol)
    torch.testing.assert_close(grad.float(), torch_grad.float(), equal_nan=True, **tol)


def test_the_nll_node_behaves_as_torchs_nll_loss():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen).log_softmax(1).requires_grad_()
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    assert "Cpp" in type(crossent.nll_loss(x, t).grad_fn).__name__
    for bad, where in ((7, 1), (-3, 4)):
        wrong = t.clone()
        wrong[where] = bad
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds.*position {where}"):
            crossent.nll_loss(x, wrong)
    # retain_graph: two backwards, each a fresh gradient
    loss = crossent.nll_loss(x, t) * 3.0
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1.zero_()
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g2, torch.autograd.grad(F.nll_loss(x, t) * 3.0, x)[0])
    # the target changed in place after forward: backward refuses, as torch's
    changed = t.clone()
    loss = crossent.nll_loss(x, changed)
    changed[0] = 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.no_grad():
        assert not crossent.nll_loss(x, t).requires_grad
    # the lane's other calls keep the Python node: uint8 targets, huge inputs
    assert "Cpp" not in type(crossent.nll_loss(x, t.to(torch.uint8)).grad_fn).__name__
    large = torch.zeros(4, native.MAX_ELEMENTS // 4, requires_grad=True)
    assert type(crossent.nll_loss(large, torch.zeros(4, dtype=torch.long)).grad_fn).__name__ \
        == "NLLLossLaneBackward"


@pytest.mark.parametrize("dtype", DTYPES)
def test_nll_node_create_graph_is_torchs(dtype):
    """create_graph through nll_loss(log_softmax(x)): the gradient requires grad, a
    Hessian-vector product is torch's; a second derivative with respect to the log-probabilities
    alone is zeros (linear), and an upstream that requires grad (a double-backward product)
    is differentiated, as torch's."""
    gen = torch.Generator().manual_seed(11)
    x, v = logits((6, 9), dtype, gen), logits((6, 9), dtype, gen)
    t = torch.randint(0, 9, (6,), generator=gen)
    t[2] = -100

    def hvp(lib):
        a = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(lib.nll_loss(lib.log_softmax(a, 1), t), a, create_graph=True)
        assert g.requires_grad
        return torch.autograd.grad((g.float() * v.float()).sum(), a)[0]

    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(hvp(crossent), hvp(F), **tol)
    lp = _log_probs((6, 9), dtype, gen).requires_grad_()
    (g,) = torch.autograd.grad(crossent.nll_loss(lp, t), lp, create_graph=True)
    assert not torch.autograd.grad((g.float() ** 2).sum(), lp)[0].any()
    up = torch.tensor(2.0, dtype=dtype, requires_grad=True)
    got = torch.autograd.grad(crossent.nll_loss(lp, t), lp, up, create_graph=True)[0]
    want = torch.autograd.grad(F.nll_loss(lp, t), lp, up, create_graph=True)[0]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad((got.float() * v.float()).sum(), up)[0],
                               torch.autograd.grad((want.float() * v.float()).sum(), up)[0],
                               **tol)


_LANE_CALLS = {
    "cross_entropy": lambda lib, x, t: lib.cross_entropy(x, t),
    "nll_loss": lambda lib, x, t: lib.nll_loss(x.log_softmax(1), t),
    "log_softmax": lambda lib, x, t: lib.log_softmax(x, 1),
    "softmax": lambda lib, x, t: lib.softmax(x, -1),
}


def _lane_results(call, x, t):
    out = []
    for lib in (crossent, F):
        a = x.detach().clone().requires_grad_()
        y = _LANE_CALLS[call](lib, a, t)
        (g,) = torch.autograd.grad((y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape))
                                   .sum(), a)
        out.append((y.detach(), g, type(y.grad_fn).__name__))
    return out


@pytest.mark.parametrize("call", _LANE_CALLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_lanes_leave_autocast_to_the_general_path(call, dtype):
    """Under CPU autocast torch computes the losses of 16-bit input in float32 (softmax keeps
    the dtype): the C++ lanes decline those calls, the general path follows torch."""
    gen = torch.Generator().manual_seed(2)
    x, t = logits((8, 5), dtype, gen), torch.randint(0, 5, (8,), generator=gen)
    with torch.autocast("cpu", dtype=dtype):
        (ours, g_ours, node), (theirs, g_theirs, _) = _lane_results(call, x, t)
    assert ours.dtype == theirs.dtype and g_ours.dtype == g_theirs.dtype
    assert ("Cpp" in node) == call.endswith("softmax")
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g_ours.float(), g_theirs.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("call", _LANE_CALLS)
def test_the_lanes_take_parameters_and_inference_tensors(call):
    """A Parameter is a plain tensor to the lanes (the node, torch's values); inference-mode
    calls give torch's values without a graph."""
    gen = torch.Generator().manual_seed(4)
    x, t = logits((16, 7), torch.float32, gen), torch.randint(0, 7, (16,), generator=gen)
    p = torch.nn.Parameter(x.clone())
    y = _LANE_CALLS[call](crossent, p, t)
    assert "Cpp" in type(y.grad_fn).__name__
    (g,) = torch.autograd.grad(y.sum(), p)
    (want,) = torch.autograd.grad(_LANE_CALLS[call](F, p, t).sum(), p)
    torch.testing.assert_close(g, want)
    with torch.inference_mode():
        xi = x.clone()
        got, want = _LANE_CALLS[call](crossent, xi, t), _LANE_CALLS[call](F, xi, t)
    assert got.is_inference() and got.grad_fn is None
    torch.testing.assert_close(got, want)


def _forked_child(queue):
    # one thread: torch's own ops would enter libgomp's team, which hangs in a forked child (as
    # the kernels would); the lanes' check is not the thread count but the team's state
    torch.set_num_threads(1)
    results = {}
    for call in _LANE_CALLS:
        # (numpy arrays: pickled by value; tensors would be shared through the child's files)
        y, g, node = _lane_results(call, *_team_sized())[0]
        results[call] = (y.numpy(), g.numpy(), node)
    queue.put(results)


def _team_sized():
    gen = torch.Generator().manual_seed(6)
    x = logits((8, 2 * native.ONE_THREAD // 8), torch.float32, gen)  # (on the team at home)
    return x, torch.randint(0, x.shape[1], (8,), generator=gen)


def test_a_forked_child_leaves_team_sized_calls_to_the_python_nodes():
    """libgomp's team is not valid in a forked child: the lanes decline calls they would run on
    it there, and the Python nodes split them over Python threads: the bits of the node on the
    team in the parent."""
    import multiprocessing as mp

    home = {call: _lane_results(call, *_team_sized())[0] for call in _LANE_CALLS}
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_forked_child, args=(queue,))
    proc.start()
    results = queue.get(timeout=300)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    for call, (y, g, node) in results.items():
        want_y, want_g, home_node = home[call]
        assert "Cpp" in home_node and "Cpp" not in node, call
        assert torch.equal(torch.from_numpy(y), want_y), call
        assert torch.equal(torch.from_numpy(g), want_g), call


@pytest.mark.parametrize("case", ["mean, every row ignored", "sum, infinite upstream"])
def test_nll_node_double_backward_keeps_ignored_rows_zero(case):
    """An upstream that requires grad (a double-backward product) with no kept row (mean: the
    scale is g / 0) or an infinite upstream (65536 in float16): ignored rows' gradient is 0, as
    torch's; 0 * inf had made NaN there."""
    gen = torch.Generator().manual_seed(8)
    dtype = torch.float32 if case.startswith("mean") else torch.float16
    x = torch.randn(4, 3, generator=gen).log_softmax(1).to(dtype).requires_grad_()
    t = torch.full((4,), -100) if case.startswith("mean") else torch.tensor([0, -100, 2, -100])
    reduction = case.split(",")[0]
    up = torch.tensor(65536.0 if dtype == torch.float16 else 1.0, dtype=dtype,
                      requires_grad=True)
    loss = crossent.nll_loss(x, t, reduction=reduction)
    assert "Cpp" in type(loss.grad_fn).__name__
    (got,) = torch.autograd.grad(loss, x, up, create_graph=True)
    (want,) = torch.autograd.grad(F.nll_loss(x, t, reduction=reduction), x, up,
                                  create_graph=True)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert not got[t == -100].isnan().any() and not got[t == -100].signbit().any()


@pytest.mark.parametrize("call", [
    lambda x, t: crossent.cross_entropy(x, t.tolist()),
    lambda x, t: crossent.cross_entropy(x.tolist(), t),
    lambda x, t: crossent.nll_loss(x, t.tolist()),
    lambda x, t: crossent.nll_loss(x.numpy(), t),
    lambda x, t: crossent.nll_loss(x, None),
], ids=["ce target", "ce input", "nll target", "nll input", "nll None"])
def test_non_tensor_arguments_get_torchs_class_and_a_named_message(call):
    """torch raises TypeError for an argument that is not a tensor; the C++ lanes' binding
    would say "incompatible function arguments" with its own signature: the general path
    names the argument instead."""
    x, t = torch.randn(3, 4).log_softmax(1), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="must be a torch.Tensor") as error:
        call(x, t)
    assert "incompatible" not in str(error.value)


@pytest.mark.parametrize("fn", [crossent.softmax, crossent.log_softmax])
@pytest.mark.parametrize("dim", [1 << 63, -(1 << 63) - 1])
def test_a_dim_beyond_int64_raises_torchs_value_error(fn, dim):
    with pytest.raises(ValueError, match="64-bit"):
        fn(torch.randn(3, 4), dim)
    with pytest.raises(ValueError):
        getattr(F, fn.__name__)(torch.randn(3, 4), dim)
