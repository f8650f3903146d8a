"""The ``crossent`` command: ``demo``, ``bench``, ``env`` and ``build``.

``crossent demo``   trains the seeds' classifier with and without the softmax mistake (CPU, < 1 min)
``crossent bench``  runs the benchmarks (every argument after ``bench`` goes to the harness)
``crossent env``    prints versions, devices and which backends can run
``crossent build``  compiles the optional native nodes (small calls; needs a compiler)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import sys

_PACKAGES = ("torch", "crossent", "numpy", "numba", "triton", "rich", "matplotlib", "scikit-learn",
             "transformers")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossent", description="An exact, fast, memory-lean drop-in for PyTorch's cross-entropy.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,env,build}")
    demo = sub.add_parser("demo", help="train the seeds' classifier with and without softmax before the loss")
    demo.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    demo.add_argument("--out", default="crossent-demo.png", help="PNG of both loss curves")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plain", action="store_true", help="plain text output, no rich")
    sub.add_parser("bench", help="run the benchmarks (crossent bench --help for its options)",
                   add_help=False)
    env = sub.add_parser("env", help="versions, devices and available backends")
    env.add_argument("--plain", action="store_true", help="plain text output, no rich")
    build = sub.add_parser("build", help="compile the native autograd node for small softmax "
                                         "calls (a C++ compiler and ninja; about a minute)")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``crossent`` script and ``python -m crossent``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        # Forwarded untouched, so the harness owns its flags (--quick, --json PATH, --help).
        try:  # imported lazily: the harness pulls in optional dependencies
            _bench = importlib.import_module("crossent.cli.bench")
        except ModuleNotFoundError as exc:
            if exc.name != "crossent.cli.bench":
                raise
            print("crossent bench: this installation has no benchmark harness (crossent.cli.bench)",
                  file=sys.stderr)
            return 2
        return int(_bench.main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from . import demo as _demo

        return _demo.main(epochs=args.epochs, out=args.out, seed=args.seed, plain=args.plain)
    if args.command == "env":
        return env(plain=args.plain)
    if args.command == "build":
        return build(verbose=args.verbose)
    _parser().print_help()
    return 2


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(verbose: bool = False) -> int:
    """Compile the native node into torch's extension cache (``crossent.backends.native``)."""
    from ..backends import native

    try:
        module = native.build(verbose=verbose)
    except Exception as exc:  # noqa: BLE001 - a compiler's error, reported as the command's
        print(f"crossent build: {exc}", file=sys.stderr)
        return 1
    print(f"crossent build: native node ready at {module.__file__}; impl='auto' uses it for "
          "the common cross_entropy, nll_loss and softmax/log_softmax calls below 4M elements")
    return 0


def env(plain: bool = False) -> int:
    """Print versions, devices and backends (what a bug report needs)."""
    import torch

    from .. import __version__
    from .console import Console
    from .._core.diagnostics import diagnostics_enabled
    from .._core.dispatch import available, backend_name

    console = Console(plain=plain)
    versions = [("python", platform.python_version()), ("platform", platform.platform())]
    versions += [(name, __version__ if name == "crossent" else _version(name)) for name in _PACKAGES]
    console.table("versions", ["package", "version"], versions, left=2)

    devices = [("cpu", _cpu_model()),
               ("cpu threads", f"{torch.get_num_threads()} torch threads, {os.cpu_count()} logical cores"),
               ("cpu capability", torch.backends.cpu.get_cpu_capability())]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append((f"cuda:{i}", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                                         f"sm_{props.major}{props.minor}, CUDA {torch.version.cuda}"))
    else:
        devices.append(("cuda", "not available"))
    console.table("devices", ["device", "details"], devices, left=2)

    cpu = torch.empty(1, 2)
    auto_cpu = backend_name("auto", cpu)
    rows = []
    for name, needs in (("torch", "any device"), ("numba", "CPU tensors"),
                        ("triton", "CUDA tensors (or TRITON_INTERPRET=1 on CPU)")):
        rows.append((name, "yes" if available(name) else "no (pip install 'crossent[%s]')" % name, needs))
    console.table("backends (impl=...)", ["backend", "installed", "runs on"], rows, left=3)
    console.line(f"impl='auto' on CPU uses: {auto_cpu}")
    if torch.cuda.is_available():
        auto_cuda = backend_name("auto", cpu.cuda())
        console.line(f"impl='auto' on CUDA uses: {auto_cuda}")
    if available("numba"):
        from ..backends import _omp_team

        split = ("torch's OpenMP team (libgomp)" if _omp_team.usable()
                 else "a pool of Python threads (no libgomp found)")
        console.line(f"numba kernels split over: {split}")
    from ..backends import native

    if available("numba") and native.load_built():  # (what impl="auto" loads)
        node = "loaded"
    elif not native.ENABLED:
        node = "off (CROSSENT_NATIVE=0)"
    elif native.why_not_buildable() is not None:
        node = f"not available: {native.why_not_buildable()}"
    else:
        node = "built, not loaded" if native.built() else "not built (run: crossent build)"
    console.line(f"native nodes (cross_entropy, nll_loss, softmax): {node}")
    console.line(f"misuse diagnostics: {'on' if diagnostics_enabled() else 'off'} "
                 "(crossent.set_diagnostics, CROSSENT_DIAGNOSTICS=0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
