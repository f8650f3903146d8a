"""Shared helpers for the conformance tests: case generation and comparison against oracles.

Two oracles: torch's own ``F.cross_entropy`` (same dtype) and crossent's float64 reference.
Low-precision results must be at least as close to the float64 answer as torch's, up to one
rounding of the output dtype (both round their float32 accumulators once at the end).
"""
from __future__ import annotations

import importlib.util

import torch

from crossent._core import dispatch as _dispatch

TOL = {  # (rtol, atol) against a float64 answer for computations accumulated in that dtype
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
}
EPS = {torch.bfloat16: 2**-7, torch.float16: 2**-10}  # machine epsilon: one ulp at 1.0


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors here: the conformance grid runs on each."""
    names = ["torch"]
    if _dispatch.available("numba") and importlib.util.find_spec("crossent.backends.numba_cpu"):
        names.append("numba")
    return names


def logits(shape, dtype, gen, scale=3.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def index_target(input_shape, n_classes, gen, ignore_fraction=0.25, ignore_index=-100):
    shape = () if len(input_shape) == 1 else (input_shape[0], *input_shape[2:])
    t = torch.randint(0, n_classes, shape, generator=gen)
    if ignore_fraction:
        drop = torch.rand(shape, generator=gen) < ignore_fraction
        t = torch.where(drop, torch.full_like(t, ignore_index), t)
    return t


def prob_target(input_shape, dtype, gen):
    class_dim = 0 if len(input_shape) == 1 else 1
    return torch.randn(input_shape, generator=gen, dtype=torch.float64).softmax(class_dim).to(dtype)


def assert_close_to_reference(ours, theirs, ref64, dtype, what=""):
    """Compare ``ours`` with the float64 ``ref64``, and with torch's own result ``theirs``.

    float32/float64: within TOL of the float64 answer. float16/bfloat16: our error is no larger
    than torch's plus one rounding of the output dtype.
    """
    ours64, theirs64 = ours.double(), theirs.double()
    assert torch.equal(torch.isnan(ours64), torch.isnan(ref64)), f"{what}: NaN pattern differs"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != torch's {theirs.dtype}"
    finite = torch.isfinite(ref64)
    assert torch.equal(ours64[~finite & ~torch.isnan(ref64)], ref64[~finite & ~torch.isnan(ref64)]), what
    o, t, r = ours64[finite], theirs64[finite], ref64[finite]
    if dtype in TOL:
        rtol, atol = TOL[dtype]
        scale = r.abs().max() if r.numel() else torch.tensor(0.0)
        torch.testing.assert_close(o, r, rtol=rtol, atol=atol * max(1.0, float(scale)), msg=what)
        return
    ulp = EPS[dtype] * r.abs().clamp_min(1e-3)
    ours_err = (o - r).abs()
    torch_err = (t - r).abs()
    worst = (ours_err - torch_err - ulp).max() if r.numel() else torch.tensor(-1.0)
    assert worst <= 0, f"{what}: error exceeds torch's by {float(worst)}"
