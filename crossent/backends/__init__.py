"""Compute backends. Every backend exposes the same kernel contract:

``ce_forward(logits, target, weight, grad_scale, params) -> (loss, lse, grad)``

- ``logits``: ``(R, C)`` contiguous, float16 / bfloat16 / float32 / float64.
- ``target``: ``(R,)`` int64 class indices (already validated: each in ``[0, C)`` or
  ``== params.ignore_index``), or ``(R, C)`` probabilities in the accumulation dtype.
- ``weight``: ``(C,)`` class weights in the accumulation dtype, or ``None``.
- ``grad_scale``: 0-d tensor in the accumulation dtype multiplying the gradient, or ``None``
  when no gradient is wanted (then ``grad`` is ``None``).
- returns ``loss`` ``(R,)`` per-row loss (weighted, smoothed, z-loss added, 0 for ignored rows)
  in float64 (Triton: float32), so that rows beyond the accumulation dtype's range (z-loss
  near |lse| = 1e19) still reduce to the float64 answer, not inf - inf; ``lse`` ``(R,)``
  logsumexp of the (soft-capped) logits in the accumulation dtype; and
  ``grad`` ``(R, C)`` in the logits' dtype: ``grad_scale * d loss[r] / d logits[r]``. With
  ``params.inplace_backward`` the gradient is written into ``logits``' storage.

``index_target_sums(target, weight, ignore_index, n_classes, dtype) -> (weight_sum, first_bad)``

- one pass over ``(R,)`` int64 class indices: ``weight_sum`` is the 0-d summed class weight of
  the counted rows (their count when ``weight`` is ``None``) in ``dtype``, the denominator of "mean";
  ``first_bad`` is the first row whose index is neither in ``[0, C)`` nor ``ignore_index``, or
  -1 (always -1 where the check is a device-side assert, to avoid a host sync).

Kernels never read outside a row whatever validation did: an out-of-range index is treated as
ignored.

The accumulation dtype is float64 for float64 logits and float32 otherwise.
``cross_entropy(logits, target, weight, want_grad, params) -> (loss, lse, grad, scale, probs)``

- the whole call: the range check of class indices (raising :class:`TargetOutOfBounds` before
  anything is written), the weight sum "mean" divides by, the rows, and the reduction: ``loss``
  is 0-d for "mean"/"sum" (in the accumulation dtype, or already rounded to 16-bit logits'
  dtype where the kernel does that for free), ``(R,)`` for "none"; ``lse`` is ``None`` when
  ``params.want_lse`` is false; ``grad`` is already multiplied by the
  reduction's factor ``scale`` (``1 / weight_sum`` for "mean", else 1; a float or a 0-d tensor).
  ``probs``: with ``params.probe_tol`` set, whether the logits look like probabilities (the
  misuse probe of ``crossent._core.diagnostics``, on the same sampled rows), made in the same
  pass; ``None`` when the backend did not probe (then the caller probes).
  Backends without a fused one use :func:`crossent.backends._reduced.reduced`.

``lane_launch(dtype, n_classes, params) -> launch or None`` (optional): for the calls
``crossent._core.lane`` takes (eager, contiguous ``(R, C)`` CPU logits, ``(R,)`` int64 indices, no
weight, no in-place gradient or lse), made once per set of options:
``launch(logits, target, logits_address, target_address, R, want_grad) -> (0-d loss in the
logits' dtype, grad or None, probs)``, the same results as ``cross_entropy`` in fewer Python steps
and torch calls (``None``: those calls go through ``cross_entropy``).

``ce_forward``'s optional ``stats``: an ``(R, 2)`` tensor in the accumulation dtype that the kernel fills, in
the same pass, with ``[first argmax of the (soft-capped) row == target, entropy of its
softmax]`` for class-index rows (``crossent.stats``); rows of ``ignore_index`` hold anything.
Not computed when ``None`` (the default). Eager only.
"""


class TargetOutOfBounds(IndexError):
    """A class index neither in ``[0, C)`` nor ``ignore_index``: raised by a backend before it
    writes anything; the public layer re-raises it naming the value and its position."""

    def __init__(self, row: int) -> None:
        super().__init__(f"target row {row} holds a class index out of range")
        self.row = row
