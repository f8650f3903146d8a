"""Misuse errors: torch's exception class (taken from torch itself), and a message with the facts and the fix."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent


def _long(*shape: int, fill: int = 0) -> torch.Tensor:
    return torch.full(shape, fill, dtype=torch.long)


def _kdim_out_of_range() -> torch.Tensor:
    target = _long(2, 4, 4)
    target[1, 2, 3] = 7
    return target


# name -> (input, target, options, fragments the message must contain)
CASES = {
    "target-too-large": (
        torch.randn(5, 10), torch.tensor([1, 2, 3, 10, 4]), {},
        ["10", "position 3", "10 classes", "0..9", "ignore_index=-100"],
    ),
    "target-negative": (
        torch.randn(5, 10), torch.tensor([1, -5, 3, 1, 4]), {},
        ["-5", "position 1", "10 classes", "ignore_index=-100"],
    ),
    "target-out-of-range-custom-ignore": (
        torch.randn(3, 21), torch.tensor([255, 300, 2]), {"ignore_index": 255},
        ["300", "position 1", "21 classes", "ignore_index=255"],
    ),
    "target-out-of-range-k-dim": (
        torch.randn(2, 3, 4, 4), _kdim_out_of_range(), {},
        ["7", "(1, 2, 3)", "3 classes"],
    ),
    "target-out-of-range-unbatched": (
        torch.randn(4), torch.tensor(4), {},
        ["4", "4 classes"],
    ),
    "float-target-of-index-shape": (
        torch.randn(5, 10), torch.tensor([1.0, 2, 3, 4, 5]), {},
        ["torch.float32", ".long()", "(5, 10)"],
    ),
    "float-target-k-dim": (
        torch.randn(2, 3, 4, 5), torch.zeros(2, 4, 5), {},
        [".long()", "(2, 4, 5)"],
    ),
    "batch-size-mismatch": (
        torch.randn(4, 10), torch.tensor([1, 2, 3, 4, 5]), {},
        ["(4, 10)", "(5,)", "batch_size"],
    ),
    "spatial-size-mismatch": (
        torch.randn(2, 3, 4, 5), _long(2, 4, 6), {},
        ["(2, 3, 4, 5)", "(2, 4, 6)", "(2, 4, 5)"],
    ),
    "weight-wrong-length": (
        torch.randn(5, 10), torch.tensor([1, 2, 3, 4, 5]), {"weight": torch.ones(7)},
        ["(7,)", "10 classes", "length 10"],
    ),
    "channels-last-segmentation": (
        torch.randn(2, 4, 5, 3), _long(2, 4, 5), {},
        ["(2, 4, 5, 3)", "(2, 4, 5)", "C=3", "permute(0, 3, 1, 2)"],
    ),
    "channels-last-sequence": (
        torch.randn(4, 7, 11), _long(4, 7), {},
        ["(4, 7, 11)", "(4, 7)", "C=11", "permute(0, 2, 1)"],
    ),
}

# entry point -> (crossent's call, torch's call on the same arguments)
ENTRY_POINTS = {
    "cross_entropy": (crossent.cross_entropy, F.cross_entropy),
    "nll_loss": (crossent.nll_loss, F.nll_loss),
    "CrossEntropyLoss": (
        lambda x, y, **kw: crossent.CrossEntropyLoss(**kw)(x, y),
        lambda x, y, **kw: torch.nn.CrossEntropyLoss(**kw)(x, y),
    ),
}


def _raised(call, *args, **kwargs) -> BaseException:
    try:
        call(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any exception is what we compare
        return exc
    raise AssertionError("no exception raised")


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(CASES))
def test_error_class_is_torchs_and_message_has_the_facts(case, entry):
    input, target, options, fragments = CASES[case]
    ours, theirs = ENTRY_POINTS[entry]
    torch_exc = _raised(theirs, input, target, **options)
    exc = _raised(ours, input, target, **options)
    assert isinstance(exc, type(torch_exc)), (type(exc), type(torch_exc), str(exc))
    message = str(exc)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{missing} not in: {message}"


def test_uint8_target_out_of_range_names_value():
    exc = _raised(crossent.cross_entropy, torch.randn(3, 4), torch.tensor([0, 9, 1], dtype=torch.uint8))
    assert isinstance(exc, type(_raised(F.cross_entropy, torch.randn(3, 4),
                                        torch.tensor([0, 9, 1], dtype=torch.uint8))))
    assert "9" in str(exc) and "position 1" in str(exc)


def test_ignore_index_value_is_not_an_error():
    x, y = torch.randn(3, 4), torch.tensor([0, 255, 1])
    torch.testing.assert_close(crossent.cross_entropy(x, y, ignore_index=255),
                               F.cross_entropy(x, y, ignore_index=255))


def test_the_common_call_shortcut_implies_every_check():
    """``_validate.plain_rows`` lets the common call skip the detailed checks: wherever it says
    yes, every one of them passes (and torch accepts the call), over a family of shapes and
    dtypes of logits and targets, so the shortcut can never hide an error."""
    from hypothesis import given, settings, strategies as st

    from crossent._core import validate

    dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64,
                              torch.uint8, torch.int32, torch.bool])

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(in_shape=st.lists(st.integers(0, 4), min_size=0, max_size=3), in_dtype=dtypes,
           t_shape=st.lists(st.integers(0, 4), min_size=0, max_size=3), t_dtype=dtypes)
    def check(in_shape, in_dtype, t_shape, t_dtype):
        x, t = torch.zeros(in_shape, dtype=in_dtype), torch.zeros(t_shape, dtype=t_dtype)
        if not validate.plain_rows(x, t):
            return
        validate.check_input(x)
        assert validate.target_is_probabilities(x, t, -100, "mean") is False
        validate.check_weight(None, x)
        validate.check_index_target(x, t, "mean")  # nll_loss's checks too
        F.cross_entropy(x.float(), t)  # torch takes it too
        F.nll_loss(x.float(), t)

    check()


def _torchs_result_or_class(torch_call, our_call):
    """torch's result of a call, or None after checking that ours raises torch's exception
    class (or a subclass) where torch raises."""
    try:
        return torch_call()
    except Exception as e:  # noqa: BLE001 - the class itself is what is compared
        with pytest.raises(type(e)):
            our_call()
        return None


_IGNORE_INDEX_CALLS = {
    "cross_entropy": (crossent.cross_entropy, F.cross_entropy, "rows"),
    "cross_entropy_with_lse": (lambda *a, **k: crossent.cross_entropy_with_lse(*a, **k)[0],
                               F.cross_entropy, "rows"),
    "CrossEntropyLoss": (lambda x, t, ignore_index: crossent.CrossEntropyLoss(
        ignore_index=ignore_index)(x, t), F.cross_entropy, "rows"),
    "nll_loss": (crossent.nll_loss, F.nll_loss, "rows"),
    "linear_cross_entropy": (crossent.linear_cross_entropy, F.linear_cross_entropy, "linear"),
}


@pytest.mark.parametrize("value", [2, -100, (1 << 63) - 1, -(1 << 63), "np.int64", "np.int32",
                                   "0-d tensor", 1 << 63, -(1 << 63) - 1, 1 << 70, 2.0, 1.5, True,
                                   False, None, "text", "0-d float tensor"], ids=str)
@pytest.mark.parametrize("call", sorted(_IGNORE_INDEX_CALLS))
def test_ignore_index_is_taken_or_refused_as_torch_does(call, value):
    """ignore_index: ints and anything with ``__index__`` (numpy integers, 0-d integer tensors)
    give torch's loss; a float, a bool, None or a string raise torch's TypeError, a value
    outside int64 its ValueError (it was taken: 1.5 and True silently, and numba's own
    TypingError and OverflowError for the others)."""
    import numpy as np

    value = {"np.int64": np.int64(2), "np.int32": np.int32(-100), "0-d tensor": torch.tensor(2),
             "0-d float tensor": torch.tensor(2.0)}.get(value, value) if isinstance(value, str) \
        and value != "text" else value
    ours, ref, kind = _IGNORE_INDEX_CALLS[call]
    if call == "linear_cross_entropy" and value is None:
        pytest.skip("None is linear_cross_entropy's own default (no index ignored)")
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 5, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    t[0] = 2
    args = (x, t) if kind == "rows" else (torch.randn(6, 3, generator=gen),
                                          torch.randn(5, 3, generator=gen), t)
    want = _torchs_result_or_class(lambda: ref(*args, ignore_index=value),
                                   lambda: ours(*args, ignore_index=value))
    if want is not None:
        torch.testing.assert_close(ours(*args, ignore_index=value), want)


def _bad_argument_cases():
    import numpy as np

    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 4, 2, 1])
    cases = []
    for v in (0.1, 0, True, np.float32(0.1), torch.tensor(0.1), "0.1", None):
        cases.append((f"label_smoothing={v!r}",
                      lambda m, v=v: m.cross_entropy(x, t, label_smoothing=v)))
    for v in ("mean", "elementwise_mean", "MEAN", None):
        cases.append((f"reduction={v!r}", lambda m, v=v: m.cross_entropy(x, t, reduction=v)))
        cases.append((f"nll reduction={v!r}", lambda m, v=v: m.nll_loss(x, t, reduction=v)))
    for v in (1, -1, np.int64(1), torch.tensor(1), True, 1.0, "1", 2):
        cases.append((f"log_softmax dim={v!r}", lambda m, v=v: m.log_softmax(x, v)))
        cases.append((f"softmax dim={v!r}", lambda m, v=v: m.softmax(x, v)))
    return cases


@pytest.mark.parametrize("name,call", _bad_argument_cases(),
                         ids=lambda c: c if isinstance(c, str) else "")
def test_option_types_taken_or_refused_as_torch_does(name, call):
    """Options of the wrong type raise torch's class instead of being converted (a string
    label_smoothing, a bool or float dim were taken); torch's deprecated
    reduction='elementwise_mean' is taken, with its warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _torchs_result_or_class(lambda: call(F), lambda: call(crossent))
        if want is not None:
            torch.testing.assert_close(call(crossent), want)


_GRID_INPUTS = {"(4, 5)": (4, 5), "(5,)": (5,), "(0, 5)": (0, 5), "(4, 0)": (4, 0),
                "(2, 5, 3)": (2, 5, 3), "()": (), "(4, 1)": (4, 1)}
_GRID_TARGETS = {"(4,)": [0, 4, 2, 1], "(3,)": [0, 1, 2], "()": 2,
                 "(4,) out of range": [0, 5, 2, 1], "(4,) negative": [0, -1, 2, 1],
                 "(4,) all ignored": [-100] * 4,
                 "(4,) float": [0.0, 1.0, 2.0, 3.0], "(4,) int32": "int32", "(4,) uint8": "uint8",
                 "(0,)": [], "(2, 3)": [[0, 1, 2], [3, 4, 0]], "(2,)": [0, 1],
                 "(4,) bool": [True, False, True, False], "(4, 5) probabilities": "probs"}


def _grid_target(spec):
    if spec == "int32":
        return torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    if spec == "uint8":
        return torch.tensor([0, 1, 2, 3], dtype=torch.uint8)
    if spec == "probs":
        return torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(2)), 1)
    return torch.tensor(spec, dtype=torch.int64) if spec != [] else torch.zeros(0, dtype=torch.long)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("target", sorted(_GRID_TARGETS))
@pytest.mark.parametrize("shape", sorted(_GRID_INPUTS))
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_input_and_target_shapes_give_torchs_result_or_class(fn, shape, target, reduction):
    """Every pairing of these inputs and targets gives torch's result, or raises torch's class
    (or a subclass; messages are ours). Found by this grid: 0-d logits raised RuntimeError where
    torch raises IndexError, an empty batch with a 0-d target was taken, and a 1-d input with
    a target of the wrong dtype and size named the size (torch names the dtype first)."""
    x = torch.randn(_GRID_INPUTS[shape], generator=torch.Generator().manual_seed(1))
    t = _grid_target(_GRID_TARGETS[target])
    want = _torchs_result_or_class(lambda: getattr(F, fn)(x, t, reduction=reduction),
                                   lambda: getattr(crossent, fn)(x, t, reduction=reduction))
    if want is not None:
        torch.testing.assert_close(getattr(crossent, fn)(x, t, reduction=reduction), want,
                                   equal_nan=True)


_SOFTMAX_GRID = {"(4, 5)": ((4, 5), torch.float32), "(5,)": ((5,), torch.float32),
                 "(0, 5)": ((0, 5), torch.float32), "(2, 5, 3)": ((2, 5, 3), torch.float32),
                 "()": ((), torch.float32), "int64": ((4, 5), torch.int64),
                 "bool": ((4, 5), torch.bool), "float64": ((4, 5), torch.float64),
                 "bfloat16": ((4, 5), torch.bfloat16)}


@pytest.mark.parametrize("dtype", [None, torch.float64, torch.int64, torch.bfloat16, "float", 1],
                         ids=str)
@pytest.mark.parametrize("dim", [None, 0, 1, -1, 2, -3])
@pytest.mark.parametrize("input", sorted(_SOFTMAX_GRID))
@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
def test_softmax_inputs_dims_and_dtypes_give_torchs_result_or_class(fn, input, dim, dtype):
    """Every pairing gives torch's output (dtype and shape too), or raises torch's class: a dim
    out of range is an IndexError before any dtype error (it was NotImplementedError for an
    integer input), an empty integer input gives an empty output, as torch's, and a dtype
    that is not a torch.dtype is a TypeError (it was .to()'s RuntimeError)."""
    import warnings

    shape, in_dtype = _SOFTMAX_GRID[input]
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 3).to(in_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (dim=None's deprecation warning, tested elsewhere)
        want = _torchs_result_or_class(lambda: getattr(F, fn)(x, dim, dtype=dtype),
                                       lambda: getattr(crossent, fn)(x, dim, dtype=dtype))
        if want is None:
            return
        got = getattr(crossent, fn)(x, dim, dtype=dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = {}
    if want.dtype in (torch.bfloat16, torch.float16) and want.numel():
        # computed in float32 and rounded once, as torch's; the two may round one value apart
        ulp = 2.0 ** -7 * max(1.0, float(want.float().abs().nan_to_num().max()))
        tol = dict(rtol=2.0 ** -7, atol=ulp)
    torch.testing.assert_close(got, want, equal_nan=True, **tol)


@pytest.mark.parametrize("weight_shape", [(5,), (5, 1), (1, 5), (4,), (5, 2)], ids=str)
@pytest.mark.parametrize("shape", [(4, 5), (2, 5, 3)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_weight_shapes_as_torch(fn, shape, reduction, weight_shape):
    """torch takes any shape of C class weights for K-dimensional input and only (C,) for
    (N, C); so does crossent (it refused (C, 1) weights for K-dimensional input)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen)
    t = torch.randint(0, 5, shape[:1] + shape[2:], generator=gen)
    w = torch.rand(weight_shape, generator=gen)
    want = _torchs_result_or_class(lambda: getattr(F, fn)(x, t, w, reduction=reduction),
                                   lambda: getattr(crossent, fn)(x, t, w, reduction=reduction))
    if want is not None:
        torch.testing.assert_close(getattr(crossent, fn)(x, t, w, reduction=reduction), want)


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
def test_softmax_of_a_list_raises_torchs_class(fn):
    """torch calls ``input.softmax``: a list raises AttributeError; ours is also a TypeError."""
    with pytest.raises(AttributeError):
        getattr(F, fn)([1.0, 2.0], 0)
    with pytest.raises(AttributeError, match="must be a torch.Tensor"):
        getattr(crossent, fn)([1.0, 2.0], 0)
    with pytest.raises(TypeError):
        getattr(crossent, fn)([1.0, 2.0], 0)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss", "linear_cross_entropy"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_class_weight_that_requires_grad_raises_as_torch(fn, smoothing):
    """torch raises RuntimeError (not differentiable in 'weight') in grad mode and computes
    under no_grad; crossent had warned and returned a loss whose weight gradient was silently
    missing."""
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 5, generator=gen), torch.tensor([0, 1, 2, 3])
    w = torch.rand(5, generator=gen).requires_grad_()
    h, lw = torch.randn(4, 3, generator=gen), torch.randn(5, 3, generator=gen)
    kw = dict(weight=w) if fn == "nll_loss" else dict(weight=w, label_smoothing=smoothing)
    args = {"cross_entropy": (x, t), "nll_loss": (x.log_softmax(1), t),
            "linear_cross_entropy": (h, lw, t)}[fn]
    with pytest.raises(RuntimeError, match="weight"):
        getattr(F, fn)(*args, **kw)
    with pytest.raises(RuntimeError, match="weight.detach"):
        getattr(crossent, fn)(*args, **kw)
    with torch.no_grad():
        torch.testing.assert_close(getattr(crossent, fn)(*args, **kw), getattr(F, fn)(*args, **kw))
