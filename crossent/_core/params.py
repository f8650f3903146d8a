"""Options of one cross-entropy call, passed as one frozen object through every layer."""
from __future__ import annotations

import functools
from dataclasses import dataclass

REDUCTIONS = ("none", "mean", "sum")


@dataclass(frozen=True)
class CEParams:
    """Everything a backend needs besides tensors.

    ``reduction`` tells the kernel how the per-row gradient is scaled (``grad_scale``);
    ``softcap`` caps logits as ``softcap * tanh(x / softcap)`` before the softmax;
    ``z_loss`` adds ``z_loss * lse**2`` to each non-ignored row.
    """

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    inplace_backward: bool = False
    # Whether the caller reads the per-row lse (``*_with_lse``); backends may skip storing it.
    want_lse: bool = True
    # The misuse probe (``_core.diagnostics``) asked of the backend's pass: the row-sum
    # tolerance, or None when no probe is wanted. Backends that cannot probe report None.
    probe_tol: float | None = None

    @property
    def eps(self) -> float:
        """Label smoothing as applied: torch ignores values <= 0, and NaN (which compares false)."""
        return self.label_smoothing if self.label_smoothing > 0 else 0.0

    @functools.cached_property
    def whole_call(self) -> tuple[int, float, float, bool, bool, float]:
        """The scalars a numba whole call takes, made once per options object (a small call
        pays per Python step): ``(ignore_index, eps, z_loss, mean, reduced, probe_tol)``
        with ``probe_tol`` -1 when no probe is wanted."""
        return (self.ignore_index, self.eps, self.z_loss, self.reduction == "mean",
                self.reduction != "none", -1.0 if self.probe_tol is None else self.probe_tol)
