"""ProbabilitiesAsLogitsWarning: softmax output given as logits warns once per call site; logits never do."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent._core import diagnostics as _diagnostics
from crossent._core.diagnostics import ProbabilitiesAsLogitsWarning, check_probabilities_as_logits


@pytest.fixture(autouse=True)
def _fresh_diagnostics():
    _diagnostics._warned_sites.clear()
    crossent.set_diagnostics(True)
    yield
    _diagnostics._warned_sites.clear()
    crossent.set_diagnostics(True)


def _caught(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # our own registry, not the filter, must make it "once"
        fn()
    return [w for w in record if issubclass(w.category, ProbabilitiesAsLogitsWarning)]


def test_softmax_output_warns_with_the_fix():
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(torch.randn(16, 10, generator=g), dim=1)
    target = torch.randint(0, 10, (16,), generator=g)
    caught = _caught(lambda: crossent.cross_entropy(probs, target))
    assert len(caught) == 1
    message = str(caught[0].message).lower()
    assert "softmax" in message
    assert "remove the softmax from the model's output; cross_entropy applies log-softmax itself" in message
    assert issubclass(ProbabilitiesAsLogitsWarning, UserWarning)
    assert crossent.ProbabilitiesAsLogitsWarning is ProbabilitiesAsLogitsWarning


def test_warning_points_at_the_users_line_for_function_and_module():
    probs = F.softmax(torch.randn(4, 3), dim=1)
    target = torch.tensor([0, 1, 2, 0])
    loss_fn = crossent.CrossEntropyLoss()
    calls = (
        lambda: crossent.cross_entropy(probs, target),
        lambda: loss_fn(probs, target),  # through nn.Module.__call__ and forward
    )
    for call in calls:
        (w,) = _caught(call)
        assert w.filename == __file__
        assert w.lineno == call.__code__.co_firstlineno  # the lambda's line, inside this test


def test_once_per_call_site():
    probs = F.softmax(torch.randn(8, 5), dim=1)
    target = torch.zeros(8, dtype=torch.long)

    def loop():
        for _ in range(3):
            crossent.cross_entropy(probs, target)  # one site, three calls
        crossent.cross_entropy(probs, target)  # a second site

    assert len(_caught(loop)) == 2


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: F.softmax(torch.randn(5), 0), id="unbatched"),
        pytest.param(lambda: F.softmax(torch.randn(3, 4, 7, 9), 1), id="k-dim"),
        pytest.param(lambda: F.softmax(torch.randn(64, 1000), 1).bfloat16(), id="bf16"),
        pytest.param(lambda: F.softmax(torch.randn(64, 1000), 1).half(), id="fp16"),
        pytest.param(lambda: F.softmax(torch.randn(32, 2), 1).double(), id="binary-fp64"),
        pytest.param(lambda: torch.eye(6), id="one-hot"),
        # a softmax divided in bfloat16 (each step rounded): within eps of 1
        pytest.param(lambda: (lambda e: e / e.sum(1, keepdim=True))(
            torch.randn(64, 3).exp().bfloat16()), id="bf16-divided-in-bf16"),
        pytest.param(lambda: F.softmax(torch.randn(4, 128256), 1).half(), id="fp16-128K"),
    ],
)
def test_probabilities_warn_for_every_shape_and_dtype(make):
    probs = make()
    assert len(_caught(lambda: check_probabilities_as_logits(probs))) == 1


def _trained_logits() -> torch.Tensor:
    """Logits of a small MLP after some SGD steps on separable data (sharp, mostly positive rows)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :4].argmax(1))
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        logits = model(x)
    assert (logits.argmax(1) == y).float().mean() > 0.8  # it did learn
    return logits


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.randn(16, 10), id="randn"),
        pytest.param(_trained_logits, id="trained-model"),
        pytest.param(lambda: torch.rand(16, 10), id="positive-not-summing-to-1"),
        pytest.param(lambda: 2 * F.softmax(torch.randn(16, 10), 1), id="sums-to-2"),
        pytest.param(lambda: F.log_softmax(torch.randn(16, 10), 1), id="log-probabilities"),
        pytest.param(lambda: torch.zeros(16, 10), id="zeros"),
        pytest.param(lambda: torch.ones(16, 1), id="C=1"),
        pytest.param(lambda: torch.empty(0, 10), id="empty"),
        pytest.param(lambda: torch.full((4, 3), float("nan")), id="nan"),
        pytest.param(lambda: F.softmax(torch.randn(4, 5, 6), 1).movedim(1, 2), id="softmax-other-dim"),
    ],
)
def test_logits_never_warn(make):
    logits = make()
    assert _caught(lambda: check_probabilities_as_logits(logits)) == []


def test_bfloat16_rows_near_one_but_not_a_softmax_do_not_warn():
    """A bfloat16 softmax sums to 1 within eps/2 (0.004): rows of values in [0, 1] summing to
    0.97 are logits (with 8 eps, 0.0625, a seventh of random 2-class rows warned)."""
    logits = torch.tensor([[0.30, 0.67]], dtype=torch.bfloat16)
    assert _caught(lambda: check_probabilities_as_logits(logits)) == []
    gen = torch.Generator().manual_seed(2)
    rows = torch.rand(400, 1, 2, generator=gen).bfloat16()
    warned = sum(len(_caught(lambda: check_probabilities_as_logits(r))) for r in rows)
    assert warned <= 16  # |a + b - 1| <= 2 eps: about 3 % of uniform pairs, ambiguous inputs


def test_log_softmax_then_cross_entropy_is_fine_and_silent():
    z = torch.randn(16, 10)
    y = torch.randint(0, 10, (16,))
    caught = _caught(lambda: crossent.cross_entropy(F.log_softmax(z, 1), y))
    assert caught == []


def test_warning_does_not_change_the_result():
    probs = F.softmax(torch.randn(6, 4, dtype=torch.float64), 1).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbabilitiesAsLogitsWarning)
        loss = crossent.cross_entropy(probs, y)
    (grad,) = torch.autograd.grad(loss, probs)
    ref = F.cross_entropy(probs, y)
    (ref_grad,) = torch.autograd.grad(ref, probs)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_only_a_few_rows_are_inspected():
    # Rows beyond the sample are never read: probabilities there stay unnoticed, by design.
    x = torch.randn(100, 10)
    x[8:] = F.softmax(x[8:], 1)
    assert _caught(lambda: check_probabilities_as_logits(x)) == []
    big = torch.randn(4, 7, 50, 60)
    rows, axis = _diagnostics._sample_rows(big, 1)
    assert rows.shape == (7, 8) and axis == 0  # 8 positions of C = 7 classes
    assert rows.data_ptr() == big.data_ptr()  # a view: nothing copied


def test_switch_off_and_on():
    probs = F.softmax(torch.randn(4, 3), 1)
    crossent.set_diagnostics(False)
    assert _caught(lambda: check_probabilities_as_logits(probs)) == []
    crossent.set_diagnostics(True)
    assert len(_caught(lambda: check_probabilities_as_logits(probs))) == 1


def test_environment_variable_switches_off():
    code = (
        "import warnings, torch, crossent\n"
        "warnings.simplefilter('error')\n"
        "crossent.cross_entropy(torch.softmax(torch.randn(4, 3), 1), torch.tensor([0, 1, 2, 0]))\n"
        "print('silent')\n"
    )
    env = {**os.environ, "CROSSENT_DIAGNOSTICS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "silent" in out.stdout


def test_skipped_off_cpu_and_under_transforms():
    # Meta tensors (as on accelerators) are not inspected: no host read, no sync.
    check_probabilities_as_logits(torch.empty(4, 3, device="meta"))
    probs = F.softmax(torch.randn(2, 4, 3), -1)
    out = torch.func.vmap(lambda p: (check_probabilities_as_logits(p), p.sum())[1])(probs)
    assert out.shape == (2,)


def test_torch_compile_fullgraph_does_not_break():
    probs = F.softmax(torch.randn(4, 3), 1)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        check_probabilities_as_logits(x)
        return x * 2

    torch.testing.assert_close(f(probs), probs * 2)
