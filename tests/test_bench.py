"""Smoke test of the CPU benchmark harness (timings are never asserted, only that it runs)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from crossent.cli import bench as _bench
from crossent.cli import bench_sweep as _sweep


def test_quick_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--cases", "bf16-256x8192", "--modes", "fwd+bwd", "no-grad", "--repeats", "1",
            "--thp", "here", "--no-memory", "--plain", "--json", str(out)]
    assert _bench.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["contender"]) for r in result["timing"]}
    assert ("fwd+bwd", "crossent inplace") in rows and ("no-grad", "torch") in rows
    assert "time / torch" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_probe_sees_the_gradient_buffer(monkeypatch):
    """Out of place, one fwd+bwd adds exactly the gradient (its own mapping, so the probe sees it
    even without the harness's malloc setting); in place it adds nothing. The buffer cache is off,
    as CROSSENT_CPU_CACHE=0 makes it in the harness's subprocesses."""
    from crossent.backends import _cpu_alloc

    monkeypatch.setattr(_cpu_alloc, "_CACHE_SLOTS", 0)
    monkeypatch.setattr(_cpu_alloc, "_free", [])
    out_of_place = _bench._memory_child("512x8192", "crossent", "fwd+bwd")
    in_place = _bench._memory_child("512x8192", "crossent inplace", "fwd+bwd")
    assert 0.9 < out_of_place["extra_x"] < 1.1
    assert in_place["extra_x"] < 0.1


def test_cli_bench_linear_plot_json(tmp_path):
    """``crossent bench`` end to end in a subprocess: GB/s column, linear rows, a PNG, no GPU
    needed (the GPU part is skipped with a message where CUDA is absent)."""
    png, out = tmp_path / "b.png", tmp_path / "b.json"
    cmd = [sys.executable, "-m", "crossent", "bench", "--quick", "--cases", "512x8192",
           "--modes", "fwd+bwd", "no-grad", "--no-memory", "--linear", "--repeats", "5",
           "--plot", str(png), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "GB/s" in proc.stdout and "linear + cross-entropy" in proc.stdout
    result = json.loads(out.read_text())
    assert all(r["gb_per_s"] > 0 for r in result["timing"])
    assert {"crossent", "torch"} <= {r["contender"] for r in result["linear"]}
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if not torch.cuda.is_available():
        assert result["gpu"] is None and "GPU benchmark skipped" in proc.stdout


def test_gpu_part_runs_and_reports_when_cuda_is_present(monkeypatch, capsys):
    """The GPU part is wired in when CUDA is present (faked here: the Triton benchmark itself
    needs a GPU and is run by ``crossent bench --gpu``, from benchmarks/gpu_check.sh)."""
    from crossent.cli import bench_gpu as _bench_gpu

    row = dict(N=4096, V=32768, mode="fwd+bwd", impl="crossent triton", ms=0.1, tb_s=2.5,
               peak_extra_gb=0.25)
    fake = dict(device="FakeGPU", torch="x", triton="y", copy_tb_s=3.0, rows=[row])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_bench_gpu, "run", lambda quick, rounds, step: (step(), fake)[1])
    argv = ["--quick", "--cases", "bf16-256x8192", "--modes", "fwd", "--repeats", "1",
            "--thp", "here", "--no-memory", "--plain"]
    assert _bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "GPU: FakeGPU" in out and "crossent triton" in out and "2500" in out


def test_sweep_quick_end_to_end(tmp_path):
    """``crossent bench --sweep --quick`` in a subprocess: one table row per case with a target
    and a verdict, the memory column for the segmentation case, JSON with the same rows.
    Timings are not asserted (only that they were made)."""
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, "-m", "crossent", "bench", "--sweep", "--quick", "--plain",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    names = [c.name for c in _sweep.cases(quick=True)]
    assert [r["case"] for r in result["rows"]] == names
    for r in result["rows"]:
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0 and r["ratio"] > 0 and r["pairs"] >= 3
        assert r["pass"] in (True, False)
    assert [r for r in result["rows"] if "memory_x" in r][0]["case"].startswith("seg ")
    assert result["machine"]["native"] in (True, False)  # (the measured configuration)
    assert ("compiled nodes: loaded" in proc.stdout) == result["machine"]["native"]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("case "))
    body = lines[header + 1:header + 1 + len(names)]
    assert [line.split("  ")[0].strip() for line in body] == names
    assert all(line.split()[-1] in ("pass", "FAIL") for line in body)


@pytest.mark.parametrize("flag, module", sorted(_bench.OTHER_MODES.items()))
def test_other_modes_get_the_remaining_arguments(monkeypatch, flag, module):
    """``--gpu``, ``--sweep``, ``--linear-only`` hand every other argument to their benchmark."""
    seen = []
    target = importlib.import_module(f"crossent.cli.{module}")
    monkeypatch.setattr(target, "main", lambda argv: seen.append(argv) or 0)
    assert _bench.main(["--quick", flag, "--json", "x.json"]) == 0
    assert seen == [["--quick", "--json", "x.json"]]


def test_linear_only_prints_the_markdown_table(capsys):
    from crossent.cli import bench_linear

    assert bench_linear.main(["--shapes", "16,8,50", "--rounds", "1", "--floor", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "| N, H, V |" in out and "3 GEMMs s" in out and "| 16, 8, 50 |" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_mode_without_cuda_says_so(capsys):
    assert _bench.main(["--gpu", "--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_bench_correctness_check_runs_and_catches_a_wrong_loss():
    """``bench_gpu.disagreement`` (the GPU benchmark's check of each contender against float32
    torch) on CPU tensors: crossent agrees, a loss of doubled logits is named."""
    import crossent
    from crossent.cli import bench_gpu

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 300, generator=gen).bfloat16()  # (N, V)
    y = torch.randint(0, 300, (16,), generator=gen)
    assert bench_gpu.disagreement(crossent.cross_entropy, x, y) is None
    wrong = bench_gpu.disagreement(lambda h, t: crossent.cross_entropy(h * 2, t), x, y)
    assert wrong is not None and wrong.startswith("loss")
