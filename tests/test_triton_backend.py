"""Triton backend: the cases in ``triton_cases.py`` through Triton's interpreter (CPU), or on a GPU.

Why a subprocess: ``TRITON_INTERPRET=1`` only takes effect if it is set before Triton (and the
kernels) are imported, and once set it turns every ``@triton.jit`` kernel in the process into
an interpreted one. Setting it here with ``os.environ.setdefault`` would depend on test order
(any earlier import of Triton, e.g. by torch._inductor, makes it a no-op) and would leak into
the rest of the suite. A child pytest has neither problem; it costs one interpreter start.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
ROOT = Path(__file__).resolve().parent.parent


def _pytest_child(path: str | list[str], interpret: bool, timeout: int) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    paths = [path] if isinstance(path, str) else path
    cmd = [sys.executable, "-m", "pytest", *paths, "-q", "-x", "-p", "no:cacheprovider",
           "-W", "ignore::RuntimeWarning"]  # numpy warns on the kernels' deliberate inf * 0
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


def test_kernels_in_interpreter():
    """Every option, dtype and edge case, on CPU tensors through TRITON_INTERPRET=1."""
    _pytest_child(["tests/triton_cases.py", "tests/triton_layout_cases.py"], interpret=True,
                  timeout=900)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_widths_on_gpu():
    """V in {16384, 16385, 50257, 128256}, in place and not, strided, memory (triton_gpu_cases)."""
    _pytest_child("tests/triton_gpu_cases.py", interpret=False, timeout=900)


def test_gpu_check_script_without_cuda():
    """benchmarks/gpu_check.sh on a machine without CUDA: one line saying so, exit status 0 (with
    CUDA hidden from it, so this holds on GPU machines too)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == ["gpu_check: no CUDA device here, nothing to check"]


def test_auto_prefers_triton_on_cuda():
    from crossent._core import dispatch as _dispatch

    assert _dispatch._AUTO["cuda"][0] == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 24 * 2**30,
    reason="needs ~13 GB of GPU memory",
)
def test_int64_row_offsets_on_gpu():
    """Logits over 2^31 elements: rows past 2^31 / C must be addressed with int64 offsets."""
    import crossent

    n_classes = 65536
    n_rows = 2**31 // n_classes + 3  # the last rows start beyond element 2^31
    x = torch.zeros(n_rows, n_classes, dtype=torch.bfloat16, device="cuda")
    x[-1, 7] = 8.0  # only the last row differs: a wrapped offset would read another row
    y = torch.full((n_rows,), 7, device="cuda")
    x.requires_grad_()
    loss = crossent.cross_entropy(x, y, impl="triton", reduction="none")
    expected_last = torch.logsumexp(x[-1].detach().float(), 0) - 8.0
    torch.testing.assert_close(loss[-1].float(), expected_last, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(loss[0].float(), torch.tensor(float(torch.log(torch.tensor(65536.0))),
                                                             device="cuda"), rtol=1e-2, atol=1e-3)
    loss[-1].backward()
    assert x.grad[-1, 7].float() < 0 and x.grad[0].abs().max() == 0


_FIRST_CALL_COMPILED = """
import sys, torch, crossent
assert "crossent.backends.triton" not in sys.modules
x = torch.randn(8, 33, requires_grad=True)
y = torch.randint(0, 33, (8,))
step = torch.compile(lambda x, y: crossent.cross_entropy(x * 2, y, impl="triton"), fullgraph=True,
                     backend="aot_eager")
step(x, y).backward()
assert x.grad.abs().sum() > 0
"""


def test_compiled_first_call_imports_the_backend():
    """torch.compile(fullgraph=True) traces the lazy import of the Triton backend itself."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_on_gpu():
    """The interpreter cases, natively (last: the longest; gpu_check.sh may cut it short)."""
    _pytest_child(["tests/triton_cases.py", "tests/triton_layout_cases.py"], interpret=False,
                  timeout=900)
