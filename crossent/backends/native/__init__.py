"""Compiled autograd nodes for the common cross_entropy, nll_loss and softmax calls (optional).

A Python ``autograd.Function`` costs more than torch's whole small call: at (64, 10)
log_softmax fwd+bwd measured 1.41x torch with crossent's Python node and 0.96x with the same
numba kernels behind a C++ node (``node.cpp``; BENCHMARKS.md, tenth session). The nodes are a
torch C++ extension, so they need a C++ compiler and ninja once, to build them:
``crossent build`` (or :func:`build`) compiles them into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), about a minute.

The build is named by a hash of the source and torch's version, and compiles a copy of the
source kept in its own directory: every checkout and environment with the same source and
torch shares one build, and loading it never recompiles. At run time nothing is compiled:
``impl="auto"``'s numba load (``_core.dispatch``) loads the build if it exists
(:func:`load_built`), and the lanes use it from then on; otherwise they keep their Python
nodes. ``CROSSENT_NATIVE=0`` turns it off.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("node.cpp")
_TEXT = SOURCE.read_bytes() if SOURCE.exists() else b""  # (an install without package data)
_PYTHON = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
NAME = "crossent_native_" + hashlib.sha256(
    _TEXT + f"{torch.__version__} {_PYTHON}".encode()).hexdigest()[:12]
ENABLED = os.environ.get("CROSSENT_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")

# Calls below ONE_THREAD elements run the kernels on one thread (``_numba_threads``'
# PARALLEL_MIN, not imported: it would import numba with crossent), larger ones on torch's
# OpenMP team; from MAX_ELEMENTS on (``_numba_host.SMALL``) the outputs come from the huge-page
# cache and the Python node runs them, its cost small beside theirs.
ONE_THREAD = 1 << 14
MAX_ELEMENTS = 1 << 22
IMPLS = ("auto", "numba")  # the impls whose calls the nodes may take (they run numba's kernels)
module: ModuleType | None = None  # the loaded extension, once ready
_tried = False  # load_built ran (once per process: it reads the file system)
_lock = threading.Lock()


def why_not_buildable() -> str | None:
    """Why :func:`build` cannot run here (no compiler, no ninja), or None."""
    from torch.utils import cpp_extension

    if not _TEXT:
        return f"this installation lacks the node's source ({SOURCE})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not on PATH; set CXX)"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    return None


def build(verbose: bool = False) -> ModuleType:
    """Compile (or load, when already built from this source) the node, and enable it in this
    process. Raises RuntimeError naming what is missing."""
    reason = why_not_buildable()
    if reason is not None:
        raise RuntimeError(f"crossent's native node cannot be built: {reason}")
    return _load(verbose)


def built() -> bool:
    """Whether this source's build for this torch and Python is in torch's extension cache."""
    return (_directory(create=False) / f"{NAME}.so").exists()


def _directory(create: bool = True) -> Path:
    """The build's directory, as torch's loader names it (``TORCH_EXTENSIONS_DIR`` as is, else
    a folder per Python and accelerator in torch's cache); made only with ``create``."""
    from torch.utils import cpp_extension

    if create:
        return Path(cpp_extension._get_build_directory(NAME, verbose=False))
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        accelerator = ("cpu" if torch.version.cuda is None and torch.version.hip is None
                       else f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip
                       else f"cu{torch.version.cuda.replace('.', '')}")
        root = os.path.join(cpp_extension.get_default_build_root(), f"{_PYTHON}_{accelerator}")
    return Path(root) / NAME


def load_built() -> bool:
    """Load the node if it is built (never compiles), once per process; whether it is ready.
    For the numba load (background or first call); any failure leaves the Python node."""
    global _tried
    if module is not None or _tried:
        return module is not None
    with _lock:
        if not _tried and ENABLED and why_not_buildable() is None and built():
            try:
                _load(False)
            except Exception:  # noqa: BLE001 - the Python node stays; `crossent build` says why
                pass
        _tried = True
    return module is not None


def _load(verbose: bool) -> ModuleType:
    global module
    from torch.utils import cpp_extension

    from . import kernels

    from ..._core.diagnostics import _tolerance
    from .._numba_kdim_call import FEW_CLASSES

    softmax, nll, ce = kernels.entries(), kernels.nll_entries(), kernels.ce_entries()
    source = _directory() / "node.cpp"  # the build's own copy: no other checkout's path in it
    if not source.exists() or source.read_bytes() != _TEXT:
        source.write_bytes(_TEXT)
    loaded = cpp_extension.load(NAME, [str(source)], extra_cflags=["-O2"], verbose=verbose)
    order = (torch.float32, torch.bfloat16, torch.float16)  # the node's slots
    loaded.configure([a for d in order for a in softmax[d]], [a for d in order for a in nll[d]],
                     [ce[d, few] for d in order for few in (False, True)],
                     [_tolerance(d) for d in order], FEW_CLASSES, ONE_THREAD, MAX_ELEMENTS,
                     _team_usable())
    module = loaded
    return loaded


def _forked() -> None:
    if module is not None:
        module.set_team(False)  # libgomp's team is not valid in a forked child (``_omp_team``)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _team_usable() -> bool:
    from .. import _omp_team

    return _omp_team.usable()
