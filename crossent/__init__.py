"""crossent: an exact, fast, memory-lean drop-in for PyTorch's cross-entropy.

Re-exports only; importing crossent has no side effects and does not import Triton or numba.
"""
from .functional import cross_entropy, cross_entropy_with_lse, log_softmax, nll_loss, softmax
from .modules import CrossEntropyLoss

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "cross_entropy",
    "cross_entropy_with_lse",
    "log_softmax",
    "nll_loss",
    "softmax",
]
