"""crossent: an exact, fast, memory-lean drop-in for PyTorch's cross-entropy.

Re-exports only; importing crossent has no side effects and does not import Triton or numba.
"""
from . import distributed
from ._core.diagnostics import ProbabilitiesAsLogitsWarning, set_diagnostics
from .functional import cross_entropy, cross_entropy_with_lse, log_softmax, nll_loss, softmax
from .linear import linear_cross_entropy, linear_cross_entropy_with_lse
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss
from .stats import TokenStats, cross_entropy_with_stats, linear_cross_entropy_with_stats

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "ProbabilitiesAsLogitsWarning",
    "TokenStats",
    "cross_entropy",
    "cross_entropy_with_lse",
    "cross_entropy_with_stats",
    "linear_cross_entropy",
    "linear_cross_entropy_with_lse",
    "linear_cross_entropy_with_stats",
    "log_softmax",
    "nll_loss",
    "set_diagnostics",
    "softmax",
]
