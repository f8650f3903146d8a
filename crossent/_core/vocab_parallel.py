"""Vocab-parallel cross-entropy math: local statistics, one all-gather, the local gradient.

Each rank holds the logits of classes ``[start, start + V_local)``. The loss of a row needs
``lse = log sum_c exp(x_c)`` over all ``V`` classes, the target logit (on one rank only) and,
for label smoothing / probability targets, class-weighted sums of the logits. All of them merge
from per-rank statistics:

    lse        = M + log S,  S = sum_r s_r * exp(m_r - M)   m_r local max, s_r = sum exp(x - m_r)
    x_y, mass  = sum_r (rank's partial value)               0 on ranks that do not own the class
    sum_c u_c (M - x_c) = sum_r [sum_{c in r} u_c (m_r - x_c) + (sum_{c in r} u_c) (M - m_r)]

Losses are formed as torch's log_softmax forms them, ``(M - x) + log S``, never ``lse - x``:
``lse`` rounded to float32 has lost ``log S`` at large logits (near 1e30 every loss was 0), and
the weighted sums enter relative to each rank's max for the same reason (``C lse - sum_c x_c``
cancels).

so one all-gather of a ``(k, R)`` block per rank gives every rank everything (Megatron's
vocab-parallel loss uses three all-reduces: max, target logit, sum-exp). The same buffer carries
each rank's shard layout and a target checksum, so bad layouts raise the same error on every
rank after the collective instead of deadlocking the others. With ``lse`` known, the gradient
``softmax - target`` of this rank's slice is local: backward needs no communication.

Rows are processed in chunks chosen by the caller, so float32 temporaries (and, for the fused
linear variant, the logits themselves) stay bounded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from . import validate as _validate
from .params import CEParams
from ..backends.torch_fused import _capped, _scaled_gaps, acc_dtype

_META = 4  # int64 fields per rank: shard start, shard size, weight length (-1: none), target checksum


@dataclass(frozen=True)
class Shard:
    """This rank's classes ``[start, start + size)``; ``group`` is ``None`` for a single process
    (no process group initialised: no collective at all)."""

    start: int
    size: int
    group: object | None
    distributed: bool
    vocab_size: int | None = None  # known on the host when the offsets were gathered


def all_gather(out: Tensor, inp: Tensor, group) -> None:
    """``out (W, ...)`` <- every rank's ``inp``, in group-rank order (one collective)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out.view(-1), inp, group=group)  # the concatenated form: gloo rejects the stacked one


def shard_layout(local_size: int, group, distributed: bool, device: torch.device) -> tuple[int, int]:
    """``(vocab_start, vocab_size)`` from every rank's shard size (one all-gather, one host read)."""
    if not distributed:
        return 0, local_size
    size = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = size.new_empty(dist.get_world_size(group))
    all_gather(sizes, size, group)
    sizes = sizes.tolist()
    return sum(sizes[: dist.get_rank(group)]), sum(sizes)


@dataclass
class Result:
    loss: Tensor  # (R,) per-row loss, accumulation dtype, 0 for ignored rows
    lse_parts: tuple[Tensor, Tensor]  # (R,) each: M and log S, lse = M + log S of the capped logits
    denominator: Tensor | None  # divisor of "mean"
    scale: Tensor  # gradient factor folded into grad (1 / denominator for "mean")
    weight_local: Tensor | None  # (V_local,) this rank's class weights, accumulation dtype


LogitsOf = Callable[[slice], Tensor]  # rows -> (r, V_local) logits of those rows
GradSink = Callable[[slice, Tensor], None]  # (rows, (r, V_local) gradient in the acc dtype)


def forward(
    logits_of: LogitsOf, shape: tuple[int, int], dtype: torch.dtype, target: Tensor,
    weight: Tensor | None, shard: Shard, params: CEParams, step: int, sink: GradSink | None,
    scratch: Tensor | None = None,
) -> Result:
    """Per-row loss and lse of logits ``shape = (R, V_local)``; this rank's gradient to ``sink``.

    ``logits_of(rows)`` gives the logits of ``rows`` (``step`` rows at a time, twice when a
    gradient is wanted); ``sink(rows, g)`` receives ``scale * d loss / d logits`` of those rows.
    ``target`` is ``(R,)`` global class indices or ``(R, V_local)`` local probability slices;
    ``weight`` the full ``(V,)`` class weights in the accumulation dtype.

    ``scratch``, an ``(R, V_local)`` accumulation-dtype buffer, keeps the first pass's
    ``exp(x - m_local)``; the gradient is then made in it, in place (``sink`` gets views of it),
    from ``softmax = exp(x - m_local) * exp(m_local - lse)``: no second exp over the logits, and
    ``logits_of`` is called again only for a softcap's chain-rule factor. ``scratch`` may be the
    logits themselves (without softcap): each chunk is read before it is overwritten.
    """
    n_rows, n_local = shape
    acc = acc_dtype(dtype)
    device = target.device
    probs = target.is_floating_point()
    eps = max(params.label_smoothing, 0.0)
    w_local = None
    if weight is not None:
        w_local = weight[shard.start : shard.start + n_local]
        if w_local.shape[0] != n_local:  # a bad layout: the check after the collective raises
            w_local = weight.new_zeros(n_local)
    owned = local = None
    if not probs:
        owned = (target != params.ignore_index) & (target >= shard.start)
        owned &= target < shard.start + n_local  # (R,) this rank holds the target class
        local = torch.where(owned, target - shard.start, 0)  # (R,) column in this shard

    # Stats rows: max m, sum-exp, then index: [x_y]; probs: [sum w t (m - x), sum w t]; with
    # smoothing also [sum w eps (m - x), eps sum w] (m: 0 for a row of all -inf).
    n_stats = 2 + (1 if not probs else 2) + (2 if eps > 0 else 0)
    buf, stats, meta = _packed(n_stats, n_rows, acc, device)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        x, _ = _capped(logits_of(rows).to(acc), params.softcap)  # (r, V_local) acc
        t = target[rows].to(acc) if probs else local[rows]
        _local_stats(x, t, owned[rows] if owned is not None else None, w_local, eps, stats[:, rows],
                     None if scratch is None else scratch[rows])
    meta[0], meta[1] = shard.start, n_local
    meta[2] = -1 if weight is None else weight.shape[0]
    meta[3] = 0 if probs else _checksum(target)

    if shard.distributed:
        world = dist.get_world_size(shard.group)
        gathered = buf.new_empty(world, buf.shape[0])  # (W, L)
        all_gather(gathered, buf, shard.group)
    else:
        gathered = buf.unsqueeze(0)  # (1, L)
    all_stats = gathered[:, _slots(acc) : _slots(acc) + stats.numel()].view(-1, n_stats, n_rows)
    vocab = _check_layout(gathered[:, : _slots(acc)].view(torch.int64), shard, weight, target,
                          params.ignore_index, probs)
    if isinstance(vocab, Tensor):
        vocab = vocab.to(acc)  # device-side size (accelerators, offsets given by the caller)
    top, log_s = _merge(all_stats)  # (R,) each: lse = top + log_s

    if probs:
        loss, coef, t_scale, denominator = _prob_terms(top, log_s, all_stats, weight, vocab, eps,
                                                       params)
        w_y = None
    else:
        loss, coef, w_y, denominator = _index_terms(top, log_s, all_stats, target, weight, vocab,
                                                    eps, params)
    scale = torch.ones((), dtype=acc, device=device)
    if params.reduction == "mean":
        # An all-ignored batch: loss 0/0 = NaN and a zero gradient, exactly as torch.
        scale = torch.where(denominator > 0, 1 / denominator, 0)
    else:
        denominator = None
    if scratch is not None:
        m_local = stats[0]  # (R,) this rank's max, as the first pass subtracted it
        # softmax = exp(x - m) * exp(m - lse), folded into the per-row gradient factor
        coef = coef * ((torch.where(m_local == -torch.inf, 0, m_local) - top) - log_s).exp()
    if sink is not None:
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            if scratch is None:
                x, tanh_x = _capped(logits_of(rows).to(acc), params.softcap)  # (r, V_local) acc
                # p * coef, out of place: x may be the caller's logits
                g = (x - top[rows].unsqueeze(1)).sub_(log_s[rows].unsqueeze(1)).exp_()
                g.mul_(coef[rows].unsqueeze(1))
            else:
                g = scratch[rows].mul_(coef[rows].unsqueeze(1))  # (r, V_local) in place
                tanh_x = None
                if params.softcap is not None:
                    tanh_x = torch.tanh(logits_of(rows).to(acc) / params.softcap)
            if probs:
                t = target[rows].to(acc) * (1 - eps) + t_scale  # smoothed local target slice
                g.sub_(t if w_local is None else t * w_local)
            else:
                if n_local:
                    hit = (-(1 - eps) * w_y[rows] * owned[rows]).unsqueeze(1)  # (r, 1)
                    # The true-class term is subtracted in the accumulation dtype (p_y - 1).
                    g.scatter_add_(1, local[rows].unsqueeze(1), hit)
                if eps > 0:
                    counted = (target[rows] != params.ignore_index).to(acc).unsqueeze(1)
                    g.sub_((eps / vocab) * counted * (1.0 if w_local is None else w_local))
            g.mul_(scale)
            if tanh_x is not None:
                g.mul_(1 - tanh_x * tanh_x)  # d(cap * tanh(x / cap))/dx
            sink(rows, g)
    return Result(loss, (top, log_s), denominator, scale, w_local)


def _slots(acc: torch.dtype) -> int:
    return _META * 8 // acc.itemsize


def _packed(n_stats: int, n_rows: int, acc: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor]:
    """One flat buffer ``[meta (int64 bits) | stats (n_stats, R)]``: a single collective moves both."""
    slots = _slots(acc)
    ratio = 8 // acc.itemsize
    length = slots + n_stats * n_rows
    length += -length % ratio  # every rank's meta block stays int64-aligned in the gather
    buf = torch.zeros(length, dtype=acc, device=device)
    stats = buf[slots : slots + n_stats * n_rows].view(n_stats, n_rows)
    return buf, stats, buf[:slots].view(torch.int64)


def _checksum(target: Tensor) -> Tensor:
    """Position-weighted sum of the targets (wrapping int64): equal on ranks with equal targets."""
    positions = torch.arange(1, target.shape[0] + 1, device=target.device)
    return (target * positions).sum()


def _local_stats(x: Tensor, t: Tensor, owned: Tensor | None, w: Tensor | None, eps: float,
                 out: Tensor, exp_out: Tensor | None) -> None:
    """Fill ``out (n_stats, r)`` with this shard's statistics of the capped logits ``x (r, V_local)``.

    ``exp_out`` (may alias ``x``, which is read first) receives ``exp(x - m)``, if given.
    """
    if x.shape[1] == 0:  # an empty shard: max -inf, every sum 0
        out.zero_()
        out[0] = -torch.inf
        return
    m = x.amax(1)  # (r,)
    out[0] = m
    # A shard whose row is all -inf adds exactly 0 (not NaN) to the merged sum-exp, and its
    # sums below are taken about 0 (inf for a class of weight > 0, as torch's lse - x_c).
    m_safe = torch.where(m == -torch.inf, 0, m).unsqueeze(1)  # (r, 1)
    if owned is not None:
        x_y = x.gather(1, t.unsqueeze(1)).squeeze(1)
        out[2] = torch.where(owned, x_y, 0)  # the target logit, on the owning rank only
    else:
        wt = t if w is None else t * w  # (r, V_local)
        out[2] = (wt * (m_safe - x)).sum(1)
        out[3] = wt.sum(1)
    if eps > 0:
        # eps (m - x_c), rounded once (``_scaled_gaps``); a term at the max is 0, not w_c * 0
        # (NaN for an inf weight, whose inf the eps W log S term supplies, as torch's)
        gaps = _scaled_gaps(m_safe, x, eps)
        out[-2] = (gaps if w is None else torch.where(gaps == 0, 0, gaps * w)).sum(1)
        out[-1] = eps * (x.shape[1] if w is None else w.sum())
    e = (x - m_safe).exp_() if exp_out is None else torch.sub(x, m_safe, out=exp_out).exp_()
    out[1] = e.sum(1)


def _merge(stats: Tensor) -> tuple[Tensor, Tensor]:
    """The global max ``M`` and ``log S`` ``(R,)`` (``lse = M + log S``) from ``(W, k, R)``
    per-rank statistics."""
    m = stats[:, 0]  # (W, R)
    top = m.amax(0)  # (R,)
    # All -inf rows give top = -inf and NaN here, as torch's log_softmax does.
    s = (stats[:, 1] * (m - top).exp()).sum(0)
    return top, s.log()


def _about_top(stats: Tensor, top: Tensor, value: int, mass: int) -> Tensor:
    """``sum_c u_c (M - x_c)`` ``(R,)`` from each rank's ``sum u_c (m_r - x_c)`` (row ``value``
    of ``stats (W, k, R)``) and ``sum u_c`` (row ``mass``): moved from ``m_r`` to ``M`` (a shift of
    0 adds exactly 0, also for an inf mass)."""
    m = stats[:, 0]
    shift = top - torch.where(m == -torch.inf, 0, m)  # (W, R)
    return (stats[:, value] + torch.where(shift == 0, 0, stats[:, mass] * shift)).sum(0)


def _index_terms(top, log_s, stats, target, weight, vocab, eps, params):
    """Class-index rows, torch's formula with smoothing eps and class weights w:

    loss = (1 - eps) * w_y * (lse - x_y) + eps / V * sum_c w_c * (lse - x_c) [+ z * lse^2]
    with lse - x = (M - x) + log S. Returns the loss, the factor multiplying softmax in the
    gradient, w_y and sum(w_y).
    """
    lse = top + log_s
    valid = target != params.ignore_index  # (R,)
    counted = valid.to(lse.dtype)
    w_y = counted if weight is None else counted * weight[torch.where(valid, target, 0)]
    loss = (1 - eps) * w_y * ((top - stats[:, 2].sum(0)) + log_s)
    coef = (1 - eps) * w_y
    if eps > 0:
        w_total = vocab if weight is None else weight.sum()
        smooth = _about_top(stats, top, 3, 4) + (eps * w_total) * log_s  # eps sum w_c (lse - x_c)
        loss = loss + torch.where(valid, smooth, 0) / vocab
        coef = coef + (eps / vocab) * w_total * counted
    if params.z_loss:
        loss = loss + params.z_loss * lse * lse
        coef = coef + 2 * params.z_loss * counted * lse
    # Ignored rows contribute exactly 0, even when their logits are not finite.
    return torch.where(valid, loss, 0), coef, w_y, w_y.sum()


def _prob_terms(top, log_s, stats, weight, vocab, eps, params):
    """Probability rows: loss = sum_c w_c t_c ((M - x_c) + log S), t smoothed towards 1/V.

    Returns the loss, the softmax factor (weighted target mass), the smoothing offset eps / V
    of the target and the row count (the divisor of "mean").
    """
    lse = top + log_s
    wt_gap, mass = (1 - eps) * _about_top(stats, top, 2, 3), (1 - eps) * stats[:, 3].sum(0)
    t_scale = 0.0
    if eps > 0:
        t_scale = eps / vocab
        w_total = vocab if weight is None else weight.sum()
        wt_gap = wt_gap + _about_top(stats, top, 4, 5) / vocab
        mass = mass + t_scale * w_total
    loss = wt_gap + mass * log_s
    if params.z_loss:
        loss = loss + params.z_loss * lse * lse
        mass = mass + 2 * params.z_loss * lse
    denominator = lse.new_full((), float(lse.shape[0]))  # a fill, not a host-to-device copy
    return loss, mass, t_scale, denominator


def _host_readable(t: Tensor) -> bool:
    """Reading CPU tensors costs no device sync; elsewhere the checks stay on the device."""
    return t.device.type == "cpu"


def _check_layout(meta: Tensor, shard: Shard, weight: Tensor | None, target: Tensor,
                  ignore_index: int, probs: bool):
    """Check every rank's layout from the gathered ``meta (W, 4)``; return the vocabulary size.

    Every rank sees the same ``meta`` and so raises the same error. On CPU the message names the
    offending values; on accelerators the checks are device-side asserts (no host sync).
    """
    if not _host_readable(meta):
        sizes = meta[:, 1]
        starts = torch.cumsum(sizes, 0) - sizes
        torch._assert_async((meta[:, 0] == starts).all(), "crossent: vocab shards do not tile [0, V)")
        vocab = sizes.sum()
        w_len = meta[0, 2]
        torch._assert_async((meta[:, 2] == w_len).all() & ((w_len == -1) | (w_len == vocab)),
                            "crossent: class weight length differs from the vocabulary size")
        if not probs:
            torch._assert_async((meta[:, 3] == meta[0, 3]).all(), "crossent: target differs across ranks")
            bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
            torch._assert_async(~bad.any(), "crossent: target holds a class index out of range")
        if weight is not None:
            return weight.shape[0]
        return shard.vocab_size if shard.vocab_size is not None else vocab
    starts, sizes, w_lens, sums = (list(c) for c in zip(*meta.tolist()))
    layout = ", ".join(f"rank {r}: [{a}, {a + n})" for r, (a, n) in enumerate(zip(starts, sizes)))
    expected = [sum(sizes[:r]) for r in range(len(sizes))]
    if starts != expected:
        raise ValueError(
            f"vocab shards must tile [0, V) in rank order without gaps or overlaps; got {layout} "
            f"(expected starts {expected}): pass vocab_start=None to derive them from the sizes"
        )
    vocab = sum(sizes)
    if len(set(w_lens)) > 1 or w_lens[0] not in (-1, vocab):
        raise RuntimeError(
            f"weight tensor should be defined either for all {vocab} classes (the summed shard "
            f"sizes, {layout}) or no classes, but got weight lengths {w_lens} by rank "
            f"(-1: none); pass the full (V,) class weights on every rank"
        )
    if not probs:
        if len(set(sums)) > 1:
            raise RuntimeError(
                "target differs across ranks (checksums " + ", ".join(map(str, sums)) + "): every "
                "rank must pass the same global class indices"
            )
        _validate.check_target_values(target, vocab, ignore_index)
    return vocab
