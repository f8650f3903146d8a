"""The real commands, in a subprocess: exit codes, key output lines, the PNG the demo writes."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from crossent import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "crossent", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])


def test_demo_trains_both_models_warns_and_writes_png(tmp_path):
    out = tmp_path / "sub" / "demo.png"
    result = _run("demo", "--epochs", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr + result.stdout
    text = result.stdout
    for line in ("good: plain logits", "bad: softmax in forward", "loss and accuracy per epoch",
                 "ProbabilitiesAsLogitsWarning", "remove the softmax from the model's output",
                 "nll_loss(log_softmax(z, 1), y) == cross_entropy(z, y)", f"wrote {out}"):
        assert line.lower() in text.lower(), line
    assert "yes (float32" in text
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_demo_without_rich_and_matplotlib_degrades_to_plain_text(tmp_path):
    out = tmp_path / "demo.png"
    code = ("import sys; sys.modules['rich'] = None; sys.modules['matplotlib'] = None\n"
            "from crossent.cli import main; sys.exit(main(sys.argv[1:]))")
    result = _run("demo", "--epochs", "1", "--out", str(out), code=code)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "━" not in result.stdout and "┃" not in result.stdout  # no rich bar or table
    assert "good test acc" in result.stdout
    assert "ProbabilitiesAsLogitsWarning" in result.stdout
    assert "matplotlib is not installed" in result.stdout
    assert not out.exists()


def test_env_lists_versions_devices_backends():
    result = _run("env")
    assert result.returncode == 0, result.stderr
    for word in ("python", "torch", "crossent", "numba", "triton", "rich", "cpu threads", "cuda",
                 "backends", "impl='auto' on CPU uses"):
        assert word in result.stdout, word
    used = result.stdout.split("impl='auto' on CPU uses:")[1].split()[0]
    assert used in ("numba", "torch")  # a backend's name (was once an internal module's)
    if "numba kernels split over:" in result.stdout:  # where numba is installed
        assert ("OpenMP team" in result.stdout) == _omp_team_usable()


def _omp_team_usable() -> bool:
    try:
        from crossent.backends import _omp_team
    except ImportError:
        return False
    return _omp_team.usable()


def test_no_command_prints_help_and_fails():
    result = _run()
    assert result.returncode == 2
    assert "demo" in result.stdout and "bench" in result.stdout and "env" in result.stdout


def test_bench_forwards_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("crossent.cli.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "crossent.cli.bench", fake)
    assert cli.main(["bench", "--quick", "--json", "out.json"]) == 0
    assert seen == [["--quick", "--json", "out.json"]]


def test_bench_without_harness_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "crossent.cli.bench", None)  # import raises ModuleNotFoundError
    try:
        code = cli.main(["bench"])
    except ModuleNotFoundError:
        pytest.fail("a missing harness must be reported, not raised")
    assert code == 2 and "no benchmark harness" in capsys.readouterr().err
