"""crossent.stats: token statistics from the kernels' pass vs a float64 recomputation from the
logits, on every backend (Triton through its interpreter, in a subprocess)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import crossent
from crossent.stats import TokenStats, cross_entropy_with_stats, linear_cross_entropy_with_stats

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["triton"] if INTERPRETED else ["torch", "numba"]
ROOT = Path(__file__).resolve().parent.parent


def _expected(logits: torch.Tensor, target: torch.Tensor, softcap=None) -> torch.Tensor:
    """(lse sum, correct, count, entropy sum) over counted rows, in float64."""
    x = logits.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    counted = target != -100
    p = x.softmax(1)
    entropy = torch.special.entr(p).sum(1)
    right = (x.argmax(1) == target).double()
    return torch.stack([x.logsumexp(1)[counted].sum(), right[counted].sum(),
                        counted.sum().double(), entropy[counted].sum()])


def _problem(n: int, c: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=gen) * 3).to(dtype)
    target = torch.randint(0, c, (n,), generator=gen)
    target[::2] = x[::2].float().argmax(1)  # half the rows predicted right
    target[1::5] = -100
    x[3, c // 2:] = -torch.inf  # padded vocabulary: entropy terms of p = 0 are 0
    target[3] = x[3].float().argmax()
    top = x[4].float().max() + 1
    x[4, 1] = x[4, c - 2] = top  # a tie: torch.argmax says 1, so target c-2 is wrong ...
    target[4] = c - 2
    x[6, 0] = x[6, c - 1] = x[6].float().max() + 1  # ... and the first of a tie is right
    target[6] = 0
    # Leading all -inf blocks before logits far below 0: the online merge must weigh them 0
    # (exp(0 - r) overflows for r = -1000).
    x[7, : c // 2] = -torch.inf
    x[7, c // 2:] -= 1000
    return x, target


@pytest.fixture(params=["one block", "blocks of 16"] if INTERPRETED else ["-"])
def block(request, monkeypatch):
    if request.param == "blocks of 16":  # the Triton kernel's online merge over blocks
        from crossent.backends.triton import launch

        monkeypatch.setattr(launch, "MAX_BLOCK", 16)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("grad", [False, True])
def test_cross_entropy_stats_match_the_logits(impl, dtype, softcap, grad, block):
    x, target = _problem(40, 67, dtype, seed=zlib.crc32(f"{dtype}{softcap}{grad}".encode()))
    x.requires_grad_(grad)
    loss, stats = cross_entropy_with_stats(x, target, impl=impl, softcap=softcap)
    assert isinstance(stats, TokenStats)
    torch.testing.assert_close(loss, crossent.cross_entropy(x, target, impl=impl, softcap=softcap))
    expected = _expected(x.detach(), target, softcap)
    torch.testing.assert_close(torch.stack(list(stats)), expected.float())
    torch.testing.assert_close(stats.accuracy, (expected[1] / expected[2]).float())
    if grad:  # the gradient of the call without statistics (numba's fused whole call
        # rounds the mean's factor its own way: equal to the dtype's tolerance, not bitwise)
        (g,) = torch.autograd.grad(loss, x)
        x2 = x.detach().clone().requires_grad_()
        (g_ref,) = torch.autograd.grad(crossent.cross_entropy(x2, target, impl=impl,
                                                              softcap=softcap), x2)
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("logit_scale", [None, 0.5])
def test_linear_stats_over_chunks_and_skipped_rows(impl, reduction, logit_scale):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(23, 16, generator=gen, requires_grad=True)
    w = torch.randn(45, 16, generator=gen, requires_grad=True)
    target = torch.randint(0, 45, (23,), generator=gen)
    target[::3] = -100  # skipped before the matmul on CPU
    logits = (x @ w.T).detach() * (1.0 if logit_scale is None else logit_scale)
    target[1::4] = logits[1::4].argmax(1)
    loss, stats = linear_cross_entropy_with_stats(
        x, w, target, reduction=reduction, impl=impl, chunk_size=5, softcap=4.0,
        logit_scale=logit_scale)
    torch.testing.assert_close(torch.stack(list(stats)), _expected(logits, target, 4.0).float())
    loss.sum().backward()  # "none" runs the kernel again in backward: stats stay as they were
    torch.testing.assert_close(torch.stack(list(stats)), _expected(logits, target, 4.0).float())


def test_all_ignored_gives_zero_count_and_nan_means():
    loss, stats = cross_entropy_with_stats(torch.randn(3, 5), torch.full((3,), -100))
    assert stats.count.item() == 0 and stats.correct.item() == 0
    assert stats.accuracy.isnan()


def test_probability_targets_are_refused():
    with pytest.raises(ValueError, match="class-index targets"):
        cross_entropy_with_stats(torch.randn(3, 5), torch.rand(3, 5).softmax(1))


@pytest.mark.skipif(INTERPRETED or importlib.util.find_spec("triton") is None,
                    reason="runs itself under the interpreter; needs triton")
def test_triton_kernel_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
           "-W", "ignore::RuntimeWarning", "-k", "not interpreter"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
